"""Training-kernel launch experiments at 32K and 64K (issue 11), one layer of the 8B shape, bf16, bias on.

What the H100 and H200 runs showed: the forward and dq kernels cost the same per (row, union entry) at 4 and
8 tokens per tile (kernels_sweep.json: 14.26 ms for 8-token tiles of 128 rows against 10.37 ms for 4-token
tiles of 64, in the ratio of rows x entries, 1.34x, not of K/V loads, 0.67x), so they are bound by the work
per entry (matmuls, the masked online softmax) rather than by loading the blocks. Two cheap experiments on
that work, each timed beside the default in this run, the outputs compared with the default's:
- Triton's automatic warp specialisation of the walk (loads and matmuls in separate warp groups, so one
  entry's softmax can run beside the next entry's matmul): on the H200 with Triton 3.6 it failed to compile
  (NVGPUWarpSpecialization pass, kernel_probe_h200.json at 899842a), and the knob that ran it was removed;
- pipeline depth of the forward (2, 3 and 4 stages; the default with descriptors is 2 since 2026-12-07, 3
  before) and of dq (3 against the default 2).
A variant that fails to compile is recorded, not raised.

python bench/gpu/kernel_probe.py --out FILE [--lengths 32768 65536]
"""

import argparse
import dataclasses
import time

import torch

from nosa.bench.common import cuda_median_ms
from nosa.bench.kernels import training_inputs
from nosa.config import SparseAttentionConfig
from nosa.ops.kernels import attention as ka
from nosa.ops.kernels import pipeline as kp
from nosa.results.header import write_json_result

VARIANTS = {
    "default": {},
    "fwd_stages_2": {"fwd_stages": 2},
    "fwd_stages_3": {"fwd_stages": 3},
    "fwd_stages_4": {"fwd_stages": 4},
    "dq_stages_3": {"dq_stages": 3},
}


def probe_length(length, cfg, reps):
    dev = torch.device("cuda")
    hq, h = 32, 2
    q, k, v, eviction, grad_out, positions = training_inputs(length, hq, h, 128, dev,
                                                             torch.Generator(device=dev).manual_seed(0))
    tile = ka.default_tile_tokens(hq // h)
    indices = kp.select_all(q, k, eviction, positions, cfg)
    lists, counts = ka.build_tile_lists(indices, tile)
    row = {"tokens": length, "tile_tokens": tile, "union_blocks": float(counts.float().mean()),
           "descriptors_default": ka.descriptors_by_default(dev, k.dtype)}
    ref_o, ref_lse = ka.sparse_attention_forward(q, k, v, eviction, lists, counts, positions, cfg.block_size, tile)
    delta = torch.empty(ref_lse.shape, device=dev, dtype=torch.float32)
    ref_dq = ka.backward_dq(grad_out, q, k, v, eviction, ref_lse, delta, lists, counts, positions, cfg.block_size, tile, o=ref_o)
    for name, knobs in VARIANTS.items():
        result = {}
        try:
            with ka.tuning(**knobs):
                o, lse = ka.sparse_attention_forward(q, k, v, eviction, lists, counts, positions, cfg.block_size, tile)
                result["fwd_max_abs_diff"] = float((o.float() - ref_o.float()).abs().max())
                result["fwd_kernel_ms"] = cuda_median_ms(
                    lambda: ka.sparse_attention_forward(q, k, v, eviction, lists, counts, positions, cfg.block_size, tile),
                    2, reps)
                dq = ka.backward_dq(grad_out, q, k, v, eviction, ref_lse, delta, lists, counts, positions, cfg.block_size,
                                    tile, o=ref_o)
                result["dq_max_abs_diff"] = float((dq.float() - ref_dq.float()).abs().max())
                result["dq_kernel_ms"] = cuda_median_ms(
                    lambda: ka.backward_dq(grad_out, q, k, v, eviction, ref_lse, delta, lists, counts, positions,
                                           cfg.block_size, tile, o=ref_o), 2, reps)
        except Exception as error:  # noqa: BLE001 - a probe: record and go on
            result["error"] = f"{type(error).__name__}: {error}"[:600]
        row[name] = result
        print(length, name, result, flush=True)
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536])
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    cfg = SparseAttentionConfig(block_size=64, topk_blocks=64, sink_blocks=1, window_blocks=16, query_blocks=16,
                                compress_kernel=32, compress_stride=16)
    rows = []
    for length in args.lengths:
        rows.append(probe_length(length, cfg, args.reps))
        write_json_result(args.out, {"lengths": args.lengths, "variants": VARIANTS, "sparse": dataclasses.asdict(cfg),
                                     "shape": "32 query heads, 2 KV heads, head_dim 128, bf16, bias on",
                                     "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, rows)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
