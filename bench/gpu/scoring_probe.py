"""Where the decode step's query-aware scoring time goes, and what two cheap changes would save (issue 10).

At the 64K budget-set batch (8B shape: 32 query heads, 2 KV heads, head_dim 128, stride 16, so 4,096
compressed keys a row) the split path's pass 1 (chunk statistics) and pass 2 (window scores) each read every
row's compressed keys, 1 MiB per (row, KV head): 0.9 ms of a 4.98 ms step at 121 rows (H100 profile). Timed
per call from CUDA graphs of back-to-back calls (`nosa.bench.common.graph_ms`: no launch gaps):
- the three passes as the engine runs them, for the whole batch;
- pass 1 alone and pass 2 alone;
- "grouped": the batch cut into groups of G rows, each group's pass 1 then pass 2 (so pass 2 may find the
  keys still in L2), then one pooling pass: the launch cost of more, smaller launches against L2 reuse;
- one query token per program (the engine's split path ran 2 until 2026-12-07, half of them padding rows at
  GQA 16; since then it runs 1, so this variant is the engine's own plan);
- the number of key chunks per row, 2 to 16, one launch per pass for the whole batch.
Also compares each variant's block scores with the engine's (the -inf pattern and the largest difference).
scoring_probe_h200.json (899842a) also timed pass 1 storing its logits for pass 2, one read of the keys:
0.173 ms, not bit-equal; that variant was dropped from the kernels.

python bench/gpu/scoring_probe.py --out FILE [--rows 121] [--tokens 65536]
"""

import argparse
import json
import time

import torch

