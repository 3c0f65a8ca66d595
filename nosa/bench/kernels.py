"""`nosa bench kernels`: NOSA's Triton kernels against dense causal SDPA, side by side in one run.

For each context length: forward, forward+backward (selection included) and decode time of one attention
layer at the 8B shape (32 query heads, 2 KV heads, head_dim 128, spec sec. 2 defaults), the same for
torch's scaled_dot_product_attention (causal, GQA heads expanded beforehand so it takes its fastest path),
the speed-up, a breakdown of where NOSA's time goes, and the achieved fraction of the tensor-core ceiling
(attention FLOPs in the flash-attention convention: 4 per attended (query head, key) pair and head-dim
element forward, 14 forward+backward) or of the HBM ceiling (decode: bytes read and written).
"""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F

from nosa.bench.common import cuda_median_ms, write_result
from nosa.results.header import machine_header
from nosa.config import SparseAttentionConfig

# Ceilings measured on the lent H200 (docs: /work/shared/docs/gpu-box.md); the run re-measures HBM copy.
TENSOR_CORE_TFLOPS = 783.0


def _graph_ms(fn, calls: int = 20, reps: int = 10) -> float:
    """Per-call GPU time of `fn` replayed from a CUDA graph of `calls` back-to-back calls (median of
    `reps` replays): decode steps run from graphs, so launch overhead is not part of what is measured."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up outside capture (compiles and autotunes)
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return cuda_median_ms(graph.replay, 2, reps) / calls


def _copy_bandwidth(device) -> float:
    """HBM copy rate in bytes/s (read + write counted), 1 GiB bf16."""
    a = torch.empty(1 << 29, device=device, dtype=torch.bfloat16)
    b = torch.empty_like(a)
    ms = cuda_median_ms(lambda: b.copy_(a), 3, 10)
    rate = 2 * a.numel() * a.element_size() / (ms * 1e-3)
    del a, b
    return rate


def attended_pairs(indices: torch.Tensor, positions: torch.Tensor, block_size: int, num_keys: int) -> int:
    """(query token, KV head, key) triples NOSA attends to. indices: [B, Tq, H, K]; positions: [Tq]."""
    blk = indices.long()
    start = blk * block_size
    end = torch.minimum(start + block_size, torch.minimum(positions.view(1, -1, 1, 1) + 1, torch.tensor(num_keys, device=blk.device)))
    return int(torch.where(blk >= 0, (end - start).clamp(min=0), 0).sum())


def _bench_length(length: int, args, cfg: SparseAttentionConfig, device) -> dict:
    from nosa.ops.kernels import attention as ka
    from nosa.ops.kernels import decode as kd
    from nosa.ops.kernels import pipeline as kp

    dtype = torch.bfloat16
    hq, h, d = args.heads, args.kv_heads, args.head_dim
    group = hq // h
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, length, hq, d, device=device, dtype=dtype, generator=gen)
    k = torch.randn(1, length, h, d, device=device, dtype=dtype, generator=gen)
    v = torch.randn(1, length, h, d, device=device, dtype=dtype, generator=gen)
    # A plausible eviction score scale: A * softplus(.) of order 0.1-1.
    eviction = 0.5 * F.softplus(torch.randn(1, length, h, device=device, generator=gen))
    grad_out = torch.randn_like(q)
    positions = torch.arange(length, device=device)
    warm, reps = args.warmup, args.reps
    row = {"tokens": length, "tile_tokens": args.tile_tokens or None}

    # --- NOSA --------------------------------------------------------------------------------------
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, eviction)]

    tile_tokens = args.tile_tokens or ka.default_tile_tokens(group)

    def nosa_fwd():
        with torch.no_grad():
            return kp.nosa_attention(q, k, v, eviction, cfg, tile_tokens=tile_tokens)

    def nosa_fwd_bwd():
        out = kp.nosa_attention(*leaves, cfg, tile_tokens=tile_tokens)
        out.backward(grad_out)

    indices = kp.select_all(q, k, eviction, positions, cfg)
    pairs = attended_pairs(indices, positions, cfg.block_size, length) * group
    row["nosa_attended_keys_per_query"] = pairs / (length * hq)
    row["nosa_selection_ms"] = cuda_median_ms(lambda: kp.select_all(q, k, eviction, positions, cfg), warm, reps)
    row["nosa_fwd_ms"] = cuda_median_ms(nosa_fwd, warm, reps)
    row["nosa_fwd_bwd_ms"] = cuda_median_ms(nosa_fwd_bwd, warm, reps)
    # Breakdown of the attention (selection excluded): tile lists, forward, backward.
    tile_tokens = ka.effective_tile_tokens(group, tile_tokens)
    lists, counts = ka.build_tile_lists(indices, tile_tokens)
    row["nosa_tile_union_blocks"] = float(counts.float().mean())
    row["nosa_lists_ms"] = cuda_median_ms(lambda: ka.build_tile_lists(indices, tile_tokens), warm, reps)
    row["nosa_attn_fwd_kernel_ms"] = cuda_median_ms(
        lambda: ka.sparse_attention_forward(q, k, v, eviction, lists, counts, positions, cfg.block_size, tile_tokens), warm, reps)
    o, lse = ka.sparse_attention_forward(q, k, v, eviction, lists, counts, positions, cfg.block_size, tile_tokens)
    row["nosa_attn_bwd_ms"] = cuda_median_ms(
        lambda: ka.sparse_attention_backward(grad_out, q, k, v, eviction, o, lse, lists, counts, indices, positions,
                                             cfg.block_size, tile_tokens), warm, reps)
    num_blocks = -(-length // cfg.block_size)
    row["nosa_invert_selection_ms"] = cuda_median_ms(lambda: ka.invert_selection(indices, num_blocks), warm, reps)
    # dq and dk/dv kernels alone.
    delta = (grad_out.float() * o.float()).sum(-1)
    row["nosa_dq_kernel_ms"] = cuda_median_ms(
        lambda: ka.backward_dq(grad_out, q, k, v, eviction, lse, delta, lists, counts, positions, cfg.block_size, tile_tokens), warm, reps)
    inverted = ka.invert_selection(indices, num_blocks)
    row["nosa_dkv_kernel_ms"] = cuda_median_ms(
        lambda: ka.backward_dkv(grad_out, q, k, v, eviction, lse, delta, inverted, positions, cfg.block_size, tile_tokens), warm, reps)
    del inverted, delta
    fwd_flops = 4.0 * pairs * d
    row["nosa_fwd_tflops"] = fwd_flops / (row["nosa_fwd_ms"] * 1e9)
    row["nosa_fwd_bwd_tflops"] = 3.5 * fwd_flops / (row["nosa_fwd_bwd_ms"] * 1e9)
    row["nosa_attn_fwd_kernel_tflops"] = fwd_flops / (row["nosa_attn_fwd_kernel_ms"] * 1e9)
    del leaves, o, lse, lists, counts
    torch.cuda.empty_cache()

    # --- dense SDPA --------------------------------------------------------------------------------
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

    dense_reps = max(3, reps // 2) if length >= 32768 else reps
    row["dense_fwd_ms"] = cuda_median_ms(dense_fwd, warm, dense_reps)
    row["dense_fwd_bwd_ms"] = cuda_median_ms(dense_fwd_bwd, warm, dense_reps)
    dense_pairs = hq * length * (length + 1) / 2
    row["dense_fwd_tflops"] = 4.0 * dense_pairs * d / (row["dense_fwd_ms"] * 1e9)
    row["dense_fwd_bwd_tflops"] = 14.0 * dense_pairs * d / (row["dense_fwd_bwd_ms"] * 1e9)
    row["speedup_fwd"] = row["dense_fwd_ms"] / row["nosa_fwd_ms"]
    row["speedup_fwd_bwd"] = row["dense_fwd_bwd_ms"] / row["nosa_fwd_bwd_ms"]
    del dense_leaves, qd, kd_, vd, god
    torch.cuda.empty_cache()

    if args.skip_decode:
        return row
    # --- decode: one query per sequence; NOSA over its topk x block_size slots, dense over all tokens --
    batch = args.decode_batch
    slots = cfg.topk_blocks * cfg.block_size
    qq = torch.randn(batch, hq, d, device=device, dtype=dtype, generator=gen)
    ks = torch.randn(batch, slots, h, d, device=device, dtype=dtype, generator=gen)
    vs = torch.randn(batch, slots, h, d, device=device, dtype=dtype, generator=gen)
    bias = 0.5 * torch.rand(batch, slots, h, device=device, generator=gen)
    valid = torch.ones(batch, slots, h, device=device, dtype=torch.bool)
    row["nosa_decode_ms"] = _graph_ms(lambda: kd.decode_attention(qq, ks, vs, bias, valid))
    nosa_bytes = 2 * ks.numel() * 2 + bias.numel() * 4 + valid.numel() + 2 * qq.numel() * 2
    row["nosa_decode_bytes"] = nosa_bytes
    row["nosa_decode_gbps"] = nosa_bytes / (row["nosa_decode_ms"] * 1e6)
    del ks, vs, bias, valid
    kc = torch.randn(batch, h, length, d, device=device, dtype=dtype, generator=gen)
    vc = torch.randn(batch, h, length, d, device=device, dtype=dtype, generator=gen)
    q4 = qq[:, :, None, :]
    row["dense_decode_ms"] = _graph_ms(lambda: F.scaled_dot_product_attention(q4, kc, vc, enable_gqa=True))
    dense_bytes = 2 * kc.numel() * 2 + 2 * qq.numel() * 2
    row["dense_decode_gbps"] = dense_bytes / (row["dense_decode_ms"] * 1e6)
    row["speedup_decode"] = row["dense_decode_ms"] / row["nosa_decode_ms"]
    del kc, vc
    torch.cuda.empty_cache()
    return row


def run(args) -> int:
    if not torch.cuda.is_available():
        raise SystemExit("nosa bench kernels needs a CUDA GPU (the kernels are Triton; the reference is not timed)")
    device = torch.device("cuda")
    cfg = SparseAttentionConfig(block_size=args.block_size, topk_blocks=args.topk_blocks)
    hbm = _copy_bandwidth(device)
    rows = []
    for length in args.lengths:
        row = _bench_length(length, args, cfg, device)
        row["nosa_fwd_bwd_tc_fraction"] = row["nosa_fwd_bwd_tflops"] / TENSOR_CORE_TFLOPS
        row["dense_fwd_bwd_tc_fraction"] = row["dense_fwd_bwd_tflops"] / TENSOR_CORE_TFLOPS
        if not args.skip_decode:
            row["nosa_decode_hbm_fraction"] = row["nosa_decode_gbps"] * 1e9 / hbm
            row["dense_decode_hbm_fraction"] = row["dense_decode_gbps"] * 1e9 / hbm
        rows.append(row)
        print(json.dumps(row), flush=True)
    header = f"{'T':>6} {'sel':>7} {'fwd':>8} {'dense':>8} {'x':>5} {'fwd+bwd':>8} {'dense':>8} {'x':>5} {'TC%':>5} {'dec us':>7} {'dense':>7} {'x':>5} {'HBM%':>5}"
    print(header)
    for r in rows:
        if args.skip_decode:
            continue
        print(f"{r['tokens']:>6} {r['nosa_selection_ms']:>7.2f} {r['nosa_fwd_ms']:>8.2f} {r['dense_fwd_ms']:>8.2f} "
              f"{r['speedup_fwd']:>5.2f} {r['nosa_fwd_bwd_ms']:>8.2f} {r['dense_fwd_bwd_ms']:>8.2f} {r['speedup_fwd_bwd']:>5.2f} "
              f"{100 * r['nosa_fwd_bwd_tc_fraction']:>5.1f} {1000 * r['nosa_decode_ms']:>7.1f} {1000 * r['dense_decode_ms']:>7.1f} "
              f"{r['speedup_decode']:>5.2f} {100 * r['nosa_decode_hbm_fraction']:>5.1f}")
    parameters = {
        "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "dtype": "bfloat16",
        "batch": 1, "decode_batch": args.decode_batch, "lengths": args.lengths, "warmup": args.warmup, "reps": args.reps,
        "sparse": {name: getattr(cfg, name) for name in cfg.__dataclass_fields__},
        "ceilings": {"tensor_core_tflops": TENSOR_CORE_TFLOPS, "hbm_copy_bytes_per_s_measured": hbm},
        "notes": "times are medians of CUDA-event timings; NOSA fwd and fwd+bwd include selection; dense SDPA gets "
                 "GQA heads expanded outside the timing; FLOPs per attended pair and head dim: fwd 4, fwd+bwd 14 "
                 "(flash-attention convention, for both methods); decode bytes = K+V+bias+valid+q+o; decode times are "
                 "per call from CUDA-graph replays of 20 back-to-back calls (launch overhead excluded, as in the engine).",
    }
    path = write_result(args.name, parameters, rows, directory=args.out_dir) if args.out_dir else write_result(args.name, parameters, rows)
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
    parser.add_argument("--name", default="kernels")
    parser.add_argument("--out-dir", default=None, help="directory of the JSON result (default bench/results)")
    parser.set_defaults(func=run)
