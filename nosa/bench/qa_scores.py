"""`nosa bench qa-scores`: the query-aware block score kernel at decode, fused (one program per (row, KV
head), the kernel before the split) against the split path (`score_chunks`' choice and a sweep of chunk
counts), on the engine's decode call: one query per row, each row's own position ([R, 1] positions, as
`ops.select_rows` passes them; here all at the last token), 8B layer shape (32 query heads, 2 KV heads,
head_dim 128, bf16), spec-default block 64 / kernel 32 / stride 16.

Per shape: GPU time per call with CUDA events, eager (one call per event pair) and from a CUDA graph of 20
back-to-back calls (the engine's decode step runs from graphs); achieved GB/s of the bytes each path
must move (both read the compressed keys twice; the split path also writes and reads its window scores
and statistics); and the checks: the -inf pattern equal, the largest score difference new vs fused and
each vs the float32 reference, and the selection made from each path's scores compared, a differing
(row, head) counted only as explained when the fused scores nearly tie at the query-aware quota boundary
(gap <= 1e-5, the rule of tests/ops/test_kernels_gpu.py).
"""

from __future__ import annotations

import json
import time

import torch

from nosa.bench.common import cuda_median_ms, graph_ms, hbm_copy_rate, write_result
from nosa.config import SparseAttentionConfig

DEFAULT_SHAPES = ("65536:48", "16384:16")


def _near_tie_explained(scores, positions, cfg, differ) -> int:
    """How many differing (row, head) of `differ` [B, 1, H] have a quota-boundary gap <= 1e-5 in `scores`."""
    own = int(positions.reshape(-1)[0]) // cfg.block_size  # every row at the same position here
    num_blocks = scores.shape[-1]
    blocks = torch.arange(num_blocks, device=scores.device)
    candidate = (blocks <= own) & (blocks >= cfg.sink_blocks) & (blocks < own - cfg.window_blocks)
    quota = cfg.query_aware_quota
    explained = 0
    for b, t, h in differ.nonzero().tolist():
        ranked = scores[b, t, h][candidate].sort(descending=True).values
        explained += int((ranked[quota - 1] - ranked[quota]).item() <= 1e-5)
    return explained


