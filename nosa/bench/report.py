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
        f"| {'atomic fwd+bwd ms' if atomic_variant else 'deterministic ms'} | NOSA tensor-core share | SDPA tensor-core share | NOSA decode µs | SDPA decode µs "
        "| decode speed-up | decode HBM share |",
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
    return "\n".join(rows + ["", note, "", _machine_line(data["machine"], path)])


def _selection_kind(row: dict) -> str:
    return "traces" if str(row.get("selection", "")).startswith("trace") else "model"


def decode_table(path: str) -> str:
    data = json.load(open(path))
    params, results = data["parameters"], data["results"]
    # A run that mixes trace-driven and model-scored rows says which is which in a column of its own.
    kinds = {_selection_kind(r) for r in results["decode"] if r["attn_mode"] != "dense"}
    mixed = len(kinds) > 1
    rows = [
        "| attn_mode | offload |" + (" selection |" if mixed else "") + " batch | batch chosen by | tokens/s | vs dense "
        "| step ms | floor ms | loads per (layer, seq, head) | hit rate |",
        "|---|---|" + ("---|" if mixed else "") + "---|---|---|---|---|---|---|---|",
    ]
    for r in results["decode"]:
        hit = r.get("hit_rate_per_layer") or []
        hit_rate = f"{sum(hit) / len(hit):.2f}" if hit else "-"
        batch = r.get("batch", params.get("batch"))
        mode = ("on" if r["offload"] else "off") + ("" if r.get("cuda_graphs", True) else " (eager)")
        if r.get("device_cache_blocks") and r["device_cache_blocks"] > params.get("topk_blocks", 64):
            mode += f", cache {r['device_cache_blocks']}"
        if r.get("fuse_gather"):
            mode += ", loads in attention"
        selection = f" {_selection_kind(r) if r['attn_mode'] != 'dense' else '-'} |" if mixed else ""
        rows.append(
            f"| {r['attn_mode']} | {mode} |{selection} {batch} | {r.get('batch_from', 'fixed')} | {r['tokens_per_s']:.0f} "
            f"| {r['ratio_vs_baseline']:.2f}x | {r['step_ms_median']:.2f} | {r.get('floor_ms', float('nan')):.2f} "
            f"| {r['blocks_loaded_per_step_per_layer_seq_head']:.1f} | {hit_rate} |"
        )
    gather = results.get("gather")
    lines = rows + [""]
    if gather:
        lines.append(f"Gather of missed blocks from pinned host memory: {gather['gather_gb_s']:.1f} GB/s, "
                     f"{100 * gather['gather_vs_memcpy']:.0f}% of a pinned memcpy ({gather['pinned_memcpy_gb_s']:.1f} GB/s) in the same run.")
        lines.append("")
    setup = ", ".join(f"{k}={params[k]}" for k in ("mode", "budget_from", "layers", "prompt_tokens", "batch", "timed_steps", "dtype", "weights") if k in params)
    lines.append(f"Setup: {setup}.")
    if "selection" in params:
        lines.append("")
        rows = "; ".join(sorted({f"{r['attn_mode']}: {r['selection']}" for r in results['decode'] if 'selection' in r}))
        # The run's description may itself start with "per row" (mixed runs); say it once.
        joiner = "; the rows: " if params["selection"].startswith("per row") else "; per row: "
        lines.append(f"Selection: {params['selection']}{joiner}{rows}.")
    for key in ("run_note", "commit_note"):
        if key in params:
            lines.append("")
            lines.append(f"Note: {params[key]}.")
    lines.append("")
    lines.append(_machine_line(data["machine"], path, params))
    return "\n".join(lines)


def render(directory: str = RESULTS_DIR) -> str:
    sections = []
    kernels = os.path.join(directory, "kernels.json")
    if os.path.exists(kernels):
        sections.append("### Kernels (`nosa bench kernels`, one layer of the 8B shape, bf16)\n\n" + kernels_table(kernels))
    for path in sorted(glob.glob(os.path.join(directory, "decode*.json"))):
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
        raise FileNotFoundError(f"--results {args.results!r} holds no kernels.json or decode*.json: nothing to report")
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
