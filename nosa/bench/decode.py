"""`nosa bench decode`: decode throughput of the NOSI engine at the 8B layer shape (spec sec. 8), offload
on and off, as ratios against the same engine in dense mode, plus the host->device gather's GB/s against
the PCIe copy rate measured in the same run.

The prompt's KV cache is installed synthetically (random keys and values, eviction scores from the
model's own eviction head, the last prompt token's selection from `ops.select_for_queries`) through the
engine's own install path; only the prefill's attention and MLP compute is skipped, which decode
throughput does not depend on. Weights are random. Results go to bench/results/<name>.json.

Trace-driven (`--traces FILE[,FILE]`): the sparse configurations replay the selection traces of trained
models (`nosa.results.traces`, written by the quality study) instead of the random weights' choice, which is
a worst case for locality. Each trace file serves the configs of its attn_mode (dense configs select
nothing and run as usual). The engine's `ReplaySelections` source supplies each step's blocks after the
model's own selection was computed (so the step still pays for it); the diff, the host->device loads, the
gather and the attention run exactly as in normal decoding, so loads/step and step time are real. How
layers, heads, sequences and positions are mapped is recorded in the result's parameters.

`--model DIR` benchmarks a saved checkpoint end to end instead, prefill included (`nosa/bench/checkpoint.py`).

Two modes:
- fixed batch (default): every configuration decodes `--batch` sequences, whatever device memory it needs.
- equal device memory (`--equal-memory-dense-batch N`, spec sec. 7, the paper's claim): every configuration
  gets the SAME `gpu_memory_budget`, the bytes the engine's own accounting (`LLM.device_bytes`) charges
  dense attention with all KV on the device (one copy: offload off reads the device store in place) for N
  sequences at this prompt length, and runs the largest
  batch the engine admits under that budget (capped by `--max-batch`). The batch is whatever
  `LLM(gpu_memory_budget=...)` decides, never computed here.
"""

from __future__ import annotations

import gc
import os
import time
from typing import NamedTuple

import torch

from nosa.bench.common import write_result, cuda_median_ms

SHAPE_8B = dict(hidden_size=4096, intermediate_size=16384, num_attention_heads=32, num_key_value_heads=2,
                head_dim=128, vocab_size=73448)


def register(subparsers) -> None:
    p = subparsers.add_parser("decode", help="engine decode tokens/s vs dense, and gather GB/s (CUDA)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the 8B shape (it has 32)")
    p.add_argument("--prompt", type=int, default=16384)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=64, help="timed decode steps")
    p.add_argument("--warmup", type=int, default=4, help="untimed steps first (CUDA graph capture)")
    p.add_argument("--configs", default=None,
                   help=f"comma-separated {CONFIG_FORM}; the first is the baseline (default: "
                        "dense:off,nosa:on,nosa:off,infllmv2:on,nosa:on:eager)")
    p.add_argument("--equal-configs", default=None,
                   help="configs of the equal-memory comparison (default: dense:off,infllmv2:off,nosa:on,nosa:off,infllmv2:on)")
    p.add_argument("--profile", default=None, help="write a kernel-time table of a few eager decode steps of each "
                                                   "offloaded nosa config here (the n-th, n > 0, to PATH_<n>.ext)")
    p.add_argument("--commit", default=None, help="source commit to record (when the run has no git checkout)")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--name", default="decode_8b")
    p.add_argument("--equal-memory-dense-batch", type=int, default=0, metavar="N",
                   help="equal-memory mode: every config gets the device KV budget dense-on-GPU needs for N "
                        "sequences and runs the largest batch the engine admits under it (0: fixed --batch)")
    p.add_argument("--max-batch", type=int, default=64, help="cap on the batch in equal-memory mode")
    p.add_argument("--both", action="store_true",
                   help="run the equal-memory comparison (--equal-name) and then the fixed-batch one (--name) in one "
                        "process (Triton compiles and the gather/HBM rates are shared)")
    p.add_argument("--equal-name", default="decode_8b_equal_memory")
    p.add_argument("--traces", default=None, metavar="FILE[,FILE]",
                   help="trace-driven: sparse configs replay these selection traces (.npz, nosa.results.traces), "
                        "each file serving the configs of its attn_mode")
    from nosa.bench import checkpoint

    checkpoint.add_arguments(p)
    p.set_defaults(func=main)


FIXED_BATCH_CONFIGS = "dense:off,nosa:on,nosa:off,infllmv2:on,nosa:on:eager"
EQUAL_MEMORY_CONFIGS = "dense:off,infllmv2:off,nosa:on,nosa:off,infllmv2:on"


