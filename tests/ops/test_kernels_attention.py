"""Triton block-sparse attention (forward, backward) against the reference, on CPU under the interpreter.

Odd shapes: T not a multiple of the block, GQA ratios 1/3/4/16, head_dim 64 and 128, float32 (tight) and
float16 (loose: bf16 `tl.dot` is wrong in the interpreter, so bf16 runs only in test_kernels_gpu.py).
"""

import pytest
import torch

from nosa import ops
from nosa.config import SparseAttentionConfig
from nosa.ops import reference as ref
from nosa.ops.kernels import attention as ka


def _selection(q, k, ev, cfg, positions):
    num_blocks = -(-k.shape[1] // cfg.block_size)
    ck = ref.compress_keys(k, cfg.compress_kernel, cfg.compress_stride)
    ag = ref.agnostic_chunk_scores(ev, cfg.compress_kernel, cfg.compress_stride) if ev is not None else None
    return ref.select_for_queries(q, ck, ag, positions, num_blocks, cfg)


def _run(impl, q, k, v, bias, indices, positions, block_size, grad_out, **kw):
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (q, k, v, bias)]
    o, lse = impl(*leaves, indices, positions, block_size, return_lse=True, **kw)
    (o.float() * grad_out).sum().backward()
    return o, lse, [x.grad if x is not None else None for x in leaves]


CASES = [
    # batch, Tq, Tk, Hq, H, D, block, topk, tile_tokens, dtype
    (2, 45, 45, 4, 4, 64, 8, 4, None, torch.float32),   # GQA 1, Tq = Tk
    (1, 37, 53, 6, 2, 64, 16, 4, None, torch.float32),  # GQA 3 (padded group), Tq < Tk
    (1, 50, 50, 8, 2, 128, 8, 5, 4, torch.float32),     # GQA 4, head_dim 128, union tiles of 4 tokens
    (1, 41, 41, 16, 1, 64, 8, 4, 2, torch.float16),     # GQA 16
    (2, 30, 44, 4, 1, 128, 8, 3, 1, torch.float16),    # GQA 4, one token per tile
]


@pytest.mark.parametrize("batch,tq,tk,hq,h,d,block,topk,tile,dtype", CASES)
def test_sparse_attention_matches_reference(batch, tq, tk, hq, h, d, block, topk, tile, dtype):
    cfg = SparseAttentionConfig(block_size=block, topk_blocks=topk, sink_blocks=1, window_blocks=1,
                                query_blocks=min(1, topk - 3), compress_kernel=4, compress_stride=2)
    q = torch.randn(batch, tq, hq, d).to(dtype)
    k = torch.randn(batch, tk, h, d).to(dtype)
    v = torch.randn(batch, tk, h, d).to(dtype)
    bias = torch.randn(batch, tk, h)
    positions = torch.arange(tk - tq, tk)
    indices = _selection(q.float(), k.float(), bias, cfg, positions)
    grad_out = torch.randn(batch, tq, hq, d)
    o, lse, grads = _run(ka.sparse_attention, q, k, v, bias, indices, positions, block, grad_out, tile_tokens=tile)
    # The reference in float32 is the ground truth for both dtypes.
    o_ref, lse_ref, grads_ref = _run(ref.sparse_attention, q.float(), k.float(), v.float(), bias, indices, positions, block, grad_out)
    tol = 2e-5 if dtype == torch.float32 else 3e-3
    assert o.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(o.float(), o_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, lse_ref, atol=tol, rtol=tol)
    for name, g, g_ref in zip("q k v bias".split(), grads, grads_ref):
        scale = g_ref.abs().max().item()
        err = (g.float() - g_ref).abs().max().item()
        assert err <= 10 * tol * max(1.0, scale), f"d{name}: max error {err:.3g} (scale {scale:.3g})"


def test_sparse_attention_without_bias_and_with_unused_slots():
    """No bias; hand-made selections with -1 padding and a query that selects only its own block."""
    batch, t, hq, h, d, block = 1, 21, 2, 1, 64, 4
    q, k, v = torch.randn(batch, t, hq, d), torch.randn(batch, t, h, d), torch.randn(batch, t, h, d)
    positions = torch.arange(t)
    own = (positions // block).to(torch.int32)
    indices = torch.full((batch, t, h, 3), -1, dtype=torch.int32)
    indices[0, :, 0, 0] = torch.where(own > 1, 0, own)
    indices[0, :, 0, 1] = torch.where(own > 1, own, -1)
    indices[0, 5, 0] = torch.tensor([1, -1, -1], dtype=torch.int32)  # only its own block
    grad_out = torch.randn(batch, t, hq, d)
    o, lse, grads = _run(ka.sparse_attention, q, k, v, None, indices, positions, block, grad_out)
    o_ref, lse_ref, grads_ref = _run(ref.sparse_attention, q, k, v, None, indices, positions, block, grad_out)
    torch.testing.assert_close(o, o_ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, lse_ref, atol=2e-5, rtol=2e-5)
    for g, g_ref in zip(grads[:3], grads_ref[:3]):
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)


