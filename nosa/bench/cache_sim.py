"""`nosa bench cache-sim`: hit rate of a device block cache against its size on recorded selection traces
(CPU; `nosa.results.cache_sim`). For each trace file and cache size C (blocks per (layer, sequence, KV
head), C >= topk_blocks) it reports the engine's own bookkeeping (LRU spill, exact) and the replacement
policies lru / lfu / belady (offline optimum) of a cache that always holds the selection. Writes
bench/results/<name>.json with the machine header.
"""

from __future__ import annotations

import numpy as np

from nosa.bench.common import write_result


def register(subparsers) -> None:
    p = subparsers.add_parser("cache-sim", help="device block cache hit rate vs size on selection traces (CPU)")
    p.add_argument("--traces", default="results/quality/traces_nosa.npz,results/quality/traces_infllmv2.npz",
                   help="comma-separated trace files (nosa.results.traces)")
    p.add_argument("--sizes", default="64,72,80,96,128,160,192,256",
                   help="cache sizes in blocks per (layer, sequence, KV head); each >= the traces' topk_blocks")
    p.add_argument("--policies", default="lru,lfu,belady", help="policies of the set-based simulator")
    p.add_argument("--name", default="cache_sim_traces")
    p.set_defaults(func=main)


def summarize(loads: np.ndarray, selected: np.ndarray) -> dict:
    """loads, selected: [N, S] per stream and step -> hit rate and loads per (layer, sequence, head) per step."""
    return {"hit_rate": round(1.0 - float(loads.sum()) / float(selected.sum()), 5),
            "loads_per_step": round(float(loads.mean()), 4),
            "loads_per_step_p95": float(np.quantile(loads.sum(0) / loads.shape[0], 0.95)) if loads.size else 0.0}


def simulate_file(path: str, sizes: list[int], policies: list[str]) -> dict:
    from nosa.results import cache_sim
    from nosa.results.traces import load_traces

    data = load_traces(path)
    geometry = data["meta"]["geometry"]
    block_size, topk = geometry["block_size"], geometry["topk_blocks"]
    too_small = [c for c in sizes if c < topk]
    if too_small:
        raise ValueError(f"{path}: cache sizes {too_small} are below topk_blocks={topk} (the selection is always resident)")
    sel, positions, _ = cache_sim.streams(data["traces"], data["first_position"])
    out = {"attn_mode": data["meta"].get("attn_mode"), "labels": data["labels"], "block_size": block_size,
           "topk_blocks": topk, "streams": int(sel.shape[0]), "steps": int(sel.shape[1]), "sizes": []}
    for size in sizes:
        engine = cache_sim.engine_cache_loads(sel, positions, block_size, size)
        selected = engine["selected"].numpy()
        row = {"cache_blocks": size, "engine_lru": {**summarize(engine["loads"].numpy(), selected),
                                                    "spill_hits_per_step": round(float(engine["spill_hits"].float().mean()), 4)}}
        for policy in policies:
            loads = np.stack([cache_sim.policy_cache_loads(sel[n], int(positions[n]), block_size, size, policy)
                              for n in range(sel.shape[0])])
            row[policy] = summarize(loads, selected)
        out["sizes"].append(row)
        print(f"{out['attn_mode']:9s} C={size:4d}  engine {row['engine_lru']['hit_rate']:.4f} "
              f"({row['engine_lru']['loads_per_step']:.2f} loads/step)  "
              + "  ".join(f"{p} {row[p]['hit_rate']:.4f}" for p in policies), flush=True)
    return out


def main(args) -> int:
    from nosa.results.cache_sim import POLICIES

    try:
        sizes = [int(x) for x in args.sizes.split(",")]
        policies = args.policies.split(",")
        unknown = [p for p in policies if p not in POLICIES]
        if unknown:
            raise ValueError(f"--policies: unknown {unknown}, choose from {list(POLICIES)}")
        results = [simulate_file(path, sizes, policies) for path in args.traces.split(",")]
    except (OSError, ValueError, KeyError) as err:
        print(f"cache-sim: {err}")
        return 2
    parameters = {"traces": args.traces, "sizes": sizes, "policies": policies,
                  "measure": "host->device block loads per (layer, sequence, KV head) per decode step, warm start "
                             "(the cache holds the first step's selection), a tail block starting at the step is "
                             "not a load; hit_rate = 1 - loads / selected",
                  "engine_lru": "the engine's bookkeeping ops (ops.block_ops.spill_step + slot diff), exact",
                  "device": "cpu (a simulation on recorded traces, no GPU timing)"}
    path = write_result(args.name, parameters, results)
    print(f"wrote {path}")
    return 0
