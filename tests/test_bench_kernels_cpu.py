"""`nosa bench kernels`' NOSA row on the CPU under the Triton interpreter, with the GPU timer replaced by one
call of each timed function: every variant the benchmark times side by side runs, and the row carries its
figures (a name error or a broken variant would otherwise surface only on the GPU, mid-run)."""

import types

import pytest

import torch
import torch.nn.functional as F

from nosa.bench import kernels as bench_kernels
from nosa.config import SparseAttentionConfig


@pytest.mark.parametrize("descriptors_default", [False, True])
def test_nosa_row_runs_every_variant(monkeypatch, descriptors_default):
    """descriptors_default: the arm beside the default's figures is the other K/V load (on the GPU the
    default depends on the device: `descriptors_by_default`)."""
    from nosa.ops.kernels import attention as ka

    monkeypatch.setattr(ka, "descriptors_by_default", lambda device, dtype=None: descriptors_default)
    arm = "pointer" if descriptors_default else "desc"
    timed = []
    monkeypatch.setattr(bench_kernels, "_ms", lambda fn, args, length: (fn(), timed.append(fn), 1.0)[2])
    cfg = SparseAttentionConfig(block_size=8, topk_blocks=6, sink_blocks=1, window_blocks=1, query_blocks=2,
                                compress_kernel=4, compress_stride=2)
    length, hq, h, d = 40, 8, 2, 32
    q, k, v = torch.randn(1, length, hq, d), torch.randn(1, length, h, d), torch.randn(1, length, h, d)
    eviction = 0.5 * F.softplus(torch.randn(1, length, h))
    args = types.SimpleNamespace(reps=1, warmup=0, tile_tokens=None, sweep_lengths=[length])
    row = {}
    indices = bench_kernels._bench_nosa(row, q, k, v, eviction, torch.randn_like(q), torch.arange(length), cfg, args,
                                        hq // h)
    assert indices.shape == (1, length, h, cfg.topk_blocks)
    for key in ("nosa_selection_ms", "nosa_fwd_bwd_ms", "nosa_fwd_bwd_atomic_ms", "nosa_selection_threshold_ms",
                "nosa_fwd_bwd_first_version_ms", "nosa_attn_fwd_kernel_ms", "nosa_dq_kernel_ms", "nosa_dkv_kernel_ms",
                f"nosa_attn_fwd_kernel_{arm}_ms", f"nosa_dq_kernel_{arm}_ms", f"nosa_fwd_bwd_{arm}_ms",
                "nosa_dkv_atomic_kernel_ms"):
        assert row[key] == 1.0, key
    assert "descriptors_error" not in row and row["nosa_descriptors_possible"]
    assert row["nosa_descriptors_default"] is descriptors_default
    # The descriptor loads read the same values: the same forward output under the interpreter.
    assert row["nosa_desc_fwd_max_abs_diff"] == 0.0
    assert set(row["nosa_dkv_sweep_ms"]) >= {"autotuned", "4w1s_64rows_first"}
    assert row["nosa_tile_sharing"]["union"] >= row["nosa_tile_sharing"]["in_every_token"]
    assert len(timed) >= 19


def test_trace_tile_union_counts_the_blocks_consecutive_tokens_share():
    """Tokens that select the same blocks walk no more than one token's; tokens with disjoint selections
    walk tile_tokens times as many; -1 entries are unused and a partial last tile is left out."""
    import torch

    from nosa.bench.kernels import trace_tile_union

    same = torch.tensor([0, 3, 5, -1]).expand(1, 9, 2, 4)  # [L, steps, H, K], 9 steps: 2 tiles of 4 and a rest
    row = trace_tile_union(same, 4)
    assert row["blocks_per_token"] == 3 and row["union"] == 3 and row["in_every_token"] == 3
    assert row["union_per_token_blocks"] == 1.0 and row["one_token_only"] == 0
    disjoint = torch.arange(8 * 2).view(1, 8, 1, 2)  # every token its own two blocks
    row = trace_tile_union(disjoint, 4)
    assert row["union"] == 8 and row["union_per_token_blocks"] == 4.0 and row["one_token_only"] == 8
    assert row["in_every_token"] == 0
