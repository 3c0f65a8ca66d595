"""`nosa bench kernels`: NOSA's Triton kernels against dense causal SDPA, side by side in one run.

For each context length: forward, forward+backward (selection included) and decode time (the attention
call over the selected slots alone, selection excluded) of one attention layer at the 8B shape (32 query
heads, 2 KV heads, head_dim 128, spec sec. 2 defaults), the same for torch's scaled_dot_product_attention
(causal, GQA heads expanded beforehand so it takes its fastest path) and for fla-core's NSA
selected-attention kernel on the same block indices (when importable), the atomic (non-deterministic)
backward and the first version of the changed pieces side by side, the speed-ups, a breakdown of where
NOSA's time goes, and the achieved fraction of the tensor-core ceiling
(attention FLOPs in the flash-attention convention: 4 per attended (query head, key) pair and head-dim
element forward, 14 forward+backward) or of the HBM ceiling (decode: bytes read and written).
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from nosa.bench.common import cuda_median_ms, graph_ms, hbm_copy_rate, write_result
from nosa.config import SparseAttentionConfig

# Ceilings measured on the lent H200 (docs: /work/shared/docs/gpu-box.md); the run re-measures HBM copy.
TENSOR_CORE_TFLOPS = 783.0


def attended_pairs(indices: torch.Tensor, positions: torch.Tensor, block_size: int, num_keys: int) -> int:
    """(query token, KV head, key) triples NOSA attends to. indices: [B, Tq, H, K]; positions: [Tq]."""
    blk = indices.long()
    start = blk * block_size
    end = torch.minimum(start + block_size, torch.minimum(positions.view(1, -1, 1, 1) + 1, torch.tensor(num_keys, device=blk.device)))
    return int(torch.where(blk >= 0, (end - start).clamp(min=0), 0).sum())


def tile_sharing(lists: torch.Tensor, counts: torch.Tensor, tile_tokens: int, num_queries: int) -> dict:
    """How the union of a query tile's blocks splits (`attention.build_tile_lists` output for num_queries
    tokens, whole tiles only): mean entries, entries every token of the tile selected (no masked rows:
    sinks, window, most of the agnostic fill) and entries one token alone selected (at 4 tokens a tile, 3/4
    of their rows masked: the union's waste)."""
    whole = num_queries // tile_tokens
    lists, counts = lists[..., :whole, :], counts[..., :whole]
    valid = torch.arange(lists.shape[-1], device=lists.device) < counts[..., None]
    bits = torch.where(valid, lists & 0xFFFF, 0)
    selected_by = sum((bits >> i) & 1 for i in range(tile_tokens))
    return {"union": float(counts.float().mean()),
            "in_every_token": float(((selected_by == tile_tokens) & valid).sum(-1).float().mean()),
            "one_token_only": float(((selected_by == 1) & valid).sum(-1).float().mean())}


def trace_tile_union(trace: torch.Tensor, tile_tokens: int) -> dict:
    """The tile union of a recorded selection trace [L, steps, H, K] (block ids, -1 unused; consecutive
    decode steps stand in for consecutive query tokens, each layer for a sequence): blocks per token and
    `tile_sharing`'s split of the union of `tile_tokens` consecutive tokens, with union / blocks per token,
    the forward's and dq's walked entries per attended one (random inputs: 1.52x at 32K, kernels_h200.json)."""
    from nosa.ops.kernels.attention import build_tile_lists

    idx = trace.to(torch.int32)
    lists, counts = build_tile_lists(idx, tile_tokens)
    sharing = tile_sharing(lists, counts, tile_tokens, idx.shape[1])
    per_token = float((idx >= 0).sum(-1).float().mean())
    return {"tile_tokens": tile_tokens, "blocks_per_token": per_token, **sharing,
            "union_per_token_blocks": sharing["union"] / per_token}


def _peer_fla():
    """fla-core's NSA selected-attention autograd function, or (None, reason) when it cannot be imported."""
    try:
        import fla
        from fla.ops.nsa.parallel import ParallelNSAFunction
    except Exception as err:  # noqa: BLE001 - any import failure means the peer column is absent
        return None, f"{type(err).__name__}: {err}"
    return (ParallelNSAFunction, getattr(fla, "__version__", "unknown")), None


def _ms(fn, args, length):
    reps = args.reps if length < 65536 else max(3, args.reps // 2)
    return cuda_median_ms(fn, args.warmup, reps)


def _bench_nosa(row, q, k, v, eviction, grad_out, positions, cfg, args, group):
    from nosa.ops.kernels import attention as ka
    from nosa.ops.kernels import pipeline as kp
    from nosa.ops.kernels import selection as ks

    length, d, hq = q.shape[1], q.shape[3], q.shape[2]
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, eviction)]
    tile_tokens = args.tile_tokens or ka.default_tile_tokens(group)

    def nosa_fwd():
        with torch.no_grad():
            return kp.nosa_attention(q, k, v, eviction, cfg, tile_tokens=tile_tokens)

    def nosa_fwd_bwd(deterministic=None):
        out = kp.nosa_attention(*leaves, cfg, tile_tokens=tile_tokens, deterministic=deterministic)
        out.backward(grad_out)

    indices = kp.select_all(q, k, eviction, positions, cfg)
    pairs = attended_pairs(indices, positions, cfg.block_size, length) * group
    row["nosa_attended_keys_per_query"] = pairs / (length * hq)
    row["nosa_selection_ms"] = _ms(lambda: kp.select_all(q, k, eviction, positions, cfg), args, length)
    row["nosa_fwd_ms"] = _ms(nosa_fwd, args, length)
    row["nosa_fwd_bwd_ms"] = _ms(nosa_fwd_bwd, args, length)
    # Side by side in this run: the atomic dk/dv backward (the default is the fixed-order one), and the first
    # version of every changed piece (arg-max composition, delta by PyTorch, the fixed 4-warp / 1-stage dk/dv
    # launch, atomics).
    row["nosa_fwd_bwd_atomic_ms"] = _ms(lambda: nosa_fwd_bwd(False), args, length)
    row["atomic_cost"] = row["nosa_fwd_bwd_atomic_ms"] / row["nosa_fwd_bwd_ms"]
    threshold = ks.SELECT_BY_THRESHOLD
    try:
        # The composition by counting threshold beside the default arg-max one (files before 2026-12-04
        # timed arg-max as the variant: nosa_selection_argmax_ms).
        ks.SELECT_BY_THRESHOLD = True
        row["nosa_selection_threshold_ms"] = _ms(lambda: kp.select_all(q, k, eviction, positions, cfg), args, length)
        ks.SELECT_BY_THRESHOLD = False
        with ka.tuning(fused_delta=False, dkv_autotune=False, descriptors=False):
            row["nosa_fwd_bwd_first_version_ms"] = _ms(lambda: nosa_fwd_bwd(False), args, length)
    finally:
        ks.SELECT_BY_THRESHOLD = threshold
    # Breakdown of the attention (selection excluded): tile lists, forward, backward.
    tile_tokens = ka.effective_tile_tokens(group, tile_tokens)
    lists, counts = ka.build_tile_lists(indices, tile_tokens)
    row["nosa_tile_union_blocks"] = float(counts.float().mean())
    row["nosa_tile_sharing"] = tile_sharing(lists, counts, tile_tokens, length)
    row["nosa_lists_ms"] = _ms(lambda: ka.build_tile_lists(indices, tile_tokens), args, length)
    row["nosa_attn_fwd_kernel_ms"] = _ms(
        lambda: ka.sparse_attention_forward(q, k, v, eviction, lists, counts, positions, cfg.block_size, tile_tokens), args, length)
    o, lse = ka.sparse_attention_forward(q, k, v, eviction, lists, counts, positions, cfg.block_size, tile_tokens)
    row["nosa_attn_bwd_ms"] = _ms(
        lambda: ka.sparse_attention_backward(grad_out, q, k, v, eviction, o, lse, lists, counts, indices, positions,
                                             cfg.block_size, tile_tokens), args, length)
    num_blocks = -(-length // cfg.block_size)
    row["nosa_invert_selection_ms"] = _ms(lambda: ka.invert_selection(indices, num_blocks), args, length)
    delta = torch.empty(lse.shape, device=q.device, dtype=torch.float32)
    row["nosa_dq_kernel_ms"] = _ms(  # with delta = rowsum(dO o) computed inside (the default)
        lambda: ka.backward_dq(grad_out, q, k, v, eviction, lse, delta, lists, counts, positions, cfg.block_size,
                               tile_tokens, o=o), args, length)
    _bench_descriptors(row, ka, q, k, v, eviction, grad_out, positions, cfg, args, lists, counts, o, lse, delta,
                       tile_tokens, nosa_fwd_bwd)
    inverted = ka.invert_selection(indices, num_blocks)

    def dkv(deterministic=True):
        ka.backward_dkv(grad_out, q, k, v, eviction, lse, delta, inverted, positions, cfg.block_size, tile_tokens,
                        deterministic=deterministic)

    row["nosa_dkv_kernel_ms"] = _ms(dkv, args, length)
    if length in args.sweep_lengths:
        # The dk/dv launch choices the autotuner picks from, pinned one at a time (rows per step: the
        # 64-row tile or twice it; 8 warps are chosen automatically for the taller step).
        sweep = {}
        for name, knobs in (("4w1s_64rows_first", dict(dkv_autotune=False)), ("4w2s_64rows", dict(dkv_stages=2)),
                            ("4w3s_64rows", dict(dkv_stages=3)), ("8w1s_128rows", dict(dkv_tokens=2 * tile_tokens)),
                            ("8w2s_128rows", dict(dkv_tokens=2 * tile_tokens, dkv_stages=2))):
            with ka.tuning(**knobs):
                sweep[name] = _ms(dkv, args, length)
        sweep["autotuned"] = row["nosa_dkv_kernel_ms"]
        row["nosa_dkv_sweep_ms"] = sweep
        row["nosa_dkv_atomic_kernel_ms"] = _ms(lambda: dkv(False), args, length)
    row["nosa_dkv_autotuned_configs"] = sorted({str(c) for c in ka._bwd_dkv_tuned.cache.values()})
    fwd_flops = 4.0 * pairs * d
    row["nosa_fwd_tflops"] = fwd_flops / (row["nosa_fwd_ms"] * 1e9)
    row["nosa_fwd_bwd_tflops"] = 3.5 * fwd_flops / (row["nosa_fwd_bwd_ms"] * 1e9)
    row["nosa_attn_fwd_kernel_tflops"] = fwd_flops / (row["nosa_attn_fwd_kernel_ms"] * 1e9)
    del leaves, o, lse, lists, counts, inverted, delta
    torch.cuda.empty_cache()
    return indices


def _bench_descriptors(row, ka, q, k, v, eviction, grad_out, positions, cfg, args, lists, counts, o, lse, delta,
                       tile_tokens, nosa_fwd_bwd):
    """The forward and dq kernels (and the whole forward+backward) with the K/V loads the default did not
    take, beside the default's figures timed above: tensor descriptors (`nosa_*_desc_ms`, bulk copies on
    Hopper) where the default is pointer loads, pointer loads (`nosa_*_pointer_ms`) where the default is
    descriptors (`attention.descriptors_by_default`), and how far the two forward outputs are apart. A
    compile or launch failure is recorded, not raised."""
    length = q.shape[1]
    meta, _ = ka._meta(q, k, cfg.block_size, tile_tokens)
    row["nosa_descriptors_possible"] = ka.kv_descriptors(k, v, meta["BLOCK_N"], meta["BLOCK_D"]) is not None
    row["nosa_descriptors_default"] = default = ka.descriptors_by_default(q.device, k.dtype)
    if not row["nosa_descriptors_possible"]:
        return
    arm = "pointer" if default else "desc"
    try:
        with ka.tuning(descriptors=not default):
            o_other, _ = ka.sparse_attention_forward(q, k, v, eviction, lists, counts, positions, cfg.block_size, tile_tokens)
            row["nosa_desc_fwd_max_abs_diff"] = float((o_other.float() - o.float()).abs().max())
            del o_other
            row[f"nosa_attn_fwd_kernel_{arm}_ms"] = _ms(
                lambda: ka.sparse_attention_forward(q, k, v, eviction, lists, counts, positions, cfg.block_size,
                                                    tile_tokens), args, length)
            row[f"nosa_dq_kernel_{arm}_ms"] = _ms(
                lambda: ka.backward_dq(grad_out, q, k, v, eviction, lse, delta, lists, counts, positions,
                                       cfg.block_size, tile_tokens, o=o), args, length)
            row[f"nosa_fwd_bwd_{arm}_ms"] = _ms(nosa_fwd_bwd, args, length)
    except Exception as err:  # noqa: BLE001 - a variant failing must not lose the default's figures
        row["descriptors_error"] = f"{type(err).__name__}: {err}"[:500]


def _bench_fla(row, fla, q, k, v, grad_out, indices, cfg, args):
    """fla-core's NSA selected attention on NOSA's block indices (it has no bias term: NOSA's figures
    include the eviction bias, fla's cannot)."""
    from nosa.ops.kernels import attention as ka

    nsa, version = fla
    row["fla_version"] = version
    length, d = q.shape[1], q.shape[3]
    scale = d ** -0.5
    idx = indices.long().contiguous()
    topk = idx.shape[-1]
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]

    def fwd():
        with torch.no_grad():
            return nsa.apply(q, k, v, idx, topk, cfg.block_size, scale, None)

    def fwd_bwd():
        nsa.apply(*leaves, idx, topk, cfg.block_size, scale, None).backward(grad_out)

    try:
        # Same function on the same indices: fla's output against NOSA's kernel without the bias.
        ours = ka.sparse_attention(q, k, v, None, indices, torch.arange(length, device=q.device), cfg.block_size)
        row["fla_max_abs_diff_vs_nosa_no_bias"] = float((fwd().float() - ours.float()).abs().max())
        del ours
        row["fla_fwd_ms"] = _ms(fwd, args, length)
        row["fla_fwd_bwd_ms"] = _ms(fwd_bwd, args, length)
        row["speedup_vs_fla_fwd"] = row["fla_fwd_ms"] / row["nosa_fwd_ms"]
        row["speedup_vs_fla_fwd_bwd"] = row["fla_fwd_bwd_ms"] / row["nosa_fwd_bwd_ms"]
    except Exception as err:  # noqa: BLE001 - the peer failing must not lose NOSA's figures
        row["fla_error"] = f"{type(err).__name__}: {err}"[:500]
    del leaves
    torch.cuda.empty_cache()


