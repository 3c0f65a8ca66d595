"""The decode step's wall time against the GPU time in it (issue 10: ~3.9 ms a step, ~2.4 ms of kernels), at the
headline's trace-driven NOSA row: 64K-token prompts, 8B layer shape with 4 layers, bf16, offload on, device
cache 128 blocks, the device budget of 20 one-copy dense sequences (batch capped at 48), CUDA graphs, the
trained NOSA model's traces (results/quality/traces_nosa.npz) replayed.

One engine, one install; the selection source is switched between the variants, which alternate
(A B A B, so drift shows):
  replay_host    ReplaySelections(on_device=False): the selections stacked on the host and copied over each step
                 (what every step did before the device-side replay)
  replay_device  ReplaySelections(on_device=True): picked on the device inside the graph (the default now)
  replay_device_unfused  replay_device with RMSNorm, rotary and the eviction scores on the PyTorch reference
                 (~38 small kernels a layer) instead of the fused Triton kernels (nosa.ops.kernels.norm_rope,
                 .eviction): the step as it was before them, so the difference is what the fusions save
  replay_device_fused_gather  replay_device with nosa.engine.attention.FUSE_GATHER: decode attention loads the
                 step's misses from the host pages itself instead of a gather before it (`fused_gather_saves_ms`)
Per variant and round: `time_decode` (warm-up steps, which capture the graphs again, then timed steps: wall
time of `llm.step()`, no profiler). In the second round each variant also runs a few steps under
torch.profiler (CPU + CUDA activity, graphs on), each step wrapped in record_function, and
`nosa.bench.step_time` splits every step: kernel time, GPU busy time, GPU idle inside the step's GPU span and
outside it (host work before the launch and after the results came back), the host time before the launch
and after the last sync. Last, a few eager steps are profiled by kernel (the table of the earlier profiles)
to cross-check the kernel sum, in case the profiler does not see kernels inside graph replays.

Writes OUT/step_time.json (machine header, every figure), OUT/step_time_kernels.txt (kernel tables: graphed
and eager steps of replay_device). Usage: python bench/gpu/step_time.py OUT_DIR [--steps N] [--prompt T]."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
import types

import torch

from nosa import ops
from nosa.bench import decode as bench
from nosa.results.header import write_json_result
from nosa.bench.step_time import step_timeline, summarise
import nosa.engine.attention as engine_attention
from nosa.engine import LLM
from nosa.engine.selection_source import ReplaySelections

TRACES = "results/quality/traces_nosa.npz"
FUSED_OPS = ["rms_norm", "apply_rotary", "eviction_scores"]


def attach(llm, request_ids, mapped, prompt_len, on_device):
    cfg = llm.config.sparse
    source = ReplaySelections(cfg.block_size, cfg.topk_blocks, on_device=on_device)
    for i, request_id in enumerate(request_ids):
        source.add(request_id, torch.from_numpy(mapped[i % len(mapped)]), prompt_len)
    llm.set_selection_source(source)  # drops the captured graphs: the next steps capture again


def profiled(llm, steps: int, graphs: bool, table_rows: int = 30):
    """Run `steps` engine steps under torch.profiler; returns (per-step timeline, kernel table text)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    llm.use_cuda_graphs(graphs)
    try:
        llm.step()  # a graph of this variant is captured (or the eager path warm) before profiling
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(steps):
                with record_function(f"step {i}"):
                    llm.step()
            torch.cuda.synchronize()
    finally:
        llm.use_cuda_graphs(True)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    os.unlink(path)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=table_rows)
    return step_timeline(events), table


