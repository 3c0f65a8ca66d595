"""`nosa.ops.occupancy`: the SM count occupancy-split launches size themselves for, and `launch_share`."""

import pytest
import torch

from nosa import ops
from nosa.ops import occupancy


def test_launch_share_scales_the_sm_count_and_restores_it():
    cpu = torch.device("cpu")
    assert occupancy.sm_count(cpu, off_cuda=8) == 8
    with ops.launch_share(0.5):
        assert occupancy.current_share() == 0.5 and occupancy.sm_count(cpu, off_cuda=8) == 4
        with ops.launch_share(0.25):
            assert occupancy.sm_count(cpu, off_cuda=8) == 2
        assert occupancy.sm_count(cpu, off_cuda=8) == 4
        assert occupancy.sm_count(cpu, off_cuda=1) == 1  # never below one SM
    assert occupancy.current_share() == 1.0


def test_launch_share_restores_the_share_when_the_block_raises():
    with pytest.raises(RuntimeError, match="inside"):
        with ops.launch_share(0.5):
            raise RuntimeError("inside")
    assert occupancy.current_share() == 1.0


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, True, "half", None])
def test_launch_share_refuses_what_is_not_a_fraction(bad):
    with pytest.raises(ValueError, match="fraction in \\(0, 1\\]"):
        with ops.launch_share(bad):
            pass


def test_decode_attention_splits_for_its_share(monkeypatch):
    """The decode kernel's split count follows the share (fewer chunks per (row, head) for half the SMs);
    the result does not depend on it beyond rounding."""
    pytest.importorskip("triton")  # conftest runs Triton under its interpreter
    from nosa.ops.kernels import decode

    grids = []
    kernel = decode._decode_partial_kernel

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(decode, "_decode_partial_kernel", Spy())
    g = torch.Generator().manual_seed(0)
    B, Hq, H, D, S = 4, 8, 2, 16, 1024  # 8 (row, head) pairs: 4 splits for 8 stand-in SMs, 2 for 4
    q = torch.randn(B, Hq, D, generator=g)
    k, v = torch.randn(B, S, H, D, generator=g), torch.randn(B, S, H, D, generator=g)
    valid = torch.ones(B, S, H, dtype=torch.bool)
    whole = decode.decode_attention(q, k, v, None, valid)
    with ops.launch_share(0.5):
        half = decode.decode_attention(q, k, v, None, valid)
    assert (grids[0][1], grids[1][1]) == (4, 2)
    torch.testing.assert_close(half, whole, atol=1e-5, rtol=1e-5)