def _bench_dense(row, q, k, v, grad_out, args, group):
    length, hq, d = q.shape[1], q.shape[2], q.shape[3]
    qd = q.transpose(1, 2).contiguous()
    kd_ = k.transpose(1, 2).repeat_interleave(group, dim=1).contiguous()
    vd = v.transpose(1, 2).repeat_interleave(group, dim=1).contiguous()
    god = grad_out.transpose(1, 2).contiguous()
    dense_leaves = [x.detach().clone().requires_grad_() for x in (qd, kd_, vd)]

    def dense_fwd():
        with torch.no_grad():
            return F.scaled_dot_product_attention(qd, kd_, vd, is_causal=True)

    def dense_fwd_bwd():
        F.scaled_dot_product_attention(*dense_leaves, is_causal=True).backward(god)

    # Dense time grows with T^2: fewer repetitions at long context (medians of at least 3).
    reps = args.reps if length < 32768 else max(3, args.reps // (2 if length < 131072 else 3))
    row["dense_fwd_ms"] = cuda_median_ms(dense_fwd, args.warmup, reps)
    row["dense_fwd_bwd_ms"] = cuda_median_ms(dense_fwd_bwd, args.warmup, reps)
    dense_pairs = hq * length * (length + 1) / 2
    row["dense_fwd_tflops"] = 4.0 * dense_pairs * d / (row["dense_fwd_ms"] * 1e9)
    row["dense_fwd_bwd_tflops"] = 14.0 * dense_pairs * d / (row["dense_fwd_bwd_ms"] * 1e9)
    row["speedup_fwd"] = row["dense_fwd_ms"] / row["nosa_fwd_ms"]
    row["speedup_fwd_bwd"] = row["dense_fwd_bwd_ms"] / row["nosa_fwd_bwd_ms"]
    del dense_leaves, qd, kd_, vd, god
    torch.cuda.empty_cache()


def _bench_decode(row, length, args, cfg, device, gen, variants: bool):
    """One query per sequence: NOSA over its topk x block_size slots, dense SDPA over all tokens."""
    from nosa.ops.kernels import decode as kd

    dtype = torch.bfloat16
    hq, h, d = args.heads, args.kv_heads, args.head_dim
    batch = args.decode_batch
    slots = cfg.topk_blocks * cfg.block_size
    qq = torch.randn(batch, hq, d, device=device, dtype=dtype, generator=gen)
    ks_ = torch.randn(batch, slots, h, d, device=device, dtype=dtype, generator=gen)
    vs = torch.randn(batch, slots, h, d, device=device, dtype=dtype, generator=gen)
    bias = 0.5 * torch.rand(batch, slots, h, device=device, generator=gen)
    valid = torch.ones(batch, slots, h, device=device, dtype=torch.bool)
    nosa_bytes = 2 * ks_.numel() * 2 + bias.numel() * 4 + valid.numel() + 2 * qq.numel() * 2
    row["nosa_decode_bytes"] = nosa_bytes
    row["nosa_decode_ms"] = graph_ms(lambda: kd.decode_attention(qq, ks_, vs, bias, valid))
    row["nosa_decode_gbps"] = nosa_bytes / (row["nosa_decode_ms"] * 1e6)
    if variants:
        # The first version (partials merged by a second kernel) and other slot splits, same inputs.
        row["nosa_decode_variants_ms"] = {
            "merge_kernel_first": graph_ms(lambda: kd.decode_attention(qq, ks_, vs, bias, valid, fused_merge=False)),
            # around the default split count (8 here since PROGRAMS_PER_SM = 4; 16 before, 32 measured slower)
            **{f"fused_splits_{n}": graph_ms(lambda n=n: kd.decode_attention(qq, ks_, vs, bias, valid, splits=n))
               for n in (4, 8, 16, 32)},
        }
    del ks_, vs, bias, valid
    kc = torch.randn(batch, h, length, d, device=device, dtype=dtype, generator=gen)
    vc = torch.randn(batch, h, length, d, device=device, dtype=dtype, generator=gen)
    q4 = qq[:, :, None, :]
    row["dense_decode_ms"] = graph_ms(lambda: F.scaled_dot_product_attention(q4, kc, vc, enable_gqa=True))
    dense_bytes = 2 * kc.numel() * 2 + 2 * qq.numel() * 2
    row["dense_decode_gbps"] = dense_bytes / (row["dense_decode_ms"] * 1e6)
    row["speedup_decode"] = row["dense_decode_ms"] / row["nosa_decode_ms"]
    del kc, vc
    torch.cuda.empty_cache()


def training_inputs(length: int, heads: int, kv_heads: int, head_dim: int, device, gen: torch.Generator):
    """One training sequence's random bf16 q [1, T, heads, D], k, v [1, T, kv_heads, D], eviction scores
    [1, T, kv_heads], the output gradient and positions [T], drawn from `gen` (the kernel bench and its probes)."""
    dtype = torch.bfloat16
    q = torch.randn(1, length, heads, head_dim, device=device, dtype=dtype, generator=gen)
    k = torch.randn(1, length, kv_heads, head_dim, device=device, dtype=dtype, generator=gen)
    v = torch.randn(1, length, kv_heads, head_dim, device=device, dtype=dtype, generator=gen)
    # A plausible eviction score scale: A * softplus(.) of order 0.1-1.
    eviction = 0.5 * F.softplus(torch.randn(1, length, kv_heads, device=device, generator=gen))
    grad_out = torch.randn_like(q)
    return q, k, v, eviction, grad_out, torch.arange(length, device=device)


def _bench_length(length: int, args, cfg: SparseAttentionConfig, device, fla, first: bool) -> dict:
    from nosa.ops.kernels import attention as ka

    hq, h, d = args.heads, args.kv_heads, args.head_dim
    group = hq // h
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, eviction, grad_out, positions = training_inputs(length, hq, h, d, device, gen)
    row = {"tokens": length, "tile_tokens": args.tile_tokens or ka.default_tile_tokens(group)}
    indices = _bench_nosa(row, q, k, v, eviction, grad_out, positions, cfg, args, group)
    if fla is not None and not args.skip_fla:
        _bench_fla(row, fla, q, k, v, grad_out, indices, cfg, args)
    del indices
    if not args.skip_dense:
        _bench_dense(row, q, k, v, grad_out, args, group)
    del q, k, v, eviction, grad_out
    torch.cuda.empty_cache()
    if not args.skip_decode:
        _bench_decode(row, length, args, cfg, device, gen, variants=first)
    return row


def _fmt(row, key, scale=1.0, width=7, digits=2):
    value = row.get(key)
    return f"{'-':>{width}}" if value is None else f"{scale * value:>{width}.{digits}f}"


def _print_table(rows) -> None:
    print(f"{'T':>6} {'sel':>6} {'fwd':>7} {'SDPA':>7} {'fla':>7} {'fwd+bwd':>7} {'atomic':>7} {'first':>7} {'SDPA':>7} "
          f"{'x SDPA':>6} {'fla':>7} {'x fla':>6} {'TC%':>5} {'dec us':>6} {'HBM%':>5}")
    for r in rows:
        if "error" in r:
            print(f"{r['tokens']:>6} {r['error'][:100]}")
            continue
        print(f"{r['tokens']:>6} {_fmt(r, 'nosa_selection_ms', width=6)} {_fmt(r, 'nosa_fwd_ms')} {_fmt(r, 'dense_fwd_ms')} "
              f"{_fmt(r, 'fla_fwd_ms')} {_fmt(r, 'nosa_fwd_bwd_ms')} {_fmt(r, 'nosa_fwd_bwd_atomic_ms')} "
              f"{_fmt(r, 'nosa_fwd_bwd_first_version_ms')} {_fmt(r, 'dense_fwd_bwd_ms')} {_fmt(r, 'speedup_fwd_bwd', width=6)} "
              f"{_fmt(r, 'fla_fwd_bwd_ms')} {_fmt(r, 'speedup_vs_fla_fwd_bwd', width=6)} "
              f"{_fmt(r, 'nosa_fwd_bwd_tc_fraction', 100, 5, 1)} {_fmt(r, 'nosa_decode_ms', 1000, 6, 1)} "
              f"{_fmt(r, 'nosa_decode_hbm_fraction', 100, 5, 1)}")


def run(args) -> int:
    if not torch.cuda.is_available():
        raise SystemExit("nosa bench kernels needs a CUDA GPU (the kernels are Triton; the reference is not timed)")
    device = torch.device("cuda")
    cfg = SparseAttentionConfig(block_size=args.block_size, topk_blocks=args.topk_blocks)
    hbm = hbm_copy_rate(device)
    group = args.heads // args.kv_heads
    fla, fla_missing = (None, "skipped (--skip-fla)") if args.skip_fla else _peer_fla()
    if fla is not None and (group < 16 or group & (group - 1)):
        fla, fla_missing = None, f"fla's NSA kernel needs a power-of-2 GQA group >= 16 (this shape has {group})"
    if fla is None:
        print(f"fla peer column absent: {fla_missing}", flush=True)
    parameters = {
        "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "dtype": "bfloat16",
        "batch": 1, "decode_batch": args.decode_batch, "lengths": args.lengths, "warmup": args.warmup, "reps": args.reps,
        "sparse": {name: getattr(cfg, name) for name in cfg.__dataclass_fields__},
        "ceilings": {"tensor_core_tflops": TENSOR_CORE_TFLOPS, "hbm_copy_bytes_per_s_measured": hbm},
        "fla": {"version": fla[1]} if fla is not None else {"absent": fla_missing},
        "notes": "times are medians of CUDA-event timings; NOSA fwd and fwd+bwd include selection and the eviction "
                 "bias; fla (fla-core's NSA selected attention, ParallelNSAFunction) runs on NOSA's block indices "
                 "without a bias (it has none), selection excluded; dense SDPA gets GQA heads expanded outside the "
                 "timing; FLOPs per attended pair and head dim: fwd 4, fwd+bwd 14 (flash-attention convention, for "
                 "both methods); *_first_version_ms = the same call with the earlier pieces (arg-max composition, now the default again; "
                 "delta by PyTorch, fixed 4-warp 1-stage dk/dv launch); NOSA's fwd+bwd and dk/dv figures are the default fixed-order (deterministic) backward, *_atomic_ms the same with float32 atomics (deterministic=False); nosa_dkv_sweep_ms times the fixed-order dk/dv kernel (files before 2026-12-04: the atomic one); "
                 "the default loads K/V through tensor descriptors on compute capability >= 9 (nosa_descriptors_default); *_pointer_ms there, *_desc_ms elsewhere = the forward / dq kernels (and the whole fwd+bwd) with the other loads; decode bytes = K+V+bias+valid+q+o; decode times are per call from CUDA-graph replays of 20 "
                 "back-to-back calls (launch overhead excluded, as in the engine) of the attention over the slots alone: "
                 "NOSA's decode-time selection and the engine's bookkeeping are not timed (speedup_decode is the attention's).",
    }
    rows = []
    path = None
    for i, length in enumerate(args.lengths):
        try:
            row = _bench_length(length, args, cfg, device, fla, first=i == 0)
        except torch.cuda.OutOfMemoryError as err:
            # Long lengths may not fit (dense SDPA's expanded K/V, deterministic partials): say so, go on.
            row = {"tokens": length, "error": f"out of memory: {str(err)[:300]}"}
            torch.cuda.empty_cache()
        if "error" not in row:
            row["nosa_fwd_bwd_tc_fraction"] = row["nosa_fwd_bwd_tflops"] / TENSOR_CORE_TFLOPS
            if "dense_fwd_bwd_tflops" in row:
                row["dense_fwd_bwd_tc_fraction"] = row["dense_fwd_bwd_tflops"] / TENSOR_CORE_TFLOPS
            if "nosa_decode_gbps" in row:
                row["nosa_decode_hbm_fraction"] = row["nosa_decode_gbps"] * 1e9 / hbm
                row["dense_decode_hbm_fraction"] = row["dense_decode_gbps"] * 1e9 / hbm
        rows.append(row)
        print(json.dumps(row), flush=True)
        # Written after every length, so a run cut short keeps what it measured.
        path = write_result(args.name, parameters, rows, directory=args.out_dir) if args.out_dir else write_result(args.name, parameters, rows)
    _print_table(rows)
    print(f"wrote {path}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("kernels", help="NOSA Triton kernels vs dense SDPA: fwd, fwd+bwd, decode")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768, 65536])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--topk-blocks", type=int, default=64)
    parser.add_argument("--decode-batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--tile-tokens", type=int, default=None, help="query tokens per attention program (default: by GQA group)")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--skip-fla", action="store_true", help="leave out the fla-core NSA peer")
    parser.add_argument("--skip-dense", action="store_true", help="leave out dense SDPA")
    parser.add_argument("--sweep-lengths", type=int, nargs="*", default=[32768],
                        help="lengths at which the dk/dv launch choices are timed one by one")
    parser.add_argument("--name", default="kernels")
    parser.add_argument("--out-dir", default=None, help="directory of the JSON result (default bench/results)")
    parser.set_defaults(func=run)