def smoke_model(max_len: int):
    """A tiny model with the benchmark's sparsity (block 64, topk 64: what the traces were recorded with)."""
    from nosa import NosaConfig, NosaForCausalLM

    torch.manual_seed(0)
    config = NosaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        vocab_size=300, num_hidden_layers=2, max_position_embeddings=max_len, attn_mode="nosa")
    return NosaForCausalLM(config).eval()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--prompt", type=int, default=65536)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max-batch", type=int, default=48)
    ap.add_argument("--dense-batch", type=int, default=20, help="the budget: one-copy dense for this many sequences")
    ap.add_argument("--cache", type=int, default=128, help="device_cache_blocks")
    ap.add_argument("--steps", type=int, default=24, help="timed steps per variant and round")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--profile-steps", type=int, default=6)
    ap.add_argument("--traces", default=TRACES)
    ap.add_argument("--commit", default=os.environ.get("NOSA_COMMIT"))
    ap.add_argument("--smoke", action="store_true", help="the whole flow on CPU with a tiny model at a 16K prompt "
                                                         "(checks the script, measures nothing)")
    args = ap.parse_args()
    if args.smoke:
        args.prompt, args.layers, args.max_batch, args.steps, args.warmup, args.profile_steps = 16384, 2, 2, 2, 1, 2
    os.makedirs(args.out, exist_ok=True)
    # (name, replay on the device, fused norm and rotary, misses loaded inside decode attention)
    variants = (("replay_host", False, True, False), ("replay_device", True, True, False),
                ("replay_device_unfused", True, False, False), ("replay_device_fused_gather", True, True, True))
    rounds = 2
    # Steps the traces must cover: every round's warm-up and timed steps, the profiled ones (+1 warm each),
    # the eager profile, and a margin.
    total = rounds * len(variants) * (args.warmup + args.steps) + len(variants) * (args.profile_steps + 1) + 8 + 16
    max_len = args.prompt + total
    started = time.perf_counter()
    mapped, description = bench.load_benchmark_traces(args.traces, {"nosa"}, args.prompt, args.layers, total)["nosa"]
    if args.smoke:
        shared = {"gather": {"pinned_memcpy_gb_s": 1.0}, "hbm_copy_gb_s": 1.0}
        model, device, budget = smoke_model(max_len), "cpu", None
        torch.cuda.synchronize = lambda: None
    else:
        shared = {"gather": bench.gather_bandwidth(), "hbm_copy_gb_s": bench.hbm_copy_rate()}
        model, device = bench.make_model("nosa", args.layers, max_len), "cuda"
        budget = bench.equal_memory_budget(types.SimpleNamespace(layers=args.layers, equal_memory_dense_batch=args.dense_batch), max_len)
    llm = LLM(model, device=device, offload=True, max_model_len=max_len, max_num_seqs=args.max_batch,
              gpu_memory_budget=budget, cuda_graphs=True, device_cache_blocks=args.cache)
    batch = llm.max_num_seqs
    running = bench.synthetic_install(llm, args.prompt, batch, torch.Generator(device=device).manual_seed(1))
    print(f"installed {batch} rows of {args.prompt} tokens in {time.perf_counter() - started:.1f} s", flush=True)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    floor_args = types.SimpleNamespace(prompt=args.prompt)
    results = {"gather": shared["gather"], "hbm_copy_gb_s": shared["hbm_copy_gb_s"], "batch": batch, "variants": {}}
    tables = []
    for round_index in range(rounds):
        for name, on_device, fused, fuse_gather in variants:
            engine_attention.FUSE_GATHER = fuse_gather
            # attach() drops the graphs: this variant's steps capture them again under its backend.
            with contextlib.nullcontext() if fused else ops.use_backend("reference", only=FUSED_OPS):
                attach(llm, running, mapped, args.prompt, on_device)
                run = bench.time_decode(llm, running, args.warmup, args.steps)
                run.update({"batch": batch, "offload": True, "weight_bytes": weight_bytes,
                            "weight_bytes_read_per_step": bench.weight_bytes_read_per_step(model, batch)})
                run.update(bench.floor(run, llm, floor_args, shared["hbm_copy_gb_s"], shared["gather"]["pinned_memcpy_gb_s"]))
                entry = results["variants"].setdefault(name, {"rounds": []})
                entry["rounds"].append(run)
                line = (f"round {round_index} {name:13s} step {run['step_ms_median']:.3f} ms median ({run['step_ms_mean']:.3f} mean)"
                        f"  {run['tokens_per_s']:.0f} tok/s  reference {run['floor_ms']:.3f} ms  loads/step {run['blocks_loaded_per_step']:.0f}")
                if round_index == rounds - 1:
                    timeline, table = profiled(llm, args.profile_steps, graphs=True)
                    entry["profiled_graph_steps"] = timeline
                    entry["profiled_graph"] = summary = summarise(timeline)
                    line += (f"\n    profiled (graphs): wall {summary['wall_us']:.0f} us, kernels {summary['kernel_us']:.0f} us "
                             f"({summary['kernels']:.0f}), busy {summary['busy_us']:.0f}, idle inside {summary['idle_inside_us']:.0f}, "
                             f"idle outside {summary['idle_outside_us']:.0f}, host before launch {summary['host_before_launch_us']}, "
                             f"after sync {summary['host_after_sync_us']}, syncs {summary['syncs']}")
                    if on_device:
                        tables.append(f"== {name}: {args.profile_steps} graphed steps (CPU + CUDA activity)\n{table}")
                print(line, flush=True)
    # Eager steps by kernel (graphs off): the kernel sum the earlier profiles reported, for comparison.
    engine_attention.FUSE_GATHER = False
    attach(llm, running, mapped, args.prompt, True)
    timeline, table = profiled(llm, 3, graphs=False)
    results["profiled_eager_replay_device"] = summarise(timeline)
    tables.append(f"== replay_device: 3 eager steps\n{table}")
    eager = results["profiled_eager_replay_device"]
    print(f"eager (replay_device): wall {eager['wall_us']:.0f} us, kernels {eager['kernel_us']:.0f} us per step", flush=True)
    for name, entry in results["variants"].items():
        medians = [r["step_ms_median"] for r in entry["rounds"]]
        entry["step_ms_median_of_rounds"] = sorted(medians)[len(medians) // 2] if len(medians) % 2 else sum(medians) / len(medians)
        entry["vs_floor"] = entry["step_ms_median_of_rounds"] / entry["rounds"][-1]["floor_ms"]
    host, device, unfused, fused_gather = (results["variants"][n]["step_ms_median_of_rounds"] for n, *_ in variants)
    results["device_replay_saves_ms"] = host - device
    results["fused_kernels_save_ms"] = unfused - device
    results["fused_gather_saves_ms"] = device - fused_gather
    print(f"loading the misses inside decode attention saves {device - fused_gather:.3f} ms a step "
          f"({device:.3f} -> {fused_gather:.3f})", flush=True)
    print(f"the fused norm, rotary and eviction kernels save {unfused - device:.3f} ms a step ({unfused:.3f} -> {device:.3f})", flush=True)
    print(f"replay on the device saves {host - device:.3f} ms a step ({host:.3f} -> {device:.3f}); "
          f"{results['variants']['replay_device']['vs_floor']:.2f}x the reference step (its bytes at the measured copy rates)", flush=True)
    parameters = {"prompt_tokens": args.prompt, "layers": args.layers, "shape": "8B layer shape", **bench.SHAPE_8B,
                  "dtype": "bfloat16", "weights": "random", "offload": True, "device_cache_blocks": args.cache,
                  "gpu_memory_budget": budget, "budget_from": f"dense, one copy, batch {args.dense_batch}",
                  "max_batch": args.max_batch, "timed_steps": args.steps, "warmup_steps": args.warmup,
                  "rounds": rounds, "profile_steps": args.profile_steps, "cuda_graphs": True,
                  "selection": f"trace-driven: {args.traces}", "traces": description, "source_commit": args.commit,
                  "elapsed_s": time.perf_counter() - started}
    print("wrote", write_json_result(os.path.join(args.out, "step_time.json"), parameters, results))
    with open(os.path.join(args.out, "step_time_kernels.txt"), "w") as f:
        f.write("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
