"""`nosa study report`: markdown tables from a quality study's summary.json (results/quality/), printed or
written into the README's `quality-report` section, so the README's quality figures come from the file.

Tables: training and loss (with each sparse mode's held-out loss against dense), task accuracy by
context length, where sparse modes found the answers' sources (when measured), and locality of decoding through the engine (overlap gamma between consecutive steps'
selections, newly needed blocks per (layer, sequence, KV head) per step, and violations of the spec's bound).
"""

from __future__ import annotations

import json
import os

from nosa.results.readme import replace_section

README_SECTION = "quality-report"
DEFAULT_SUMMARY = os.path.join("results", "quality", "summary.json")


def _stop_note(phase: dict) -> str:
    """Why a phase ended before its planned steps, as the tables say it."""
    if phase.get("stopped_by_answer_target"):
        means = ", ".join(f"{task} {nll:.2f}" for task, nll in phase["stopped_by_answer_target"].items())
        return f" (answers learnt: {means})"
    return " (time limit)" if phase.get("stopped_by_time_limit") else ""


def _num(value, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else "-"


def token_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _rows(summary: dict) -> list[dict]:
    try:
        return summary["results"]["rows"]
    except (KeyError, TypeError):
        raise ValueError("not a quality-study summary: it has no results.rows (written by `nosa study quality`)") from None


def training_table(rows: list[dict]) -> str:
    dense = next((r for r in rows if r["attn_mode"] == "dense"), None)
    base = dense.get("heldout_loss") if dense else None
    lines = ["| attn_mode | parameters | tokens trained | long-context steps | train s | val loss | held-out loss "
             "| vs dense |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        # every per-mode phase, in order (a recipe may split the per-mode training over several calls)
        per_mode = [p for p in r.get("phases", []) if not p.get("shared")]
        steps = " + ".join(f"{p['steps_done']}/{p['steps_planned']}" + _stop_note(p) for p in per_mode) or "-"
        held = r.get("heldout_loss")
        rel = f"{100 * (held / base - 1):+.1f}%" if isinstance(held, float) and base and r is not dense else "-"
        lines.append(f"| {r['attn_mode']} | {_num(r.get('parameters'), ',')} | {_num(r.get('tokens_trained'), ',')} | {steps} "
                     f"| {_num(r.get('train_wall_s'), '.0f')} | {_num(r.get('final_val_loss'), '.3f')} | {_num(held, '.3f')} | {rel} |")
    return "\n".join(lines)


def accuracy_table(rows: list[dict], tasks: list[str], lengths: list[int]) -> str:
    lines = ["| attn_mode | task | " + " | ".join(token_label(n) for n in lengths) + " |",
             "|---|---|" + "---|" * len(lengths)]
    for r in rows:
        for task in tasks:
            by_length = (r.get("accuracy") or {}).get(task, {})
            lines.append(f"| {r['attn_mode']} | {task} | " + " | ".join(_num(by_length.get(str(n)), '.2f') for n in lengths) + " |")
    return "\n".join(lines)


def source_table(rows: list[dict], tasks: list[str], lengths: list[int]) -> str | None:
    """Sparse modes: how often the selection held the block each answer token is copied from. None when no
    row has these figures (summaries written before they were measured)."""
    lines = ["| attn_mode | task | length | answer tokens | source forced | source selected | min over layers "
             "| max over layers | in right answers | in wrong answers |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for task in tasks:
            for n in lengths:
                src = ((r.get("accuracy_detail") or {}).get(task, {}).get(str(n)) or {}).get("source_selection")
                if not src or not src.get("answer_tokens"):
                    continue  # not measured, or no answer whose copy stands in the context (variable_tracking)
                layers = [x for x in src.get("selected_by_layer", []) if isinstance(x, (int, float))]
                lines.append(
                    f"| {r['attn_mode']} | {task} | {token_label(n)} | {src['answer_tokens']} | {_num(src.get('forced'), '.2f')} "
                    f"| {_num(src.get('selected'), '.2f')} | {_num(min(layers) if layers else None, '.2f')} "
                    f"| {_num(max(layers) if layers else None, '.2f')} | {_num(src.get('selected_in_correct_answers'), '.2f')} "
                    f"| {_num(src.get('selected_in_wrong_answers'), '.2f')} |")
    return "\n".join(lines) if len(lines) > 2 else None


def locality_table(rows: list[dict], lengths: list[int]) -> str:
    lines = ["| attn_mode | prompt | steps | gamma mean | gamma p5 | gamma min | bound | new blocks mean | p95 | max "
             "| violations |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for n in lengths:
            loc = (r.get("locality") or {}).get(str(n))
            if not loc:
                continue
            a = loc["all_prompts"]
            layers = a.get("per_layer", [])
            has_bound = any("violations_within_block" in layer for layer in layers)
            violations = (sum(layer.get("violations_within_block", 0) + layer.get("violations_at_boundary", 0) for layer in layers)
                          if has_bound else "-")
            lines.append(f"| {r['attn_mode']} | {token_label(n)} | {a['decode_steps']} | {_num(a['overlap_mean'], '.3f')} "
                         f"| {_num(a['overlap_p5'], '.3f')} | {_num(a['overlap_min'], '.3f')} | {_num(a.get('overlap_bound'), '.2f')} "
                         f"| {_num(a['new_blocks_mean'], '.2f')} | {_num(a['new_blocks_p95'], '.0f')} | {_num(a['new_blocks_max'], '.0f')} "
                         f"| {violations} |")
    return "\n".join(lines)


def shared_eval_line(summary: dict) -> str | None:
    """One line: retrieval of the shared (dense) phases' weights, 'after phase k (n tokens): task@length
    accuracy (answer NLL)', or None where the summary has no shared_eval (the first run's)."""
    shared = (summary.get("results") or {}).get("shared_eval")
    if not shared or not shared.get("phases"):
        return None
    parts = []
    for entry in shared["phases"]:
        cells = [f"{task}@{token_label(int(n))} {_num(c['accuracy'], '.2f')} ({_num(c['answer_nll'], '.2f')})"
                 for task, by_length in entry.get("tasks", {}).items()
                 for n, c in sorted(by_length.items(), key=lambda kv: int(kv[0]))]
        parts.append(f"after phase {entry['phase']} ({token_label(entry['seq_len'])} rows): " + (", ".join(cells) or "not measured"))
    return ("Retrieval of the shared dense weights, accuracy (answer NLL, nats per answer token; ln 10 = 2.30 "
            "is a digit guessed): " + "; ".join(parts) + ".")


def _source_section(rows, tasks, lengths) -> str | None:
    table = source_table(rows, tasks, lengths)
    if table is None:
        return None
    return ("Where sparse modes find the answers (nosa.eval.source_selection): of the (answer token, layer, KV head) "
            "triples, how often the block holding that token's copy in the context was selected, over all layers, in "
            "the layer where that was rarest and where it was most common, and within answers the model got right and wrong; \"source forced\" is the "
            "share of answer tokens whose source block the selection always holds (sink, own block, window):\n\n" + table)


def render(summary_path: str = DEFAULT_SUMMARY) -> str:
    with open(summary_path) as f:
        summary = json.load(f)
    rows = _rows(summary)
    study = summary["parameters"]["study"]
    tasks, lengths = study["eval"]["tasks"], study["eval"]["lengths"]
    machine = summary.get("machine", {})
    done = rows[0].get("phases", []) if rows else []  # the shared phases' records are the same in every row

    def phase_label(k, p):
        steps = f"{p['max_steps']} steps"
        if k < len(done) and p.get("shared") and done[k].get("steps_done") is not None:
            steps = f"{done[k]['steps_done']} of {p['max_steps']} steps" + _stop_note(done[k])
        return f"{p['seq_len']:,} tokens x {steps}" + (" (shared dense)" if p.get("shared") else "")

    phases = ", ".join(phase_label(k, p) for k, p in enumerate(study["phases"]))
    m = study["model"]
    return "\n\n".join([
        f"Model: {m['num_hidden_layers']} layers, hidden {m['hidden_size']}, {m['num_attention_heads']} query heads x "
        f"{m['head_dim']}, {m['num_key_value_heads']} KV heads, block {m['block_size']}, topk {m['topk_blocks']}. "
        f"Training phases: {phases}.",
        *filter(None, [shared_eval_line(summary)]),
        "Training and loss (held-out loss at 16K tokens of held-out text):\n\n" + training_table(rows),
        "Task accuracy (every answer token the argmax), by context length:\n\n" + accuracy_table(rows, tasks, lengths),
        *filter(None, [_source_section(rows, tasks, lengths)]),
        "Locality of decoding through the engine (256 steps after held-out text and after a task input; new blocks "
        "per (layer, sequence, KV head) per step):\n\n" + locality_table(rows, study["eval"].get("locality_lengths", [])),
        f"_{os.path.basename(summary_path)}: {machine.get('gpu') or machine.get('cpu')}, torch {machine.get('torch')}, "
        f"Triton {machine.get('triton')}, commit {(machine.get('commit') or 'unknown')[:10]}, {machine.get('date')}_",
    ])


def run(args) -> int:
    if not os.path.isfile(args.summary):
        raise FileNotFoundError(f"--summary {args.summary!r} does not exist (a quality study writes it: nosa study quality)")
    body = render(args.summary)
    if args.readme:
        replace_section(args.readme, README_SECTION, body)
        print(f"updated {args.readme}")
    else:
        print(body)
    return 0
