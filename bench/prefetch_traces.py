"""Could a layer's host loads start before its own selection (issue 10, item 2: "loading the next layer's
predictable blocks early")? From the quality study's decode traces (CPU, seconds): for each layer l >= 1,
how many of its misses (128-block cache, least recently selected out, as the engine) layer l-1's selection
at the same step, or layer l-1's own misses, would have prefetched, and at what precision
(`nosa.results.cache_sim.layer_prefetch`).

python bench/prefetch_traces.py [--out bench/results/prefetch_traces.json] [--cache-blocks 128]
"""

import argparse
import json

import numpy as np

from nosa.results.cache_sim import layer_prefetch
from nosa.results.header import write_json_result

FILES = ("results/quality/traces_nosa.npz", "results/quality/traces_infllmv2.npz")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results/prefetch_traces.json")
    p.add_argument("--cache-blocks", type=int, default=128)
    args = p.parse_args()
    rows = []
    for path in FILES:
        data = np.load(path)
        meta = json.loads(str(data["meta"]))
        block = meta["geometry"]["block_size"]
        for i, info in enumerate(meta["traces"]):
            result = layer_prefetch(data[f"trace_{i}"].astype(np.int64), info["first_position"], block, args.cache_blocks)
            misses = sum(r["misses"] for r in result["layers"])
            summary = {}
            for key in ("from_selection", "from_misses"):
                prefetched = sum(r[key]["prefetched"] for r in result["layers"])
                useful = sum(r[key]["useful"] for r in result["layers"])
                summary[key] = {"prefetched": prefetched, "useful": useful, "coverage": useful / misses,
                                "precision": useful / prefetched if prefetched else None}
            rows.append({"file": path, "attn_mode": meta["attn_mode"], "label": info["label"], "misses": misses,
                         **summary, **result})
            print(f"{meta['attn_mode']:9s} {info['label']:36s} misses {misses:6d}  layer l-1's selection: coverage "
                  f"{summary['from_selection']['coverage']:.2f} precision {summary['from_selection']['precision']:.3f}  "
                  f"its misses: coverage {summary['from_misses']['coverage']:.2f}")
    write_json_result(args.out, {"files": list(FILES), "cache_blocks": args.cache_blocks,
                                 "note": "layers 1..L-1 of each trace, both KV heads, decode steps 1..S-1"}, rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
