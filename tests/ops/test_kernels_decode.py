"""Triton decode attention over device slots against the reference, on CPU under the interpreter."""

import pytest
import torch

from nosa.ops import reference as ref
from nosa.ops.kernels import decode as kd


@pytest.mark.parametrize("fused", [True, False], ids=["fused-merge", "merge-kernel"])
@pytest.mark.parametrize("batch,hq,h,d,slots,splits,bias,dtype", [
    (3, 4, 4, 64, 40, 1, True, torch.float32),     # GQA 1, one chunk
    (2, 12, 4, 128, 130, 3, True, torch.float32),  # GQA 3, uneven chunks
    (1, 16, 1, 64, 96, 2, False, torch.float16),   # GQA 16, no bias
    (2, 8, 2, 64, 300, 3, True, torch.float16),    # GQA 4, three chunks of 128
])
def test_decode_attention_matches_reference(batch, hq, h, d, slots, splits, bias, dtype, fused):
    q = torch.randn(batch, hq, d).to(dtype)
    k = torch.randn(batch, slots, h, d).to(dtype)
    v = torch.randn(batch, slots, h, d).to(dtype)
    b = torch.randn(batch, slots, h) if bias else None
    valid = torch.rand(batch, slots, h) > 0.3
    valid[0, :, 0] = False  # a head with no valid slot returns zeros, as the reference does
    got = kd.decode_attention(q, k, v, b, valid, splits=splits, fused_merge=fused)
    want = ref.decode_attention(q.float(), k.float(), v.float(), b, valid)
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


def test_decode_shape_errors():
    with pytest.raises(ValueError, match="valid must be"):
        kd.decode_attention(torch.randn(1, 2, 64), torch.randn(1, 8, 1, 64), torch.randn(1, 8, 1, 64), None,
                            torch.ones(1, 8, 2, dtype=torch.bool))