def test_tile_lists_union_and_inverted_selection():
    """Each union entry's bits name exactly the tile's tokens that selected the block; the inverted
    selection lists, per key block, the tokens that selected it, in segments."""
    indices = torch.tensor([[[[0, 2, -1]], [[0, 1, 2]], [[2, -1, -1]]]], dtype=torch.int32)  # [1, 3, 1, 3]
    lists, counts = ka.build_tile_lists(indices, 2)
    assert counts.tolist() == [[[3, 1]]]
    assert lists[0, 0, 0, :3].tolist() == [(0 << 16) | 3, (1 << 16) | 2, (2 << 16) | 3]
    assert lists[0, 0, 1, 0].item() == (2 << 16) | 1
    tokens, seg_key, seg_start, seg_end = ka.invert_selection(indices, num_blocks=3, segment=2)
    segments = [(int(seg_key[i]), tokens[seg_start[i]:seg_end[i]].tolist()) for i in range(seg_key.numel())]
    assert segments == [(0, [0, 1]), (1, [1]), (2, [0, 1]), (2, [2])]


def test_mixed_input_dtypes_run_promoted():
    """Under autocast RoPE can leave q, k in float32 while v is half: the kernel promotes like the
    reference (float32 math), returns o in q's dtype and each gradient in its input's dtype."""
    batch, t, hq, h, d, block = 1, 19, 4, 2, 64, 4
    q, k = torch.randn(batch, t, hq, d), torch.randn(batch, t, h, d)
    v = torch.randn(batch, t, h, d).half()
    bias = torch.randn(batch, t, h)
    positions = torch.arange(t)
    own = (positions // block).to(torch.int32)
    indices = torch.stack([torch.zeros_like(own), own], -1).view(1, t, 1, 2).expand(batch, t, h, 2).contiguous()
    indices[:, :block] = torch.tensor([0, -1], dtype=torch.int32)
    grad_out = torch.randn(batch, t, hq, d)
    o, lse, grads = _run(ka.sparse_attention, q, k, v, bias, indices, positions, block, grad_out)
    o_ref, lse_ref, grads_ref = _run(ref.sparse_attention, q, k, v.float(), bias, indices, positions, block, grad_out)
    assert o.dtype == torch.float32 and grads[2].dtype == torch.float16
    torch.testing.assert_close(o, o_ref, atol=2e-5, rtol=2e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.float(), g_ref, atol=2e-3, rtol=2e-3)


def test_dispatch_override_runs_triton_on_cpu():
    cfg = SparseAttentionConfig(block_size=8, topk_blocks=4, sink_blocks=1, window_blocks=1, query_blocks=1,
                                compress_kernel=4, compress_stride=2)
    q, k, v = torch.randn(1, 33, 4, 64), torch.randn(1, 33, 2, 64), torch.randn(1, 33, 2, 64)
    ev = torch.randn(1, 33, 2)
    with ops.use_backend("triton"):
        assert ops.resolve("sparse_attention", q) is ka.sparse_attention
        out, idx = ops.nosa_attention(q, k, v, ev, cfg, return_indices=True)
    out_ref, idx_ref = ref.nosa_attention(q, k, v, ev, cfg, return_indices=True)
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(out, out_ref, atol=2e-5, rtol=2e-5)
    assert ops.resolve("sparse_attention", q) is ref.sparse_attention  # auto on CPU tensors


@pytest.mark.parametrize("mode,lengths,hq,h,d,dtype", [
    ("nosa", [13, 30, 1, 21], 4, 2, 64, torch.float32),    # GQA 2, a 1-token sequence, odd lengths
    ("nosa", [37, 9], 16, 1, 64, torch.float16),           # GQA 16
    ("infllmv2", [19, 26], 2, 2, 128, torch.float32),      # GQA 1 (score tiles of 128 tokens), no eviction head
])
def test_varlen_one_launch_set_equals_each_sequence_alone(mode, lengths, hq, h, d, dtype):
    from nosa.ops.kernels import pipeline as kp

    cfg = SparseAttentionConfig(block_size=8, topk_blocks=4, sink_blocks=1, window_blocks=1, query_blocks=1,
                                compress_kernel=4, compress_stride=2, attn_mode=mode)
    total = sum(lengths)
    cu = torch.tensor([0] + lengths).cumsum(0)
    q, k, v = (torch.randn(1, total, n, d).to(dtype) for n in (hq, h, h))
    ev = torch.randn(1, total, h)
    grad_out = torch.randn(1, total, hq, d)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, ev)]
    calls = []
    real = kp.sparse_attention
    kp.sparse_attention = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    try:
        out, selections = kp.nosa_attention_varlen(*leaves, cu, cfg, return_indices=True)
    finally:
        kp.sparse_attention = real
    assert len(calls) == 1  # one attention launch set for the whole pack
    (out.float() * grad_out).sum().backward()
    tol = 2e-5 if dtype == torch.float32 else 3e-3
    for s, length in enumerate(lengths):
        sl = slice(int(cu[s]), int(cu[s + 1]))
        alone = [x[:, sl].float().detach().requires_grad_() for x in (q, k, v, ev)]
        want, want_idx = ref.nosa_attention(*alone, cfg, return_indices=True)
        (want * grad_out[:, sl]).sum().backward()
        assert torch.equal(selections[s], want_idx), f"sequence {s}: selection differs"
        torch.testing.assert_close(out[:, sl].detach().float(), want.detach(), atol=tol, rtol=tol)
        names = "q k v eviction".split() if mode == "nosa" else "q k v".split()
        for name, leaf, a in zip(names, leaves, alone):
            err = (leaf.grad[:, sl].float() - a.grad).abs().max().item()
            assert err <= 10 * tol * max(1.0, a.grad.abs().max().item()), f"sequence {s} d{name}: {err:.3g}"
    with pytest.raises(ValueError, match="cu_seqlens"):
        kp.nosa_attention_varlen(q, k, v, ev, torch.tensor([0, 50, 40]), cfg)


