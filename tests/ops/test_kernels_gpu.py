"""The Triton kernels in bfloat16 on a GPU, with the flash-attention tolerance rule: the kernel's error
against a float32 reference is at most twice the error of a PyTorch bf16 implementation (plus 1e-5)."""

import math

import pytest
import torch

from nosa.config import SparseAttentionConfig
from nosa.ops import reference as ref
from nosa.ops.kernels import attention as ka
from nosa.ops.kernels import decode as kd
from nosa.ops.kernels import pipeline as kp
from nosa.ops.kernels import selection as ks

pytestmark = pytest.mark.gpu


def _torch_bf16_attention(q, k, v, bias, indices, positions, block_size):
    """Sparse attention computed by PyTorch in the inputs' dtype (matmuls and softmax output in bf16)."""
    group = q.shape[2] // k.shape[2]
    num_keys = k.shape[1]
    keys = torch.arange(num_keys, device=q.device)
    mask = ref.block_indices_to_mask(indices, -(-num_keys // block_size))[..., keys // block_size]
    mask = mask & (keys[None, :] <= positions[:, None])[None, :, None, :]  # [B, Tq, H, Tk]
    kh = k.repeat_interleave(group, dim=2).transpose(1, 2)
    vh = v.repeat_interleave(group, dim=2).transpose(1, 2)
    logits = q.transpose(1, 2) @ kh.transpose(-1, -2) / math.sqrt(q.shape[-1])
    logits = logits + bias.to(q.dtype).transpose(1, 2).repeat_interleave(group, dim=1)[:, :, None, :]
    logits = logits.masked_fill(~mask.repeat_interleave(group, dim=2).transpose(1, 2), float("-inf"))
    return (torch.softmax(logits, dim=-1) @ vh).transpose(1, 2)


def _grads(fn, inputs, grad_out):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [x.grad for x in leaves]


@pytest.mark.parametrize("descriptors", [False, True])
@pytest.mark.parametrize("hq,h,d,t", [(32, 2, 128, 1100), (8, 8, 64, 700), (12, 3, 128, 517)])
def test_sparse_attention_bf16_tolerance_rule(hq, h, d, t, descriptors):
    """descriptors=True: K/V blocks through tensor descriptors (bulk copies on Hopper). Not compared bit
    for bit with the pointer loads: the compiler may pick other matrix instructions for operands that come
    through shared memory, so the last bits may differ; both must keep the rule."""
    torch.manual_seed(0)
    cfg = SparseAttentionConfig(block_size=64, topk_blocks=8, sink_blocks=1, window_blocks=2, query_blocks=2)
    dev = "cuda"
    q = torch.randn(1, t, hq, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, t, h, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, t, h, d, device=dev, dtype=torch.bfloat16)
    bias = torch.randn(1, t, h, device=dev)
    positions = torch.arange(t, device=dev)
    indices = kp.select_all(q, k, bias, positions, cfg)
    grad_out = torch.randn(1, t, hq, d, device=dev)
    inputs = (q, k, v, bias)
    with ka.tuning(descriptors=descriptors):
        got = _grads(lambda *x: ka.sparse_attention(*x, indices, positions, 64), inputs, grad_out)
    if descriptors:
        assert ka.kv_descriptors(k, v, 64, max(16, 1 << (d - 1).bit_length())) is not None
    exact = _grads(lambda q, k, v, b: ref.sparse_attention(q.float(), k.float(), v.float(), b, indices, positions, 64), inputs, grad_out)
    torch_bf16 = _grads(lambda *x: _torch_bf16_attention(*x, indices, positions, 64), inputs, grad_out)
    for name, a, b, c in zip(["o", "dq", "dk", "dv", "dbias"], got, exact, torch_bf16):
        err = (a.float() - b.float()).abs().max().item()
        base = (c.float() - b.float()).abs().max().item()
        assert err <= 2 * base + 1e-5, f"{name}: kernel error {err:.3g} > 2 x PyTorch bf16 error {base:.3g}"


def test_selection_bf16_matches_reference_up_to_near_ties():
    torch.manual_seed(0)
    cfg = SparseAttentionConfig(block_size=64, topk_blocks=12, sink_blocks=1, window_blocks=3, query_blocks=4)
    t, hq, h, d = 3000, 32, 2, 128
    q = torch.randn(1, t, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, t, h, d, device="cuda", dtype=torch.bfloat16)
    ev = torch.randn(1, t, h, device="cuda")
    positions = torch.arange(t, device="cuda")
    num_blocks = -(-t // 64)
    ck = ref.compress_keys(k, 32, 16)
    torch.testing.assert_close(ks.compress_keys(k, 32, 16), ck, atol=1e-2, rtol=1e-2)
    ag = ref.agnostic_chunk_scores(ev, 32, 16)
    qa_ref = ref.pool_to_blocks(ref.query_aware_chunk_scores(q, ck, positions, 32, 16), positions, num_blocks, cfg)
    qa = ks.query_aware_block_scores(q, ck, positions, num_blocks, cfg)
    finite = torch.isfinite(qa_ref)
    assert torch.equal(finite, torch.isfinite(qa))
    torch.testing.assert_close(qa[finite], qa_ref[finite], atol=1e-5, rtol=1e-4)
    ag_blocks = ref.pool_to_blocks(ag.transpose(1, 2).unsqueeze(1), positions, num_blocks, cfg)
    # Composition: exact on identical scores.
    assert torch.equal(ks.select_blocks(qa_ref, ag_blocks, positions, cfg), ref.select_blocks(qa_ref, ag_blocks, positions, cfg))
    # Pipeline: rows may differ only where the reference's scores nearly tie (float32 summation order).
    got = ks.select_for_queries(q, ck, ag, positions, num_blocks, cfg)
    want = ref.select_for_queries(q, ck, ag, positions, num_blocks, cfg)
    differ = (got != want).any(-1)
    assert differ.float().mean().item() < 1e-3
    for b, tq, hh in differ.nonzero().tolist():
        # The query-aware quota boundary must be a near-tie: the quota-th and next candidate scores.
        own = tq // 64
        blocks = torch.arange(num_blocks, device="cuda")
        candidate = (blocks <= own) & (blocks >= cfg.sink_blocks) & (blocks < own - cfg.window_blocks)
        scores = qa_ref[b, tq, hh][candidate].sort(descending=True).values
        quota = cfg.query_aware_quota
        gap = (scores[quota - 1] - scores[quota]).item()
        assert gap <= 1e-5, f"row {(b, tq, hh)} differs but its quota boundary gap is {gap:.3g}"


@pytest.mark.parametrize("hq,h,d", [(32, 2, 128), (4, 4, 64)])
def test_decode_bf16_tolerance_rule(hq, h, d):
    torch.manual_seed(0)
    batch, slots = 4, 4096
    q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, slots, h, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(batch, slots, h, d, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(batch, slots, h, device="cuda")
    valid = torch.rand(batch, slots, h, device="cuda") > 0.2
    got = kd.decode_attention(q, k, v, bias, valid)
    exact = ref.decode_attention(q.float(), k.float(), v.float(), bias, valid)
    group = hq // h
    logits = (q[:, :, None, :] @ k.repeat_interleave(group, 2).permute(0, 2, 3, 1)).squeeze(2) / math.sqrt(d)
    logits = logits + bias.to(q.dtype).repeat_interleave(group, 2).transpose(1, 2)
    logits = logits.masked_fill(~valid.repeat_interleave(group, 2).transpose(1, 2), float("-inf"))
    torch_bf16 = (torch.softmax(logits, -1)[:, :, None, :] @ v.repeat_interleave(group, 2).transpose(1, 2)).squeeze(2)
    err = (got.float() - exact).abs().max().item()
    base = (torch_bf16.float() - exact).abs().max().item()
    assert err <= 2 * base + 1e-5, f"decode error {err:.3g} > 2 x PyTorch bf16 error {base:.3g}"


def test_nosa_attention_bf16_model_shape_gradients_reach_eviction():
    torch.manual_seed(0)
    cfg = SparseAttentionConfig()
    t = 5000
    q = torch.randn(1, t, 32, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, t, 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, t, 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ev = (0.1 * torch.randn(1, t, 2, device="cuda")).requires_grad_()
    out, idx = kp.nosa_attention(q, k, v, ev, cfg, return_indices=True)
    out.float().square().mean().backward()
    assert idx.shape == (1, t, 2, 64)
    assert torch.isfinite(ev.grad).all() and ev.grad.abs().sum() > 0
    assert all(torch.isfinite(x.grad.float()).all() for x in (q, k, v))


def test_mixed_dtypes_under_autocast_compile_and_match():
    """What training under bf16 autocast feeds the layer op: q, k float32 (after RoPE), v bf16."""
    torch.manual_seed(0)
    cfg = SparseAttentionConfig(block_size=64, topk_blocks=8, sink_blocks=1, window_blocks=2, query_blocks=2)
    t = 700
    q = torch.randn(1, t, 8, 64, device="cuda", requires_grad=True)
    k = torch.randn(1, t, 2, 64, device="cuda", requires_grad=True)
    v = torch.randn(1, t, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ev = torch.randn(1, t, 2, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, idx = kp.nosa_attention(q, k, v, ev, cfg, return_indices=True)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, ev), grad_out)
    out_ref = ref.nosa_attention(q, k, v.float(), ev, cfg)
    want = torch.autograd.grad(out_ref, (q, k, v, ev), grad_out)
    assert out.dtype == torch.float32 and got[2].dtype == torch.bfloat16
    torch.testing.assert_close(out, out_ref, atol=1e-4, rtol=1e-4)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), atol=2e-2, rtol=2e-2)


def test_deterministic_backward_bf16_is_bit_identical_and_within_rule():
    torch.manual_seed(0)
    cfg = SparseAttentionConfig(block_size=64, topk_blocks=8, sink_blocks=1, window_blocks=2, query_blocks=2)
    t, hq, h, d = 1500, 32, 2, 128
    q = torch.randn(1, t, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, t, h, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, t, h, d, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(1, t, h, device="cuda")
    positions = torch.arange(t, device="cuda")
    indices = kp.select_all(q, k, bias, positions, cfg)
    grad_out = torch.randn(1, t, hq, d, device="cuda")
    run = lambda: _grads(lambda *x: ka.sparse_attention(*x, indices, positions, 64, deterministic=True), (q, k, v, bias), grad_out)
    first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    exact = _grads(lambda q, k, v, b: ref.sparse_attention(q.float(), k.float(), v.float(), b, indices, positions, 64), (q, k, v, bias), grad_out)
    torch_bf16 = _grads(lambda *x: _torch_bf16_attention(*x, indices, positions, 64), (q, k, v, bias), grad_out)
    for name, a, b, c in zip(["o", "dq", "dk", "dv", "dbias"], first, exact, torch_bf16):
        err = (a.float() - b.float()).abs().max().item()
        base = (c.float() - b.float()).abs().max().item()
        assert err <= 2 * base + 1e-5, f"{name}: kernel error {err:.3g} > 2 x PyTorch bf16 error {base:.3g}"


def test_varlen_bf16_equals_each_sequence_alone():
    torch.manual_seed(0)
    cfg = SparseAttentionConfig()
    lengths = [1300, 77, 2101]
    total = sum(lengths)
    q = torch.randn(1, total, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, total, 2, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, total, 2, 128, device="cuda", dtype=torch.bfloat16)
    ev = 0.5 * torch.rand(1, total, 2, device="cuda")
    cu = torch.tensor([0] + lengths).cumsum(0)
    out = kp.nosa_attention_varlen(q, k, v, ev, cu, cfg)
    for s in range(len(lengths)):
        sl = slice(int(cu[s]), int(cu[s + 1]))
        alone = kp.nosa_attention(q[:, sl], k[:, sl], v[:, sl], ev[:, sl], cfg)
        torch.testing.assert_close(out[:, sl].float(), alone.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("splits", [None, 3])
def test_paged_decode_equals_slot_decode_bit_for_bit_on_cuda(splits):
    """The one-copy path (offload off) on the GPU: reading the store's pages through a block table gives
    the slot path's bf16 result over the same values exactly (same tiles, same order)."""
    torch.manual_seed(0)
    batch, h, hq, d, block, slots, pages = 3, 2, 16, 128, 64, 40, 200
    pages_k = torch.randn(pages, h, block, d, device="cuda", dtype=torch.bfloat16)
    pages_v = torch.randn(pages, h, block, d, device="cuda", dtype=torch.bfloat16)
    table = torch.randint(0, pages, (batch, h, slots), device="cuda", dtype=torch.int32)
    table[0, 1, :5] = -1
    q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16)
    valid = torch.rand(batch, slots * block, h, device="cuda") > 0.2
    bias = torch.randn(batch, slots * block, h, device="cuda")
    k_slots, v_slots = ref.paged_slots(pages_k, table), ref.paged_slots(pages_v, table)
    want = kd.decode_attention(q, k_slots, v_slots, bias, ref.paged_valid(valid, table, block), splits=splits)
    got = kd.decode_attention(q, pages_k, pages_v, bias, valid, table, splits=splits)
    assert torch.equal(got, want)


@pytest.mark.parametrize("length,batch,chunks", [(20000, 6, None), (9001, 5, 7)])
def test_split_block_scores_bf16_match_reference_up_to_near_ties(length, batch, chunks):
    """The split path (decode: one query per row) on the GPU: the -inf pattern equal, scores within the
    fused kernel's tolerance of the float32 reference, and a selection differing from the fused kernel's
    only where the fused scores nearly tie at the query-aware quota boundary."""
    torch.manual_seed(0)
    cfg = SparseAttentionConfig()
    hq, h, d = 32, 2, 128
    num_windows = ref.num_complete_windows(length, 32, 16)
    num_blocks = -(-length // 64)
    q = torch.randn(batch, 1, hq, d, device="cuda", dtype=torch.bfloat16)
    ck = (0.5 * torch.randn(batch, num_windows, h, d, device="cuda")).to(torch.bfloat16)
    positions = torch.tensor([length - 1], device="cuda")
    chunks = chunks or ks.score_chunks(1, hq // h, batch, h, num_windows, "cuda")
    assert chunks > 1
    got = ks.query_aware_block_scores_split(q, ck, positions, num_blocks, cfg, chunks)
    fused = ks.query_aware_block_scores_fused(q, ck, positions, num_blocks, cfg)
    want = ref.query_aware_block_scores(q.float(), ck.float(), positions, num_blocks, cfg)
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got)) and torch.equal(finite, torch.isfinite(fused))
    torch.testing.assert_close(got[finite], want[finite], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[finite], fused[finite], atol=1e-5, rtol=1e-4)
    differ = (ks.select_blocks(got, None, positions, cfg) != ks.select_blocks(fused, None, positions, cfg)).any(-1)
    own = (length - 1) // 64
    blocks = torch.arange(num_blocks, device="cuda")
    candidate = (blocks <= own) & (blocks >= cfg.sink_blocks) & (blocks < own - cfg.window_blocks)
    for b, t, hh in differ.nonzero().tolist():
        scores = fused[b, t, hh][candidate].sort(descending=True).values
        gap = (scores[cfg.query_aware_quota - 1] - scores[cfg.query_aware_quota]).item()
        assert gap <= 1e-5, f"row {(b, t, hh)} differs but its quota boundary gap is {gap:.3g}"


def test_eviction_scores_kernel_on_cuda_matches_float64_and_graphs():
    # The 8B shape (2 KV heads x 128) and an odd one, bf16 values and parameters as in an inference model:
    # the kernel computes in float32 like the reference, so it is within float32 rounding of the float64
    # truth and no further from it than PyTorch's own float32 arithmetic (2x rule); a CUDA graph replays it.
    from nosa.ops.kernels import eviction as ke

    for B, T, H, D in [(48, 1, 2, 128), (2, 1031, 3, 40)]:
        g = torch.Generator(device="cuda").manual_seed(B)
        v = torch.randn(B, T, H, D, device="cuda", generator=g).to(torch.bfloat16)
        weight = (torch.randn(H, H * D, device="cuda", generator=g) * 0.05).to(torch.bfloat16)
        bias = torch.randn(H, device="cuda", generator=g).to(torch.bfloat16)
        A = torch.rand(H, device="cuda", generator=g).to(torch.bfloat16)
        got = ke.eviction_scores(v, weight, bias, A)
        exact = ref.eviction_scores(v.double(), weight.double(), bias.double(), A.double())
        torch_f32 = ref.eviction_scores(v, weight, bias, A)
        err, base = (got.double() - exact).abs().max().item(), (torch_f32.double() - exact).abs().max().item()
        assert got.dtype == torch.float32 and err <= 2 * base + 1e-6, (err, base)
    # the softplus tails (raw far below 0, around the threshold 20, above it) against float64, relative
    for shift in (-40.0, -16.0, -5.0, 19.9, 20.1, 60.0):
        v32, w32 = v.float() * 1e-3, weight.float()
        b32, a32 = torch.full_like(bias, shift, dtype=torch.float32), A.float() + 0.5
        got = ke.eviction_scores(v32, w32, b32, a32)
        exact = ref.eviction_scores(v32.double(), w32.double(), b32.double(), a32.double())
        torch.testing.assert_close(got.double(), exact, atol=0, rtol=2e-5)
    graph, static_v = torch.cuda.CUDAGraph(), v.clone()
    ke.eviction_scores(static_v, weight, bias, A)  # compiled before capture
    with torch.cuda.graph(graph):
        out = ke.eviction_scores(static_v, weight, bias, A)
    static_v.copy_(v * 2)
    graph.replay()
    torch.testing.assert_close(out, ke.eviction_scores(v * 2, weight, bias, A), atol=0, rtol=0)


def _rms_norm_float64(x, weight, eps):
    x64 = x.double()
    return x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + eps) * weight.double()


def test_rms_norm_and_rotary_kernels_bf16_on_cuda_within_rule():
    # bf16 activations and parameters as in an inference model (the norm also with a float32 weight, as
    # under autocast), the 8B shape's decode rows (hidden 4096; 32 query and 2 KV heads of 128) and an odd
    # prefill-like shape. 2x rule against the float64 truth: the kernels' error is at most twice that of
    # PyTorch's own arithmetic (the reference ops on the same bf16 inputs). Rotary rounds exactly where the
    # reference does (products and sum separately, no FMA): equal to it bit for bit.
    from nosa.ops.kernels import norm_rope as kn

    for shape in [(48, 1, 4096), (2, 1031, 40)]:
        g = torch.Generator(device="cuda").manual_seed(shape[-1])
        x = (torch.randn(shape, device="cuda", generator=g) * 3).to(torch.bfloat16)
        w32 = 1 + 0.1 * torch.randn(shape[-1], device="cuda", generator=g)
        for weight in (w32.to(torch.bfloat16), w32):
            got, torch_ref = kn.rms_norm(x, weight, 1e-5), ref.rms_norm(x, weight, 1e-5)
            exact = _rms_norm_float64(x, weight, 1e-5)
            err, base = (got.double() - exact).abs().max().item(), (torch_ref.double() - exact).abs().max().item()
            assert got.dtype == torch_ref.dtype and err <= 2 * base + 1e-6, (shape, weight.dtype, err, base)
    for B, T, H, D in [(48, 1, 32, 128), (48, 1, 2, 128), (2, 1031, 3, 40)]:
        g = torch.Generator(device="cuda").manual_seed(B * T + H)
        x = torch.randn(B, T, H, D, device="cuda", generator=g).to(torch.bfloat16)
        freqs = torch.rand(B, T, D // 2, device="cuda", generator=g) * 1000
        emb = torch.cat((freqs, freqs), dim=-1)
        for cs_dtype in (torch.bfloat16, torch.float32):
            cos, sin = emb.cos().to(cs_dtype), emb.sin().to(cs_dtype)
            got, torch_ref = kn.apply_rotary(x, cos, sin), ref.apply_rotary(x, cos, sin)
            exact = ref.apply_rotary(x.double(), cos.double(), sin.double())
            err, base = (got.double() - exact).abs().max().item(), (torch_ref.double() - exact).abs().max().item()
            assert got.dtype == torch.bfloat16 and err <= 2 * base + 1e-6, ((B, T, H, D), cs_dtype, err, base)
            assert torch.equal(got, torch_ref), ((B, T, H, D), cs_dtype)


def test_rms_norm_and_rotary_layers_dispatch_on_cuda_and_graph():
    # On CUDA tensors without gradients the layers take the kernels ('auto'), and a CUDA graph of both ops
    # replays to what they compute eagerly on new inputs.
    from nosa import ops
    from nosa.layers import RMSNorm, apply_rotary
    from nosa.ops.kernels import norm_rope as kn

    norm = RMSNorm(4096, eps=1e-5).cuda().to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(4096, device="cuda"))
    h = torch.randn(48, 1, 4096, device="cuda").to(torch.bfloat16)
    q = torch.randn(48, 1, 32, 128, device="cuda").to(torch.bfloat16)
    emb = torch.rand(48, 1, 64, device="cuda") * 1000
    emb = torch.cat((emb, emb), dim=-1)
    cos, sin = emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)
    assert ops.resolve("rms_norm", h, norm.weight) is ops.dispatch._KERNELS["rms_norm"]
    with torch.no_grad():
        assert torch.equal(norm(h), kn.rms_norm(h, norm.weight, 1e-5))
        assert torch.equal(apply_rotary(q, cos, sin), kn.apply_rotary(q, cos, sin))
        graph = torch.cuda.CUDAGraph()
        static_h, static_q = h.clone(), q.clone()
        norm(static_h), apply_rotary(static_q, cos, sin)  # compiled before capture
        with torch.cuda.graph(graph):
            out_h = norm(static_h)
            out_q = apply_rotary(static_q, cos, sin)
        static_h.copy_(h * 2)
        static_q.copy_(q * 3)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out_h, kn.rms_norm(h * 2, norm.weight, 1e-5))
        assert torch.equal(out_q, kn.apply_rotary(q * 3, cos, sin))