def spread_lengths(prompt_len: int, batch: int, spread: int) -> list[int]:
    """Prompt lengths of `batch` rows spread evenly over (prompt_len - spread, prompt_len]: row i gets
    prompt_len - i * spread // batch tokens (all prompt_len when spread is 0)."""
    if not 0 <= spread < prompt_len:
        raise ValueError(f"a length spread must be in [0, prompt length {prompt_len}); got {spread}")
    return [prompt_len - i * spread // batch for i in range(batch)]


def synthetic_install(llm, lengths: list[int], generator: torch.Generator) -> list[int]:
    """Admit one request per entry of `lengths`, each with a random prompt cache of that many tokens
    installed through the engine's own install path (`LLM.add_prefilled_request`). Returns their ids."""
    from nosa import ops
    from nosa.engine import SamplingParams

    cfg, model = llm.config.sparse, llm.model
    L, H, D, Hq = llm.config.num_hidden_layers, llm.config.num_key_value_heads, llm.config.head_dim, llm.config.num_attention_heads
    request_ids = []
    for prompt_len in lengths:
        # Never finishes inside the run: every timed, warm-up and profiled step fits in max_model_len.
        params = SamplingParams(temperature=0, max_tokens=llm.max_model_len - prompt_len + 1, ignore_eos=True)
        shape = (L, 1, prompt_len, H, D)
        keys = torch.randn(shape, generator=generator, device=llm.device).to(model.dtype)
        values = torch.randn(shape, generator=generator, device=llm.device).to(model.dtype)
        evictions, last = None, [None] * L
        if cfg.uses_eviction_head:
            evictions = torch.stack([layer.self_attn.eviction_scores(values[l]) for l, layer in enumerate(model.model.layers)])
        if cfg.is_sparse:
            q = torch.randn((1, 1, Hq, D), generator=generator, device=llm.device).to(model.dtype)
            position = torch.tensor([prompt_len - 1], device=llm.device)
            for l in range(L):
                compressed = ops.compress_keys(keys[l], cfg.compress_kernel, cfg.compress_stride)
                agnostic = None if evictions is None else ops.agnostic_chunk_scores(evictions[l], cfg.compress_kernel, cfg.compress_stride)
                last[l] = ops.select_for_queries(q, compressed, agnostic, position, ops.num_blocks(prompt_len, cfg.block_size), cfg)[0, 0]
        first = int(torch.randint(0, 256, (1,), generator=generator, device=llm.device))
        request_ids.append(llm.add_prefilled_request([0] * prompt_len, params, keys, values, evictions, last, first))
    return request_ids


def load_benchmark_traces(paths: str, modes: set[str], prompt_len: int, layers: int, steps: int) -> dict:
    """{attn_mode: (mapped traces, description)} for the sparse modes in `modes`, from the comma-separated
    trace files; ValueError when a sparse mode has no trace or two files share a mode."""
    from nosa.results.traces import benchmark_traces

    config = make_config("nosa", layers, prompt_len + steps)
    cfg = config.sparse
    found = {}
    for path in paths.split(","):
        mapped, description = benchmark_traces(path, prompt_len, layers, config.num_key_value_heads, steps,
                                               cfg.block_size, cfg.topk_blocks)
        mode = description["attn_mode"]
        if mode in found:
            raise ValueError(f"--traces: {path} and {found[mode][1]['trace_file']} are both attn_mode {mode!r}")
        found[mode] = (mapped, description)
    missing = sorted(m for m in modes if m != "dense" and m not in found)
    if missing:
        raise ValueError(f"--traces: no trace file for attn_mode {', '.join(missing)} (files cover "
                         f"{', '.join(sorted(found)) or 'nothing'}); add one or drop those configs")
    return found


def attach_traces(llm, request_ids: list[int], mapped: list, prompt_len: int) -> None:
    """Give the engine a `ReplaySelections` source in which request i (installed, not yet decoded) replays
    mapped[i mod n] from its first decode step, at position prompt_len."""
    from nosa.engine.selection_source import ReplaySelections

    cfg = llm.config.sparse
    source = ReplaySelections(cfg.block_size, cfg.topk_blocks)
    for i, request_id in enumerate(request_ids):
        source.add(request_id, torch.from_numpy(mapped[i % len(mapped)]), prompt_len)
    llm.set_selection_source(source)


def time_decode(llm, running, warmup: int, steps: int) -> dict:
    """Time `steps` engine steps (one batched decode step each; nothing waits to be admitted) after
    `warmup` untimed ones."""
    batch = llm.num_running
    for _ in range(warmup):
        llm.step()
    torch.cuda.synchronize()
    before = llm.decode_counters()
    times = []
    # With CUDA graphs, each replay is timed on the device too: what is left of the step is the host's (inputs
    # staged, tokens read back and handed to the sequences) while the device waits.
    graphed = llm.graphed if llm.uses_cuda_graphs else None
    if graphed is not None:
        graphed.timed_replays = []
    try:
        for _ in range(steps):
            start = time.perf_counter()
            llm.step()  # ends in a device sync (sampling reads the tokens)
            times.append(time.perf_counter() - start)
        replays = graphed.timed_replays if graphed is not None else None
    finally:
        if graphed is not None:
            graphed.timed_replays = None
    after = llm.decode_counters()
    loaded, selected = after["loaded"] - before["loaded"], after["selected"] - before["selected"]
    cfg = llm.config
    block_bytes = 2 * cfg.sparse.block_size * cfg.head_dim * torch.empty((), dtype=llm.model.dtype).element_size()
    total = sum(times)
    split = {}
    if replays is not None and len(replays) == steps:  # a replay per step (none was an eager warm-up or capture)
        device = [start.elapsed_time(end) for start, end in replays]
        host = sorted(1e3 * t - d for t, d in zip(times, device))
        split = {"graph_ms_median": sorted(device)[steps // 2], "host_ms_median": host[steps // 2]}
    times.sort()
    return {**split,
        "tokens_per_s": batch * steps / total,
        "step_ms_mean": 1e3 * total / steps,
        "step_ms_median": 1e3 * times[len(times) // 2],
        "hit_rate_per_layer": [round(1 - float(a) / float(b), 4) for a, b in zip(loaded, selected)],
        "blocks_loaded_per_step": float(loaded.sum()) / steps,
        "blocks_loaded_per_step_per_layer_seq_head": float(loaded.sum()) / steps / (cfg.num_hidden_layers * batch * cfg.num_key_value_heads),
        "host_to_device_bytes_per_step": float(loaded.sum()) * block_bytes / steps,
        "spill_hits_per_step": float((after["spill_hits"] - before["spill_hits"]).sum()) / steps,
    }


def gather_bandwidth(block_size=64, head_dim=128, heads=2, pages=8192, entries=4096, reps=20) -> dict:
    """GB/s of the Triton gather reading pinned host memory, against a plain pinned->device copy of the
    same number of bytes, both timed with CUDA events (median)."""
    from nosa.ops.kernels import gather as kernels

    dtype = torch.bfloat16
    host_k = torch.empty((pages, heads, block_size, head_dim), dtype=dtype, pin_memory=True).normal_()
    host_v = torch.empty_like(host_k, pin_memory=True).normal_()
    slots_k = torch.empty((entries, block_size, heads, head_dim), dtype=dtype, device="cuda")
    slots_v = torch.empty_like(slots_k)
    g = torch.Generator().manual_seed(0)
    src = torch.randperm(pages * heads, generator=g)[:entries]
    src_page, head = (src // heads).int().cuda(), (src % heads).int().cuda()
    dst_page = torch.arange(entries, dtype=torch.int32, device="cuda")
    nbytes = 2 * entries * block_size * head_dim * 2
    flat_src = torch.empty(nbytes // 2, dtype=dtype, pin_memory=True)
    flat_dst = torch.empty(nbytes // 2, dtype=dtype, device="cuda")

    gather_ms = cuda_median_ms(lambda: kernels.gather_blocks(host_k, host_v, slots_k.transpose(1, 2), slots_v.transpose(1, 2), src_page, dst_page, head), reps=reps)
    copy_ms = cuda_median_ms(lambda: flat_dst.copy_(flat_src, non_blocking=True), reps=reps)
    # Entry m landed in slot m, head head[m]: compare a few entries with their host blocks.
    sample = torch.arange(16)
    got = slots_k[sample.cuda(), :, head[:16].long()].cpu()  # [16, bs, D]
    ok = bool(torch.equal(got, host_k[src_page[:16].long().cpu(), head[:16].long().cpu()]))
    return {"bytes": nbytes, "entries": entries, "block_bytes_per_head": block_size * head_dim * 2,
            "gather_gb_s": nbytes / gather_ms / 1e6, "pinned_memcpy_gb_s": nbytes / copy_ms / 1e6,
            "gather_vs_memcpy": copy_ms / gather_ms, "gather_correct": ok}


def hbm_copy_rate() -> float:
    """GB/s of a 2 GiB device copy, read + write bytes counted (how gpu-box.md quotes it)."""
    a = torch.empty(2**30, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    return 5 * 2 * a.numel() * 2 / start.elapsed_time(end) / 1e6


def weight_bytes_read_per_step(model, batch: int) -> int:
    """The weight bytes one decode step of `batch` rows reads: every parameter, except that an input
    embedding not tied to the LM head is read for the batch's rows only (a tied one is read whole by the
    LM head). Counting the whole embedding overstated the 8B shape's floor by 0.6 GB (~0.14 ms on an H200)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # shared tensors counted once
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is None or head.weight.data_ptr() != embed.data_ptr():
        total -= embed.numel() * embed.element_size()
        total += min(batch, embed.shape[0]) * embed.shape[1] * embed.element_size()
    return total


def batch_chosen_by(batch: int, max_batch: int | None = None, budget: int | None = None,
                    row_bytes: int | None = None, workspace: int | None = None) -> str:
    """What decided a row's batch (the result's `batch_from`): "fixed" without a budget (fixed-batch mode);
    under a budget "engine budget" where the budget admits no more rows than the batch, and
    "max_batch cap (budget fits N)" where the batch is the cap and the budget would admit N > it (the
    engine admits min(max_batch, (budget - workspace) // row_bytes) rows, `nosa.engine.budget`)."""
    if budget is None:
        return "fixed"
    fits = (budget - workspace) // row_bytes
    if max_batch is not None and batch >= max_batch and fits > batch:
        return f"max_batch cap (budget fits {fits})"
    return "engine budget"


def floor(run: dict, llm, args, hbm_gb_s: float, pcie_gb_s: float) -> dict:
    """The step's reference time (the `floor_*` keys; gpu-box.md calls it the floor): max(HBM bytes / HBM
    rate, PCIe bytes / PCIe rate) at the rates measured in the same run (a device copy, a pinned memcpy).
    It is not a lower bound: a kernel can read faster than the copy measures (dense SDPA decode read at
    1.06x it at 64K in bench/results/kernels.json). HBM bytes: the weights a step reads
    (`weight_bytes_read_per_step`) and the K/V the attention reads (every token in dense mode, at most
    topk x block_size tokens per sequence and KV head otherwise). The sparse modes' selection also reads every
    compressed key of the context once at the least (T / stride per sequence and KV head): that read is given
    apart (`selection_key_bytes_per_step`, `floor_hbm_with_selection_ms`), so `floor_ms` stays comparable
    with the files written before it was."""
    from nosa.ops import reference

    cfg = llm.config
    prompt = run.get("prompt_tokens_mean", args.prompt)  # below --prompt for a :spreadN row
    tokens = prompt if not cfg.sparse.is_sparse else min(prompt, cfg.sparse.selection_tokens)
    kv_bytes = 2 * cfg.num_hidden_layers * run["batch"] * tokens * cfg.num_key_value_heads * cfg.head_dim * 2
    # At the copy's combined read+write rate (gpu-box.md quotes HBM that way): a reference, not a bound.
    weights = run.get("weight_bytes_read_per_step", run["weight_bytes"])
    hbm_ms = (weights + kv_bytes) / hbm_gb_s / 1e6
    pcie_ms = run["host_to_device_bytes_per_step"] / pcie_gb_s / 1e6 if run["offload"] else 0.0
    sparse = cfg.sparse
    windows = reference.num_complete_windows(int(prompt), sparse.compress_kernel, sparse.compress_stride) if sparse.is_sparse else 0
    elem = torch.empty((), dtype=llm.model.dtype).element_size()
    key_bytes = cfg.num_hidden_layers * run["batch"] * windows * cfg.num_key_value_heads * cfg.head_dim * elem
    return {"floor_hbm_ms": hbm_ms, "floor_pcie_ms": pcie_ms, "floor_ms": max(hbm_ms, pcie_ms),
            "attention_kv_bytes_per_step": kv_bytes, "selection_key_bytes_per_step": key_bytes,
            "floor_hbm_with_selection_ms": (weights + kv_bytes + key_bytes) / hbm_gb_s / 1e6}


def profile_steps(llm, running, path: str, steps: int = 3) -> None:
    """Kernel time of a few eager decode steps, by kernel, to say where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    llm.use_cuda_graphs(False)
    try:
        time_decode(llm, running, 1, 1)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            time_decode(llm, running, 0, steps)
            torch.cuda.synchronize()
        with open(path, "w") as f:
            f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))
    finally:
        llm.use_cuda_graphs(True)


def make_config(mode: str, layers: int, max_len: int):
    from nosa import NosaConfig

    return NosaConfig(**SHAPE_8B, num_hidden_layers=layers, max_position_embeddings=max_len, attn_mode=mode)


def make_model(mode: str, layers: int, max_len: int):
    from nosa import NosaForCausalLM

    torch.manual_seed(0)
    config = make_config(mode, layers, max_len)
    with torch.device("cuda"):
        model = NosaForCausalLM(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.self_attn.eviction is not None:
                layer.self_attn.eviction.A.normal_(0.0, 1.0)  # A = 0 would make every score tie
    return model


def equal_memory_budget(args, max_len: int) -> int:
    """Device bytes the engine charges dense attention, all KV on the device, for N sequences (its own
    accounting: N rows plus the prefill workspace)."""
    from nosa.engine import LLM

    config = make_config("dense", args.layers, max_len)
    row, workspace = LLM.device_bytes(config, torch.bfloat16, False, max_len)
    return workspace + args.equal_memory_dense_batch * row


def decode_steps(args) -> int:
    """Decode steps a run may take: warm-up, timed, and a margin for the profiled ones."""
    return args.warmup + args.steps + 8


CONFIG_FORM = "attn_mode:on|off[:eager][:cacheN|:cacheauto][:poolcache|:copycache][:traces|:model][:fusegather|:gather][:spreadN][:mbN[:share]]"


class DecodeConfig(NamedTuple):
    """One row of a decode benchmark (a --configs entry)."""
    mode: str
    offload: bool
    eager: bool
    cache_blocks: int | str | None  # "auto": the engine sizes it (nosa.engine.budget)
    selection: str | None
    fuse_gather: bool | None  # None: the engine's default (nosa.engine.attention.FUSE_GATHER)
    length_spread: int = 0  # rows' prompts spread over (prompt - N, prompt] tokens (`spread_lengths`)
    micro_batches: int = 1  # the decode step's micro-batches (`LLM(micro_batches=...)`)
    share_launches: bool = False  # each micro-batch sizes its split launches for 1/N of the SMs (model_runner.SHARE_LAUNCHES)
    pooled_cache: bool | None = None  # the device cache pooled (poolcache) or copying (copycache); None: POOL_DEVICE_CACHE


def parse_configs(spec: str) -> list[DecodeConfig]:
    """CONFIG_FORM entries -> DecodeConfig(mode, offload, eager, cache_blocks or None, selection, fuse_gather).
    selection is "traces" (replay the --traces file of its mode), "model" (the random weights' own scores) or
    None (unsaid: traces when --traces is given, else the model), so one run can hold both kinds of row side
    by side; fusegather / gather (offload on): decode attention loads the misses itself, or a gather launch
    before it does (nosa.engine.attention.FUSE_GATHER; neither: the engine's default), so a run can time
    the two side by side; spreadN: the rows' prompts differ, spread evenly over the N tokens below --prompt
    (as a server's rows do; not with traces, which are recorded at one length); mbN: the decode step runs as
    N micro-batches of rows (on their own CUDA streams, `LLM(micro_batches=N)`), N >= 1; share (with mbN,
    N > 1): each micro-batch sizes its occupancy-split launches for 1/N of the SMs
    (nosa.engine.model_runner.SHARE_LAUNCHES), so the two ways can be timed side by side; poolcache / copycache
    (offload on, cacheN): the device cache as one pool of pages per row with a page map, or as separate slot
    and spill pages with copies between them (nosa.engine.block_cache.POOL_DEVICE_CACHE; neither: its
    default), for the same comparison."""
    configs = []
    for item in spec.split(","):
        fields = item.split(":")
        extra = fields[2:]
        cache = [f for f in extra if f.startswith("cache")]
        selection = [f for f in extra if f in ("traces", "model")]
        spread = [f for f in extra if f.startswith("spread")]
        micro = [f for f in extra if f.startswith("mb")]
        single = ("eager", "fusegather", "gather", "share", "poolcache", "copycache")
        ok = (len(fields) >= 2 and fields[1] in ("on", "off") and len(cache) <= 1 and len(selection) <= 1
              and len(spread) <= 1 and len(micro) <= 1
              and all(f in single or f in cache or f in selection or f in spread or f in micro for f in extra)
              and all(extra.count(f) <= 1 for f in single) and all(f[5:].isdigit() or f == "cacheauto" for f in cache)
              and all(f[6:].isdigit() for f in spread) and all(f[2:].isdigit() and int(f[2:]) >= 1 for f in micro))
        if ok and spread and "traces" in selection:
            ok = False  # traces are recorded at one prompt length
        if ok and ("fusegather" in extra or "gather" in extra) and fields[1] != "on":
            ok = False  # with offload off nothing is loaded
        if ok and "fusegather" in extra and "gather" in extra:
            ok = False
        if ok and ("copycache" in extra or "poolcache" in extra) and not (fields[1] == "on" and cache and cache[0] != "cacheauto"):
            ok = False  # only an offloaded cache of a given size has spill pages to pool or not
        if ok and "copycache" in extra and "poolcache" in extra:
            ok = False
        if ok and "share" in extra and not (micro and int(micro[0][2:]) > 1):
            raise ValueError(f"bad --configs entry {item!r}: share (launches sized for 1/N of the SMs per "
                             f"micro-batch) needs mbN with N > 1")
        if not ok or ((cache or selection) and fields[0] == "dense"):
            raise ValueError(f"bad --configs entry {item!r}: expected {CONFIG_FORM} "
                             f"(cacheN: N device cache blocks per (layer, sequence, KV head), cacheauto: the engine's 'auto' size; traces/model: replay the "
                             f"--traces file or use the weights' own selection, both for sparse modes only; "
                             f"fusegather or gather: with offload on only; spreadN: not with traces; mbN: N >= 1 micro-batches; "
                             f"share: after mbN; poolcache or copycache: with offload on and cacheN)")
        configs.append(DecodeConfig(fields[0], fields[1] == "on", "eager" in extra,
                                    (cache[0][5:] if cache[0] == "cacheauto" else int(cache[0][5:])) if cache else None,
                                    selection[0] if selection else None,
                                    True if "fusegather" in extra else False if "gather" in extra else None,
                                    int(spread[0][6:]) if spread else 0, int(micro[0][2:]) if micro else 1,
                                    "share" in extra,
                                    True if "poolcache" in extra else False if "copycache" in extra else None))
    return configs


def resolve_fuse_gather(requested: bool | None, offload: bool, default: bool) -> bool:
    """Whether a config's decode attention loads its misses itself: as its entry says (fusegather / gather),
    else the engine's default; never with offload off, which loads nothing."""
    return offload and (default if requested is None else requested)


def uses_traces(selection: str | None, traces: dict) -> bool:
    """Whether a sparse config replays traces: said per config, else whenever --traces is given."""
    return selection == "traces" or (selection is None and bool(traces))


def selection_parameters(configs: list[DecodeConfig], traces: dict) -> dict:
    """The run's "selection" label (and its traces' descriptions when any row replays them)."""
    # By field name: unpacked by position, this once read fuse_gather (appended after selection) as the
    # selection and labelled trace-driven runs "model scores", without their traces' description.
    traced = [uses_traces(config.selection, traces) for config in configs if config.mode != "dense"]
    if not any(traced):
        return {"selection": "model scores (random weights: a worst case for locality)"}
    label = ("trace-driven (sparse configs replay trained models' selections; dense configs select every block)"
             if all(traced) else
             "per row: trace-driven rows replay trained models' selections, the others use the random weights' "
             "own scores (a worst case for locality); dense selects every block")
    return {"selection": label, "traces": {mode: description for mode, (_, description) in traces.items()}}


def run_suite(args, equal_memory: bool, spec: str, name: str, shared: dict, models: dict, traces: dict) -> None:
    """One comparison (fixed batch, or equal device memory), written to bench/results/<name>.json."""
    from nosa import ops
    from nosa.engine import LLM

    import nosa.engine.attention as engine_attention
    import nosa.engine.model_runner as engine_model_runner
    import nosa.engine.block_cache as engine_block_cache

    configs = parse_configs(spec)
    max_len = args.prompt + decode_steps(args)
    budget = equal_memory_budget(args, max_len) if equal_memory else None
    if equal_memory:
        print(f"equal device memory: {budget / 2**20:.1f} MiB for every config (dense on GPU, batch {args.equal_memory_dense_batch})")
    parameters = {"shape": "8B layer shape (spec sec. 8)", **SHAPE_8B, "layers": args.layers, "layers_of_8b": 32,
                  "prompt_tokens": args.prompt, "timed_steps": args.steps, "warmup_steps": args.warmup,
                  "dtype": "bfloat16", "weights": "random", "prompt_cache": "synthetic (random K/V, model's eviction head)",
                  "sparse": "spec defaults (block 64, topk 64, sink 1, window 16, query 16, kernel 32, stride 16)",
                  "cuda_graphs": not args.no_cuda_graphs, "configs": spec, "source_commit": args.commit}
    parameters.update(selection_parameters(configs, traces))
    if equal_memory:
        parameters.update({"mode": "equal device memory", "gpu_memory_budget": budget,
                           "budget_from": f"dense, all KV on the device, batch {args.equal_memory_dense_batch} (LLM.device_bytes)",
                           "max_batch": args.max_batch})
    else:
        parameters.update({"mode": "fixed batch", "batch": args.batch})

    def save(runs: list, configs: list, complete: bool) -> None:
        """Write the runs measured so far (after each one, so a run cut short keeps what it measured)."""
        base = runs[0]["tokens_per_s"]  # the first config (engine-admitted batch in equal-memory mode)
        for run in runs:
            run["ratio_vs_baseline"] = run["tokens_per_s"] / base
        results = {"gather": shared["gather"], "baseline": {"attn_mode": configs[0].mode, "offload": configs[0].offload, "batch": runs[0]["batch"]},
                   "hbm_copy_gb_s": shared["hbm_copy_gb_s"], "complete": complete, "decode": runs}
        path = write_result(name, parameters, results)
        print(f"wrote {path}{'' if complete else ' (partial)'}", flush=True)

    runs = []
    default_fuse_gather = engine_attention.FUSE_GATHER
    default_share = engine_model_runner.SHARE_LAUNCHES
    default_pooled = engine_block_cache.POOL_DEVICE_CACHE
    for mode, offload, eager, cache_blocks, selection_kind, fuse_gather, length_spread, micro_batches, share, pooled_cache in configs:
        # Read when the cache is built.
        engine_block_cache.POOL_DEVICE_CACHE = default_pooled if pooled_cache is None else pooled_cache
        fuse_gather = resolve_fuse_gather(fuse_gather, offload, default_fuse_gather)
        engine_attention.FUSE_GATHER = fuse_gather  # read as each step begins: this config's graphs keep it
        engine_model_runner.SHARE_LAUNCHES = share  # read when the LLM sets its micro-batches
        if mode not in models:
            models[mode] = make_model(mode, args.layers, max_len)  # weights are read-only: shared by the suites
        model = models[mode]
        graphs = not (args.no_cuda_graphs or eager)
        if equal_memory:
            # The engine decides the batch: the largest number of rows its accounting fits in the budget.
            llm = LLM(model, device="cuda", offload=offload, max_model_len=max_len, max_num_seqs=args.max_batch,
                      gpu_memory_budget=budget, cuda_graphs=graphs, device_cache_blocks=cache_blocks,
                      micro_batches=micro_batches)
        else:
            llm = LLM(model, device="cuda", offload=offload, max_model_len=max_len, max_num_seqs=args.batch,
                      cuda_graphs=graphs, device_cache_blocks=cache_blocks, micro_batches=micro_batches)
        batch = llm.max_num_seqs
        row_bytes, workspace = LLM.device_bytes(model.config, model.dtype, offload, max_len, llm.device_cache_blocks)
        if offload:  # the whole batch's pages in one allocation (HostStore.reserve), not log2(batch) doublings
            llm.store.reserve(batch * ops.num_blocks(max_len, model.config.sparse.block_size))
        lengths = spread_lengths(args.prompt, batch, length_spread)
        running = synthetic_install(llm, lengths, torch.Generator(device="cuda").manual_seed(1))
        selection = "every block (dense)" if mode == "dense" else "model scores (random weights)"
        if mode != "dense" and uses_traces(selection_kind, traces):
            attach_traces(llm, running, traces[mode][0], args.prompt)
            selection = f"trace-driven: {traces[mode][1]['trace_file']}"
        run = {"attn_mode": mode, "offload": offload, "cuda_graphs": llm.uses_cuda_graphs, "batch": batch,
               "fuse_gather": fuse_gather, "micro_batches": micro_batches, "micro_batch_launch_share": share,
               "device_cache_pooled": llm.cache.pooled,
               "selection": selection, "length_spread": length_spread, "prompt_tokens_mean": sum(lengths) / batch,
               "device_cache_blocks": llm.cache.slots + llm.cache.spill_blocks if mode != "dense" else None,
               "device_cache_request": cache_blocks,
               "batch_from": batch_chosen_by(batch, args.max_batch, budget, row_bytes, workspace) if equal_memory else "fixed",
               **time_decode(llm, running, args.warmup, args.steps),
               # Offload off: the device store is the one copy of the KV (no slots); on: the selection slots.
               "device_kv_bytes_per_seq": (llm.cache.allocated_bytes()["kv_slots"] + (0 if offload else llm.store.capacity_bytes)) // batch,
               "device_bytes_per_row_charged": row_bytes, "device_workspace_bytes_charged": workspace,
               "device_bytes_charged": workspace + batch * row_bytes,
               "host_store_bytes": llm.store.allocated_bytes if offload else 0,
               "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
               "weight_bytes_read_per_step": weight_bytes_read_per_step(model, batch)}
        run.update(floor(run, llm, args, shared["hbm_copy_gb_s"], shared["gather"]["pinned_memcpy_gb_s"]))
        runs.append(run)
        # Every offloaded NOSA config is profiled after its timed steps (so its figures are not touched): the
        # first into --profile, the n-th (n > 0) into --profile with "_<n>" before the extension.
        if args.profile and mode == "nosa" and offload and not eager:
            count = shared.get("profiled", 0)
            stem, ext = os.path.splitext(args.profile)
            run["profiled_to"] = args.profile if count == 0 else f"{stem}_{count}{ext}"
            profile_steps(llm, running, run["profiled_to"])
            shared["profiled"] = count + 1
        print(f"{mode:9s} offload={'on ' if offload else 'off'}{' eager' if eager else ''}{' fusegather' if fuse_gather else ''}"
              f"{' traces' if selection.startswith('trace') else ''}{f' spread {length_spread}' if length_spread else ''}"
              f"{f' mb{micro_batches}' if micro_batches > 1 else ''}{' share' if share else ''}"
              f"{' pooled cache' if llm.cache.pooled else ''} batch {batch:3d} "
              f"{run['tokens_per_s']:9.1f} tok/s  step {run['step_ms_median']:.2f} ms (reference {run['floor_ms']:.2f})  "
              f"loads/step {run['blocks_loaded_per_step']:.1f}  hit {min(run['hit_rate_per_layer']):.3f}", flush=True)
        del llm, running
        # The engine holds reference cycles: collect it now, so its pinned host store is unregistered and
        # unmapped before the next config maps its own (uncollected, three 32 GiB stores filled the box).
        gc.collect()
        torch.cuda.empty_cache()
        save(runs, configs, complete=False)
    engine_attention.FUSE_GATHER = default_fuse_gather
    engine_model_runner.SHARE_LAUNCHES = default_share
    engine_block_cache.POOL_DEVICE_CACHE = default_pooled
    save(runs, configs, complete=True)


def main(args) -> int:
    if args.model is not None:  # a real checkpoint end to end (nosa/bench/checkpoint.py), CPU too
        from nosa.bench import checkpoint

        return checkpoint.main(args)
    if not torch.cuda.is_available():
        print("nosa bench decode needs a CUDA device")
        return 2
    suites = []
    if args.equal_memory_dense_batch > 0:
        suites.append((True, args.equal_configs or EQUAL_MEMORY_CONFIGS, args.equal_name if args.both else args.name))
    if args.both or args.equal_memory_dense_batch <= 0:
        suites.append((False, args.configs or FIXED_BATCH_CONFIGS, args.name))
    try:
        every_config = [config for _, spec, _ in suites for config in parse_configs(spec)]
    except ValueError as err:
        print(err)
        return 2
    traces = {}
    wanted = [(config.mode, config.selection) for config in every_config]
    if any(sel == "traces" for _, sel in wanted) and not args.traces:
        print("a config asks for :traces but no --traces file is given")
        return 2
    for config in every_config:
        if config.length_spread and config.mode != "dense" and config.selection is None and args.traces:
            print(f"a :spread{config.length_spread} config would replay traces (recorded at one length): say :model")
            return 2
        if config.length_spread >= args.prompt:
            print(f"a :spread{config.length_spread} config needs a spread below --prompt ({args.prompt})")
            return 2
    if args.traces:
        modes = {mode for mode, sel in wanted if sel != "model"}
        try:
            traces = load_benchmark_traces(args.traces, modes, args.prompt, args.layers, decode_steps(args))
        except (OSError, ValueError, KeyError) as err:
            print(f"--traces: {err}")
            return 2
    shared = {"gather": gather_bandwidth(), "hbm_copy_gb_s": hbm_copy_rate()}
    print(f"gather: {shared['gather']['gather_gb_s']:.1f} GB/s vs pinned memcpy {shared['gather']['pinned_memcpy_gb_s']:.1f} GB/s", flush=True)
    models: dict = {}
    for equal_memory, spec, name in suites:
        run_suite(args, equal_memory, spec, name, shared, models, traces)
    return 0