def test_errors_are_clear():
    q, k = torch.randn(1, 8, 3, 64), torch.randn(1, 8, 2, 64)
    idx = torch.zeros(1, 8, 2, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        ka.sparse_attention(q, k, k, None, idx, torch.arange(8), 4)
    with pytest.raises(ValueError, match="tile_tokens"):
        ka.sparse_attention(torch.randn(1, 8, 4, 64), k, k, None, idx, torch.arange(8), 4, tile_tokens=17)


@pytest.mark.parametrize("batch,tq,tk,hq,h,d,block,topk,dtype", [
    (1, 37, 53, 16, 1, 64, 8, 4, torch.float32),   # GQA 16, Tq < Tk
    (2, 29, 29, 8, 2, 128, 4, 5, torch.float16),   # GQA 4, head_dim 128
    (1, 23, 23, 3, 3, 64, 4, 3, torch.float32),    # GQA 1
])
def test_deterministic_backward_matches_reference_and_repeats_bit_identically(batch, tq, tk, hq, h, d, block, topk, dtype):
    cfg = SparseAttentionConfig(block_size=block, topk_blocks=topk, sink_blocks=1, window_blocks=1,
                                query_blocks=min(1, topk - 3), compress_kernel=4, compress_stride=2)
    q, k, v = torch.randn(batch, tq, hq, d).to(dtype), torch.randn(batch, tk, h, d).to(dtype), torch.randn(batch, tk, h, d).to(dtype)
    bias = torch.randn(batch, tk, h)
    positions = torch.arange(tk - tq, tk)
    indices = _selection(q.float(), k.float(), bias, cfg, positions)
    grad_out = torch.randn(batch, tq, hq, d)
    # Short segments: the sink block's inverted list spans several partial slots, so the reduction runs.
    with ka.tuning(dkv_segment=4):
        first = _run(ka.sparse_attention, q, k, v, bias, indices, positions, block, grad_out, deterministic=True)
        second = _run(ka.sparse_attention, q, k, v, bias, indices, positions, block, grad_out, deterministic=True)
    for a, b in zip(first[2], second[2]):
        assert torch.equal(a, b)
    _, _, grads_ref = _run(ref.sparse_attention, q.float(), k.float(), v.float(), bias, indices, positions, block, grad_out)
    tol = 2e-5 if dtype == torch.float32 else 3e-3
    for name, g, g_ref in zip("q k v bias".split(), first[2], grads_ref):
        err = (g.float() - g_ref).abs().max().item()
        assert err <= 10 * tol * max(1.0, g_ref.abs().max().item()), f"d{name}: max error {err:.3g}"


def test_fixed_order_backward_is_the_default_and_atomics_are_refused_in_torchs_deterministic_mode(monkeypatch):
    """deterministic=None (the default) takes the fixed-order dk/dv path, with torch's deterministic mode on
    or off; False takes the atomic one, and is refused while torch's deterministic mode is on."""
    seen = []
    real = ka.backward_dkv
    monkeypatch.setattr(ka, "backward_dkv", lambda *a: seen.append(a[-1]) or real(*a))
    q, k, v = torch.randn(1, 9, 2, 64), torch.randn(1, 9, 1, 64), torch.randn(1, 9, 1, 64)
    indices = torch.zeros(1, 9, 1, 1, dtype=torch.int32)

    def backward(**kw):
        leaf = q.clone().requires_grad_()
        ka.sparse_attention(leaf, k, v, None, indices, torch.arange(9), 4, **kw).sum().backward()

    for mode in (False, True):
        torch.use_deterministic_algorithms(mode)
        try:
            backward()
            if mode:
                with pytest.raises(RuntimeError, match="forbids"):
                    backward(deterministic=False)
                with torch.no_grad():  # no backward, no atomics: nothing to refuse
                    ka.sparse_attention(q, k, v, None, indices, torch.arange(9), 4, deterministic=False)
                torch.use_deterministic_algorithms(True, warn_only=True)
                with pytest.warns(UserWarning, match="forbids"):
                    backward(deterministic=False)
            else:
                backward(deterministic=False)
        finally:
            torch.use_deterministic_algorithms(False)
    assert seen == [True, False, True, False]


def test_tuning_rejects_unknown_knobs():
    with pytest.raises(ValueError, match="unknown tuning knobs"):
        with ka.tuning(fwd_wraps=8):
            pass


@pytest.mark.parametrize("knobs", [dict(fused_delta=False), dict(dkv_tokens=8), dict(dkv_tokens=1, dkv_segment=3)])
def test_benchmarked_variants_match_reference(knobs):
    """The variants a benchmark run times side by side (attention.tuning) compute the same gradients."""
    batch, tq, tk, hq, h, d, block = 1, 27, 31, 8, 2, 64, 4
    cfg = SparseAttentionConfig(block_size=block, topk_blocks=4, sink_blocks=1, window_blocks=1, query_blocks=1,
                                compress_kernel=4, compress_stride=2)
    q, k, v = torch.randn(batch, tq, hq, d), torch.randn(batch, tk, h, d), torch.randn(batch, tk, h, d)
    bias = torch.randn(batch, tk, h)
    positions = torch.arange(tk - tq, tk)
    indices = _selection(q, k, bias, cfg, positions)
    grad_out = torch.randn(batch, tq, hq, d)
    with ka.tuning(**knobs):
        _, _, grads = _run(ka.sparse_attention, q, k, v, bias, indices, positions, block, grad_out)
    _, _, grads_ref = _run(ref.sparse_attention, q, k, v, bias, indices, positions, block, grad_out)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tq,tk,hq,h,d,block,tile", [
    (29, 29, 8, 2, 64, 8, 4),     # T not a multiple of the block: the last block's descriptor load runs past Tk
    (23, 37, 6, 2, 40, 12, None),  # block 12 < BLOCK_N 16 (the load takes 4 keys of the next block), D 40 < BLOCK_D
])
def test_descriptor_loads_equal_pointer_loads(tq, tk, hq, h, d, block, tile):
    """tuning(descriptors=True) loads K/V blocks through tensor descriptors: the same values, so the same
    outputs and gradients bit for bit, and both equal to the reference."""
    cfg = SparseAttentionConfig(block_size=block, topk_blocks=4, sink_blocks=1, window_blocks=1, query_blocks=1,
                                compress_kernel=4, compress_stride=2)
    q, k, v = torch.randn(2, tq, hq, d), torch.randn(2, tk, h, d), torch.randn(2, tk, h, d)
    bias = torch.randn(2, tk, h)
    positions = torch.arange(tk - tq, tk)
    indices = _selection(q, k, bias, cfg, positions)
    grad_out = torch.randn(2, tq, hq, d)
    meta, _ = ka._meta(q, k, block, tile or ka.default_tile_tokens(hq // h))
    assert ka.kv_descriptors(k, v, meta["BLOCK_N"], meta["BLOCK_D"]) is not None
    o, lse, grads = _run(ka.sparse_attention, q, k, v, bias, indices, positions, block, grad_out, tile_tokens=tile)
    with ka.tuning(descriptors=True):
        o_d, lse_d, grads_d = _run(ka.sparse_attention, q, k, v, bias, indices, positions, block, grad_out, tile_tokens=tile)
    assert torch.equal(o, o_d) and torch.equal(lse, lse_d)
    for g, g_d in zip(grads, grads_d):
        assert torch.equal(g, g_d)
    o_ref, _, grads_ref = _run(ref.sparse_attention, q, k, v, bias, indices, positions, block, grad_out)
    torch.testing.assert_close(o_d, o_ref, atol=2e-5, rtol=2e-5)
    for g, g_ref in zip(grads_d, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)


def test_descriptors_are_the_default_on_hopper_and_later_only(monkeypatch):
    """Tensor descriptors are taken when `tuning` says nothing for 16-bit K/V on CUDA devices of capability
    >= 9 (timed faster there) and nowhere else; `tuning(descriptors=False)` still forces the pointer loads."""
    assert not ka.descriptors_by_default(torch.device("cpu"))
    for capability, wanted in (((8, 0), False), ((8, 9), False), ((9, 0), True), ((10, 0), True)):
        monkeypatch.setattr(ka, "_capability", lambda device, c=capability: c)
        assert ka.descriptors_by_default(torch.device("cuda", 0)) is wanted, capability
        assert ka.descriptors_by_default(torch.device("cuda", 0), torch.float16) is wanted, capability
        assert not ka.descriptors_by_default(torch.device("cuda", 0), torch.float32), capability  # never timed
    # The launch follows the rule: with the rule saying yes, the forward asks for descriptors, and the knob
    # overrides it either way.
    asked = []
    real = ka.kv_descriptors
    monkeypatch.setattr(ka, "kv_descriptors", lambda *a: (asked.append(True), real(*a))[1])
    cfg = SparseAttentionConfig(block_size=8, topk_blocks=4, sink_blocks=1, window_blocks=1, query_blocks=1,
                                compress_kernel=4, compress_stride=2)
    q, k, v = torch.randn(1, 24, 4, 32), torch.randn(1, 24, 2, 32), torch.randn(1, 24, 2, 32)
    positions = torch.arange(24)
    indices = _selection(q, k, None, cfg, positions)
    for by_default, knob, expect in ((False, None, False), (True, None, True), (True, False, False), (False, True, True)):
        monkeypatch.setattr(ka, "descriptors_by_default", lambda device, dtype=None, d=by_default: d)
        asked.clear()
        with ka.tuning(descriptors=knob):
            o = ka.sparse_attention(q, k, v, None, indices, positions, 8)
        assert bool(asked) is expect, (by_default, knob)
        torch.testing.assert_close(o, ref.sparse_attention(q, k, v, None, indices, positions, 8), atol=2e-5, rtol=2e-5)


def test_descriptors_refuse_layouts_the_bulk_copy_cannot_describe():
    """Misaligned bases and strides that are not 16-byte multiples get no descriptor (the kernels then take
    their pointer loads, which `tuning(descriptors=True)` falls back to)."""
    k = torch.randn(1, 20, 2, 64)
    assert ka.kv_descriptors(k, k, 16, 64) is not None
    odd_stride = torch.randn(1, 20, 2, 67)[..., :64]  # row stride 67 floats = 268 bytes
    assert ka.kv_descriptors(odd_stride, k, 16, 64) is None
    shifted = torch.randn(1 * 20 * 2 * 64 + 1)[1:].view(1, 20, 2, 64)  # base 4 bytes past an aligned one
    if shifted.data_ptr() % 16:
        assert ka.kv_descriptors(k, shifted, 16, 64) is None
    # And the kernels still give the reference's result on such inputs with the knob on.
    cfg = SparseAttentionConfig(block_size=4, topk_blocks=4, sink_blocks=1, window_blocks=1, query_blocks=1,
                                compress_kernel=4, compress_stride=2)
    q = torch.randn(1, 20, 4, 64)
    positions = torch.arange(20)
    indices = _selection(q, odd_stride, None, cfg, positions)
    with ka.tuning(descriptors=True):
        o = ka.sparse_attention(q, odd_stride, k, None, indices, positions, 4)
    torch.testing.assert_close(o, ref.sparse_attention(q, odd_stride, k, None, indices, positions, 4), atol=2e-5, rtol=2e-5)