def _bench_shape(length: int, batch: int, args, cfg: SparseAttentionConfig, device, hbm: float) -> dict:
    from nosa.ops import reference as ref
    from nosa.ops.kernels import selection as ks

    hq, h, d = args.heads, args.kv_heads, args.head_dim
    group = hq // h
    gen = torch.Generator(device=device).manual_seed(length + batch)
    num_windows = ref.num_complete_windows(length, cfg.compress_kernel, cfg.compress_stride)
    num_blocks = -(-length // cfg.block_size)
    q = torch.randn(batch, 1, hq, d, device=device, dtype=torch.bfloat16, generator=gen)
    # Compressed keys are means of 32 post-RoPE keys: a smaller spread than the keys themselves.
    ck = (0.5 * torch.randn(batch, num_windows, h, d, device=device, generator=gen)).to(torch.bfloat16)
    positions = torch.full((batch, 1), length - 1, device=device)  # per row, as the engine passes them
    chunks = ks.score_chunks(1, group, batch, h, num_windows, device)
    plan = ks.split_plan(1, group, num_windows, num_blocks, max(chunks, 2))
    fused = lambda: ks.query_aware_block_scores_fused(q, ck, positions, num_blocks, cfg)  # noqa: E731
    new = lambda n=chunks: ks.query_aware_block_scores_split(q, ck, positions, num_blocks, cfg, n)  # noqa: E731
    key_bytes = batch * num_windows * h * d * 2
    base_bytes = 2 * key_bytes + q.numel() * 2 + batch * h * num_blocks * 4  # keys twice, q, block scores
    rows = plan.tile_tokens * (1 << max(0, (group - 1).bit_length()))
    # Window scores written then read; statistics (max and sum) written once, read by every pass-2 program.
    split_extra = 2 * batch * h * num_windows * 4 + 2 * batch * h * plan.stat_chunks * rows * 4 * (1 + plan.stat_chunks)
    row = {"tokens": length, "batch": batch, "compressed_keys": num_windows, "blocks": num_blocks,
           "rule_chunks": chunks, "fused_programs": batch * h, "split_programs": batch * h * max(chunks, 1),
           "fused_bytes": base_bytes, "split_bytes": base_bytes + split_extra}
    # Checks on the GPU: split (the rule's chunks) against fused and against the float32 reference.
    got_fused, got_new = fused(), new(max(chunks, 2))
    want = ref.query_aware_block_scores(q.float(), ck.float(), positions, num_blocks, cfg)
    row["inf_pattern_equal"] = bool(torch.equal(torch.isinf(got_new), torch.isinf(got_fused))
                                    and torch.equal(torch.isinf(got_new), torch.isinf(want)))
    finite = torch.isfinite(want)
    row["max_abs_diff_split_vs_fused"] = float((got_new[finite] - got_fused[finite]).abs().max())
    row["max_abs_diff_split_vs_reference"] = float((got_new[finite] - want[finite]).abs().max())
    row["max_abs_diff_fused_vs_reference"] = float((got_fused[finite] - want[finite]).abs().max())
    row["max_score"] = float(want[finite].max())
    sel_new = ks.select_blocks(got_new, None, positions, cfg)
    sel_fused = ks.select_blocks(got_fused, None, positions, cfg)
    differ = (sel_new != sel_fused).any(-1)
    row["selections_differing_split_vs_fused"] = int(differ.sum())
    row["selections_differing_explained_by_near_ties"] = _near_tie_explained(got_fused, positions, cfg, differ)
    row["selections_total"] = int(differ.numel())
    # Timings.
    row["fused_eager_ms"] = cuda_median_ms(fused, args.warmup, args.reps)
    row["split_eager_ms"] = cuda_median_ms(new, args.warmup, args.reps) if chunks > 1 else None
    row["fused_graph_ms"] = graph_ms(fused)
    if chunks > 1:
        row["split_graph_ms"] = graph_ms(new)
    row["fused_gbps"] = base_bytes / (row["fused_graph_ms"] * 1e6)
    if chunks > 1:
        row["split_gbps"] = row["split_bytes"] / (row["split_graph_ms"] * 1e6)
        row["speedup_graph"] = row["fused_graph_ms"] / row["split_graph_ms"]
        row["split_hbm_fraction"] = row["split_gbps"] * 1e9 / hbm
    row["fused_hbm_fraction"] = row["fused_gbps"] * 1e9 / hbm
    # The rule against its neighbours: graph time per chunk count.
    row["split_graph_ms_by_chunks"] = {n: graph_ms(lambda n=n: new(n)) for n in args.sweep_chunks}
    # Keys per step of passes 1 and 2 (SPLIT_BLOCK_W = 64): 128 keeps twice the bytes in flight per program.
    row["split_graph_ms_by_chunks_128_keys_per_step"] = {
        n: graph_ms(lambda n=n: ks.query_aware_block_scores_split(q, ck, positions, num_blocks, cfg, n, block_w=128))
        for n in sorted({max(chunks, 2), 3, 6})}
    del q, ck, want
    torch.cuda.empty_cache()
    return row


def run(args) -> int:
    if not torch.cuda.is_available():
        raise SystemExit("nosa bench qa-scores needs a CUDA GPU")
    from nosa.ops.kernels import selection as ks

    start = time.time()
    device = torch.device("cuda")
    cfg = SparseAttentionConfig()
    hbm = hbm_copy_rate(device)
    shapes = [tuple(int(x) for x in s.split(":")) for s in args.shapes]
    parameters = {
        "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "dtype": "bfloat16",
        "shapes_tokens_batch": shapes, "warmup": args.warmup, "reps": args.reps, "sweep_chunks": args.sweep_chunks,
        "sparse": {name: getattr(cfg, name) for name in cfg.__dataclass_fields__},
        "rule": {"split_programs_per_sm": ks.SPLIT_PROGRAMS_PER_SM, "split_min_windows": ks.SPLIT_MIN_WINDOWS,
                 "split_max_score_bytes": ks.SPLIT_MAX_SCORE_BYTES, "sm_count": ks._sm_count(device)},
        "hbm_copy_bytes_per_s_measured": hbm,
        "notes": "one query per row, each row's own position ([R, 1], as the engine's decode call), all at tokens-1; "
                 "times per call: eager = CUDA events around one call, graph = CUDA-graph replay of 20 calls / 20; "
                 "GB/s = bytes the path must move (compressed keys read twice, q, block scores; split also its "
                 "window scores written and read and its statistics) / graph time; fused = the single-pass "
                 "kernel (one program per row x KV head), split = score_chunks' choice; checks against the "
                 "float32 reference on the same bf16 inputs.",
    }
    rows = []
    path = None
    for length, batch in shapes:
        row = _bench_shape(length, batch, args, cfg, device, hbm)
        rows.append(row)
        print(json.dumps(row), flush=True)
        path = write_result(args.name, parameters, rows, directory=args.out_dir) if args.out_dir else write_result(args.name, parameters, rows)
    print(f"{'tokens':>6} {'batch':>5} {'chunks':>6} {'fused us':>8} {'split us':>8} {'x':>5} {'fused GB/s':>10} "
          f"{'split GB/s':>10} {'HBM%':>5} {'max diff':>9} {'sel diff':>8}")
    for r in rows:
        split_ms = r.get("split_graph_ms")
        print(f"{r['tokens']:>6} {r['batch']:>5} {r['rule_chunks']:>6} {1000 * r['fused_graph_ms']:>8.1f} "
              f"{(1000 * split_ms if split_ms else float('nan')):>8.1f} {r.get('speedup_graph', float('nan')):>5.2f} "
              f"{r['fused_gbps']:>10.0f} {r.get('split_gbps', float('nan')):>10.0f} "
              f"{100 * r.get('split_hbm_fraction', float('nan')):>5.1f} {r['max_abs_diff_split_vs_fused']:>9.2e} "
              f"{r['selections_differing_split_vs_fused']:>3}/{r['selections_differing_explained_by_near_ties']:<4}")
    print(f"wrote {path} in {time.time() - start:.1f} s")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("qa-scores", help="query-aware block scores at decode: fused vs split kernel")
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="TOKENS:BATCH pairs")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--sweep-chunks", type=int, nargs="*", default=[2, 3, 4, 6, 8, 12, 16])
    parser.add_argument("--name", default="qa_scores")
    parser.add_argument("--out-dir", default=None, help="directory of the JSON result (default bench/results)")
    parser.set_defaults(func=run)
