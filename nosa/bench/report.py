"""`nosa bench report`: markdown tables from the committed result files, so the README's figures are
generated from bench/results/*.json rather than typed by hand."""

from __future__ import annotations

import glob
import json
import os

from nosa.bench.common import RESULTS_DIR
from nosa.results.readme import replace_section, section_markers

README_SECTION = "bench-report"
README_START, README_END = section_markers(README_SECTION)


def _machine_line(machine: dict, path: str, parameters: dict | None = None) -> str:
    # Runs on the device machine carry no git metadata; some recorded the source commit as a parameter.
    commit = (machine.get("commit") or (parameters or {}).get("source_commit") or "unknown")[:10]
    return (f"_{os.path.basename(path)}: {machine.get('gpu')}, driver {machine.get('driver')}, torch {machine.get('torch')}, "
            f"Triton {machine.get('triton')}, CUDA {machine.get('cuda')}, commit {commit}, {machine.get('date')}_")


def _cell(r, key, fmt, scale=1.0):
    value = r.get(key)
    return "-" if value is None else format(scale * value, fmt)


def kernels_table(path: str) -> str:
    data = json.load(open(path))
    # Files since the fixed-order backward became the default time the atomic one beside it; earlier files
    # timed the atomic default and the deterministic variant.
    atomic_variant = any("nosa_fwd_bwd_atomic_ms" in r for r in data["results"])
    variant_key = "nosa_fwd_bwd_atomic_ms" if atomic_variant else "nosa_fwd_bwd_deterministic_ms"
    rows = [
        "| tokens | selection ms | NOSA fwd+bwd ms | SDPA fwd+bwd ms | fwd+bwd speed-up | fla NSA fwd+bwd ms | vs fla "
        f"| {'atomic fwd+bwd ms' if atomic_variant else 'deterministic ms'} | NOSA tensor-core share | SDPA tensor-core share "
        "| NOSA decode attention µs (no selection) | SDPA decode µs | decode attention speed-up (no selection) | decode HBM share |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        if "error" in r:
            rows.append(f"| {r['tokens']:,} | {r['error'][:80]} |" + " |" * 12)
            continue
        rows.append(
            f"| {r['tokens']:,} | {r['nosa_selection_ms']:.2f} | {r['nosa_fwd_bwd_ms']:.2f} | {_cell(r, 'dense_fwd_bwd_ms', '.2f')} "
            f"| {_cell(r, 'speedup_fwd_bwd', '.2f')}x | {_cell(r, 'fla_fwd_bwd_ms', '.2f')} | {_cell(r, 'speedup_vs_fla_fwd_bwd', '.2f')}{'x' if 'speedup_vs_fla_fwd_bwd' in r else ''} "
            f"| {_cell(r, variant_key, '.2f')} | {_cell(r, 'nosa_fwd_bwd_tc_fraction', '.0f', 100)}% "
            f"| {_cell(r, 'dense_fwd_bwd_tc_fraction', '.0f', 100)}% | {_cell(r, 'nosa_decode_ms', '.0f', 1000)} "
            f"| {_cell(r, 'dense_decode_ms', '.0f', 1000)} | {_cell(r, 'speedup_decode', '.2f')}x "
            f"| {_cell(r, 'nosa_decode_hbm_fraction', '.0f', 100)}% |"
        )
    fla = data.get("parameters", {}).get("fla", {})
    note = (f"fla-core {fla['version']} NSA selected attention on the same block indices, no bias, selection excluded."
            if "version" in fla else f"fla column absent: {fla.get('absent', 'not measured in this run')}.")
    note += (" NOSA fwd+bwd: the default fixed-order (deterministic) dk/dv backward, beside it the same with atomics."
             if atomic_variant else " NOSA fwd+bwd: dk/dv with atomics (the default when measured), beside it deterministic=True.")
    # Files before 2026-12-04 timed the counting-threshold composition (then the GPU default) as
    # nosa_selection_ms, with arg-max beside it; since then arg-max is the default and the threshold the variant.
    argmax = [r for r in data["results"] if "error" not in r and "nosa_selection_argmax_ms" in r]
    if argmax:
        note += (" Selection (and so NOSA fwd+bwd, which includes it): the counting-threshold composition, this run's "
                 "default; arg-max (the default since) took " + " / ".join(f"{r['nosa_selection_argmax_ms']:.2f}" for r in argmax)
                 + " ms at " + " / ".join(f"{r['tokens']:,}" for r in argmax) + " tokens in the same run.")
    note += (" Decode: one attention call over the selected slots (CUDA-graph replays); NOSA's selection (query-aware"
             " scores, composition) and the engine's bookkeeping are not timed, so the decode speed-up is the"
             " attention's, not a decode step's. HBM share: bytes / time / the device-copy rate measured in the run"
             " (a reference, not a ceiling).")
    return "\n".join(rows + ["", note, "", _machine_line(data["machine"], path)])


def _selection_kind(row: dict) -> str:
    return "traces" if str(row.get("selection", "")).startswith("trace") else "model"


def _batch_from(row: dict, params: dict) -> str:
    """The row's `batch_from`, except that files written before the label told the max_batch cap from the
    budget ("engine budget" for both) are relabelled from their own budget, cap and per-row charges."""
    label = row.get("batch_from", "fixed")
    keys = ("device_bytes_per_row_charged", "device_workspace_bytes_charged")
    if label == "engine budget" and "gpu_memory_budget" in params and all(k in row for k in keys):
        from nosa.bench.decode import batch_chosen_by

        label = batch_chosen_by(row["batch"], params.get("max_batch"), params["gpu_memory_budget"],
                                row["device_bytes_per_row_charged"], row["device_workspace_bytes_charged"])
    return label


def _one_copy_dense(results: dict) -> dict | None:
    """The dense row run at the batch one KV copy fits (files from the engine that charged dense two copies)."""
    for r in results["decode"]:
        if r["attn_mode"] == "dense" and str(r.get("batch_from", "")).startswith("single-copy dense"):
            return r
    return None


def decode_table(path: str) -> str:
    data = json.load(open(path))
    params, results = data["parameters"], data["results"]
    # A run that mixes trace-driven and model-scored rows says which is which in a column of its own.
    kinds = {_selection_kind(r) for r in results["decode"] if r["attn_mode"] != "dense"}
    mixed = len(kinds) > 1
    # Where the engine charged dense two KV copies, the fair baseline is the one-copy dense row: its ratio
    # comes first, the engine-admitted (two-copy) dense ratio second and labelled so.
    one_copy = _one_copy_dense(results)
    ratios = " vs one-copy dense | vs two-copy dense (engine-admitted) |" if one_copy else " vs dense |"
    # Runs since 2026-12-08 also time each step's graph replay on the device: the rest is the host's.
    split = any("graph_ms_median" in r for r in results["decode"])
    rows = [
        "| attn_mode | offload |" + (" selection |" if mixed else "") + " batch | batch chosen by | tokens/s |" + ratios
        + " step ms |" + (" graph ms | host ms |" if split else "") + " reference ms | loads per (layer, seq, head) | hit rate |",
        "|---|---|" + ("---|" if mixed else "") + "---|---|---|" + ("---|---|" if one_copy else "---|") + "---|"
        + ("---|---|" if split else "") + "---|---|---|",
    ]
    for r in results["decode"]:
        hit = r.get("hit_rate_per_layer") or []
        hit_rate = f"{sum(hit) / len(hit):.2f}" if hit else "-"
        batch = r.get("batch", params.get("batch"))
        mode = ("on" if r["offload"] else "off") + ("" if r.get("cuda_graphs", True) else " (eager)")
        if r.get("device_cache_request") == "auto":
            mode += f", cache auto ({r['device_cache_blocks']})"
        elif r.get("device_cache_blocks") and r["device_cache_blocks"] > params.get("topk_blocks", 64):
            mode += f", cache {r['device_cache_blocks']}"
        if not r.get("device_cache_pooled", False) and r["offload"] and (r.get("device_cache_blocks") or 0) > params.get("topk_blocks", 64):
            mode += " (slot/spill copies)"  # runs before 2026-12-08 (no such key) all copied
        elif r.get("device_cache_pooled"):
            mode += " (pooled)"
        if r.get("fuse_gather"):
            mode += ", loads in attention"
        if r.get("micro_batches", 1) > 1:
            mode += f", {r['micro_batches']} micro-batches"
            if r.get("micro_batch_launch_share"):
                mode += " (launches sized for a share of the SMs)"
        if r.get("length_spread"):
            mode += f", prompts spread over {r['length_spread']} tokens"
        selection = f" {_selection_kind(r) if r['attn_mode'] != 'dense' else '-'} |" if mixed else ""
        ratio = (f"| {r['tokens_per_s'] / one_copy['tokens_per_s']:.2f}x " if one_copy else "") + f"| {r['ratio_vs_baseline']:.2f}x "
        rows.append(
            f"| {r['attn_mode']} | {mode} |{selection} {batch} | {_batch_from(r, params)} | {r['tokens_per_s']:.0f} "
            f"{ratio}| {r['step_ms_median']:.2f} |" + (f" {_cell(r, 'graph_ms_median', '.2f')} | {_cell(r, 'host_ms_median', '.2f')} |" if split else "")
            + f" {r.get('floor_ms', float('nan')):.2f} "
            f"| {r['blocks_loaded_per_step_per_layer_seq_head']:.1f} | {hit_rate} |"
        )
    gather = results.get("gather")
    lines = rows + [""]
    if one_copy:
        base = results.get("baseline", {})
        lines.append(f"Baselines: the engine that ran this charged dense two copies of its KV (store and slots), so it "
                     f"admitted {base.get('batch', '?')} dense rows; the one-copy dense row ran {one_copy['batch']} rows, "
                     "the batch one copy fits in the same budget, outside the engine's admission. The one-copy ratio is "
                     "the fair one; the two-copy ratio overstates every row's ratio.")
        lines.append("")
    if gather:
        lines.append(f"Gather of missed blocks from pinned host memory: {gather['gather_gb_s']:.1f} GB/s, "
                     f"{100 * gather['gather_vs_memcpy']:.0f}% of a pinned memcpy ({gather['pinned_memcpy_gb_s']:.1f} GB/s) in the same run.")
        lines.append("")
    setup = ", ".join(f"{k}={params[k]}" for k in ("mode", "budget_from", "max_batch", "layers", "prompt_tokens", "batch", "timed_steps", "dtype", "weights") if k in params)
    lines.append(f"Setup: {setup}.")
    if "selection" in params:
        lines.append("")
        rows = "; ".join(sorted({f"{r['attn_mode']}: {r['selection']}" for r in results['decode'] if 'selection' in r}))
        # The run's description may itself start with "per row" (mixed runs); say it once.
        joiner = "; the rows: " if params["selection"].startswith("per row") else "; per row: "
        lines.append(f"Selection: {params['selection']}{joiner}{rows}.")
    if results.get("complete") is False:
        given = len(str(params.get("configs", "")).split(",")) if params.get("configs") else None
        lines.append("")
        lines.append(f"Partial run: it stopped after {len(results['decode'])} configs"
                     + (f" of the {given} it was given" if given else "") + " (the rows above are all it measured).")
    for key in ("run_note", "commit_note"):
        if key in params:
            lines.append("")
            lines.append(f"Note: {params[key]}.")
    lines.append("")
    lines.append(_machine_line(data["machine"], path, params))
    return "\n".join(lines)


DECODE_COLUMNS = (
    "In the decode tables: step ms is the median step; tokens/s and every ratio come from the whole timed run. "
    "Reference ms (the files' `floor_ms`) is the step's bytes at the rates measured in the same run, the larger of "
    "HBM bytes / a device copy's rate and PCIe bytes / a pinned memcpy's rate: a reference, not a lower bound (a "
    "kernel can read HBM faster than the copy measures). Graph ms (where given) is the median step's CUDA graph "
    "replay timed on the device, host ms the median of each step's time minus its replay: the host's work while "
    "the device waits (inputs staged, tokens read back and handed to the sequences). \"Batch chosen by\" says what set the batch: fixed, the "
    "engine's admission under the device budget, or the max_batch cap where the budget would admit more.")


# `nosa bench kernels` files in the README, in this order (kernels_sweep / kernels_first_version are other
# benches' formats).
KERNEL_FILES = ("kernels_h200.json", "kernels_h100.json", "kernels.json")


def render(directory: str = RESULTS_DIR) -> str:
    sections = []
    # The newest run of the current kernels first (H200, then H100), the first full H200 run after them.
    for name in KERNEL_FILES:
        kernels = os.path.join(directory, name)
        if os.path.exists(kernels):
            title = os.path.splitext(name)[0]
            sections.append(f"### Kernels (`nosa bench kernels`, one layer of the 8B shape, bf16, {title})\n\n"
                            + kernels_table(kernels))
    decode_files = sorted(glob.glob(os.path.join(directory, "decode*.json")))
    if decode_files:
        sections.append("### Decode tables: what the columns say\n\n" + DECODE_COLUMNS)
    for path in decode_files:
        title = os.path.splitext(os.path.basename(path))[0]
        sections.append(f"### Decode throughput (`nosa bench decode`, {title})\n\n" + decode_table(path))
    return "\n\n".join(sections)


def update_readme(readme: str, body: str) -> None:
    replace_section(readme, README_SECTION, body)


def run(args) -> int:
    if not os.path.isdir(args.results):
        raise FileNotFoundError(f"--results {args.results!r} is not a directory (the result files live in {RESULTS_DIR})")
    body = render(args.results)
    if not body:
        raise FileNotFoundError(f"--results {args.results!r} holds none of {', '.join(KERNEL_FILES)} and no decode*.json: nothing to report")
    if args.readme:
        update_readme(args.readme, body)
        print(f"updated {args.readme}")
    else:
        print(body)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("report", help="markdown tables from bench/results/*.json (optionally into the README)")
    parser.add_argument("--results", default=RESULTS_DIR)
    parser.add_argument("--readme", default=None, help="rewrite the README's bench-report section in place")
    parser.set_defaults(func=run)