from nosa.bench.common import graph_ms
from nosa.config import SparseAttentionConfig
from nosa.ops.kernels import selection as ks
from nosa.results.header import write_json_result


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--rows", type=int, default=121)
    p.add_argument("--tokens", type=int, default=65536)
    args = p.parse_args()
    dev = torch.device("cuda")
    cfg = SparseAttentionConfig(block_size=64, topk_blocks=64, sink_blocks=1, window_blocks=16, query_blocks=16,
                                compress_kernel=32, compress_stride=16)
    R, T, Hq, H, D = args.rows, args.tokens, 32, 2, 128
    nc = (T - cfg.compress_kernel) // cfg.compress_stride + 1
    nb = T // cfg.block_size
    torch.manual_seed(0)
    q = torch.randn(R, 1, Hq, D, device=dev, dtype=torch.bfloat16)
    ck = torch.randn(R, nc, H, D, device=dev, dtype=torch.bfloat16)
    pos = torch.full((R, 1), T - 1, device=dev, dtype=torch.int64)
    chunks = ks.score_chunks(1, Hq // H, R, H, nc, dev)
    plan = ks.split_plan(1, Hq // H, nc, nb, chunks)
    result = {"rows": R, "tokens": T, "compressed_keys": nc, "chunks": chunks, "plan": plan.__dict__,
              "ck_bytes": ck.numel() * ck.element_size(), "gpu": torch.cuda.get_device_name()}
    want = ks.query_aware_block_scores(q, ck, pos, nb, cfg)
    qp, ckp, posp = ks._prepare_scores(q, ck, pos)

    result["engine_ms"] = graph_ms(lambda: ks.query_aware_block_scores(q, ck, pos, nb, cfg))
    stats = ks.split_chunk_stats(qp, ckp, posp, cfg, plan)
    result["pass1_ms"] = graph_ms(lambda: ks.split_chunk_stats(qp, ckp, posp, cfg, plan))
    result["pass2_ms"] = graph_ms(lambda: ks.split_window_scores(qp, ckp, posp, cfg, plan, *stats))
    win = ks.split_window_scores(qp, ckp, posp, cfg, plan, *stats)
    result["pass3_ms"] = graph_ms(lambda: ks.pool_window_scores(win, posp, nb, cfg, plan))
    print(json.dumps(result), flush=True)

    grouped = {}
    for group in (4, 8, 16, 32, 64):
        sub_chunks = ks.score_chunks(1, Hq // H, group, H, nc, dev)
        sub_plan = ks.split_plan(1, Hq // H, nc, nb, sub_chunks)
        out = torch.empty((R, 1, H, nb), device=dev, dtype=torch.float32)
        win_all = torch.empty((R, 1, H, nc), device=dev, dtype=torch.float32)

        def run(group=group, sub_plan=sub_plan, out=out, win_all=win_all):
            for a in range(0, R, group):
                b = min(R, a + group)
                st = ks.split_chunk_stats(qp[a:b], ckp[a:b], posp[a:b], cfg, sub_plan)
                win_all[a:b] = ks.split_window_scores(qp[a:b], ckp[a:b], posp[a:b], cfg, sub_plan, *st)
            ks.pool_window_scores(win_all, posp, nb, cfg, plan, out=out)
            return out

        try:
            ms = graph_ms(run)
            got = run()
            grouped[group] = {"ms": ms, "chunks": sub_chunks, "launches": 2 * -(-R // group) + 1,
                              "max_abs_diff_vs_engine": float((got - want).nan_to_num(0, 0, 0).abs().max()),
                              "same_inf_pattern": bool(torch.equal(got.isinf(), want.isinf()))}
        except Exception as error:  # noqa: BLE001 - a probe: record and go on
            grouped[group] = {"error": repr(error)[:300]}
        print(group, grouped[group], flush=True)
    result["grouped"] = grouped

    try:
        one = ks.SplitPlan(1, plan.block_w, plan.chunk_windows, plan.stat_chunks, plan.chunk_blocks, plan.pool_chunks)

        def run_one():
            st = ks.split_chunk_stats(qp, ckp, posp, cfg, one)
            w = ks.split_window_scores(qp, ckp, posp, cfg, one, *st)
            return ks.pool_window_scores(w, posp, nb, cfg, one)

        got = run_one()
        result["one_token_tiles"] = {"ms": graph_ms(run_one),
                                     "max_abs_diff_vs_engine": float((got - want).nan_to_num(0, 0, 0).abs().max()),
                                     "same_inf_pattern": bool(torch.equal(got.isinf(), want.isinf()))}
    except Exception as error:  # noqa: BLE001
        result["one_token_tiles"] = {"error": repr(error)[:300]}
    print(result["one_token_tiles"], flush=True)

    # Key chunks per row (the engine's plan has `chunks`, SPLIT_PROGRAMS_PER_SM = 4): in the 2026-12-07 run
    # the 64-row groups gained most where they also had more chunks per row (5 against 3), so more programs
    # may be what helped, not L2. Same passes, one plan each, the whole batch in one launch per pass.
    swept = {}
    for n in (2, 3, 4, 6, 8, 12, 16):
        try:
            p_n = ks.split_plan(1, Hq // H, nc, nb, n)

            def run_n(p_n=p_n):
                st = ks.split_chunk_stats(qp, ckp, posp, cfg, p_n)
                w = ks.split_window_scores(qp, ckp, posp, cfg, p_n, *st)
                return ks.pool_window_scores(w, posp, nb, cfg, p_n)

            got = run_n()
            swept[n] = {"ms": graph_ms(run_n), "stat_chunks": p_n.stat_chunks, "tile_tokens": p_n.tile_tokens,
                        "max_abs_diff_vs_engine": float((got - want).nan_to_num(0, 0, 0).abs().max()),
                        "same_inf_pattern": bool(torch.equal(got.isinf(), want.isinf()))}
        except Exception as error:  # noqa: BLE001
            swept[n] = {"error": repr(error)[:300]}
        print("chunks", n, swept[n], flush=True)
    result["chunks_sweep"] = swept
    result["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json_result(args.out, {"rows": R, "tokens": T}, result)


if __name__ == "__main__":
    main()
