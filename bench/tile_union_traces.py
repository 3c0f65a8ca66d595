"""How much the training kernels' tile union wastes on trained selections (issue 11), from the recorded
decode traces of the quality study (CPU, seconds).

The forward and dq kernels walk the union of `tile_tokens` consecutive tokens' selected blocks; with the
benchmark's random inputs that union is 1.52x the blocks a token selects at 32K and 1.62x at 64K
(bench/results/kernels_h200.json). A trained model's adjacent queries agree more. The study's traces are
the selections of consecutive decode steps (one token each) of small trained models at 16K and 32K tokens,
the same block geometry: a stand-in for consecutive query tokens in training, not the same thing (decode
steps follow each other's generated tokens; a training tile's tokens are a text's).

python bench/tile_union_traces.py [--out bench/results/tile_union_traces.json]
"""

import argparse
import json

import numpy as np
import torch

from nosa.bench.kernels import trace_tile_union
from nosa.results.header import write_json_result

FILES = ("results/quality/traces_nosa.npz", "results/quality/traces_infllmv2.npz")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results/tile_union_traces.json")
    args = p.parse_args()
    rows = []
    for path in FILES:
        data = np.load(path)
        meta = json.loads(str(data["meta"]))
        for i, info in enumerate(meta["traces"]):
            trace = torch.from_numpy(data[f"trace_{i}"].astype(np.int32))
            for tile_tokens in (2, 4, 8):
                row = {"file": path, "attn_mode": meta["attn_mode"], "label": info["label"], **trace_tile_union(trace, tile_tokens)}
                rows.append(row)
                print(f"{meta['attn_mode']:9s} {info['label']:36s} tile {tile_tokens}: {row['blocks_per_token']:.1f} blocks a token, "
                      f"union {row['union']:.1f} ({row['union_per_token_blocks']:.2f}x), in every token {row['in_every_token']:.1f}")
    write_json_result(args.out, {"files": list(FILES), "note": "layers stand in for sequences; decode steps for query tokens"}, rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
