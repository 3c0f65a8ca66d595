"""Accuracy on the synthetic long-context tasks by context length and needle depth.

An answer counts as correct when the model's argmax predicts every one of its tokens given the true
prefix (teacher forcing). That is exactly the condition for greedy decoding to reproduce the answer, at
the cost of one forward pass per sample instead of one per answer token.
"""

from __future__ import annotations

import numpy as np
import torch

from nosa.data.tasks import TASKS, generate_task
from nosa.data.tokenization import TextTokenizer
from nosa.eval.locality import recording
from nosa.eval.source_selection import SourceCounts, count_sources


@torch.no_grad()
def answer_hits(model, samples, device, autocast=None) -> list[list[bool]]:
    """For samples of equal length: per sample, per answer span, whether every answer token is the argmax."""
    ids = torch.tensor([s.input_ids for s in samples], dtype=torch.long, device=device)
    first = min(s.answer_spans[0][0] for s in samples)
    keep = ids.shape[1] - first + 1  # logits from the token before the first answer onwards
    with autocast if autocast is not None else torch.autocast(device_type="cpu", enabled=False):
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
    predicted = logits.argmax(-1)  # predicted[:, j] is the guess for token (L - keep) + j + 1
    offset = ids.shape[1] - keep + 1
    hits = []
    for row, sample in enumerate(samples):
        row_hits = []
        for start, end in sample.answer_spans:
            guess = predicted[row, start - offset : end - offset]
            row_hits.append(bool((guess == ids[row, start:end]).all()))
        hits.append(row_hits)
    return hits


def answer_hits_and_sources(model, samples, device, autocast=None) -> tuple[list[list[bool]], SourceCounts]:
    """`answer_hits` and, from the same forward, whether each answer token's source block was selected
    (`nosa.eval.source_selection`). Sparse models only; samples of one length (one unpadded forward)."""
    cfg = model.config.sparse
    if not cfg.is_sparse:
        raise ValueError("source selection needs a sparse attn_mode (nosa, dma or infllmv2), not dense")
    if len({len(s.input_ids) for s in samples}) != 1:
        raise ValueError("answer_hits_and_sources takes samples of one length")
    with recording(model) as layers:
        hits = answer_hits(model, samples, device, autocast)
        logs = [layer.selection_log for layer in layers]
    if any(len(log) != 1 or log[0].shape[0] != len(samples) for log in logs):
        raise RuntimeError("expected one selection of the whole batch per layer from an unpadded forward")
    return hits, count_sources(samples, hits, [log[0] for log in logs], cfg)


def evaluate_tasks(model, tok: TextTokenizer, tasks, lengths, depths, samples_per_cell: int, device,
                   autocast=None, batch_size: int = 4, seed: int = 1234, task_params: dict | None = None,
                   check_sources: bool = False) -> dict:
    """{task: {'grid': [{length, depth, accuracy, answers}], 'by_length': {L: ...}, 'by_depth': {d: ...},
    'accuracy': overall}}. Samples are seeded by (seed, task, length, depth, index): reproducible, and
    disjoint from training rows, which are seeded by (train seed, 0, row). check_sources (sparse models):
    every grid cell and by_length entry also gets 'source_selection', whether the selection held the blocks
    the answers are copied from (`nosa.eval.source_selection.SourceCounts.as_dict`)."""
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; known: {sorted(TASKS)}")
    if samples_per_cell < 1:
        raise ValueError(f"samples_per_cell must be >= 1, got {samples_per_cell}")
    model.eval()
    results = {}

    def no_sources():
        return SourceCounts(model.config.num_hidden_layers, model.config.num_key_value_heads)

    for t_index, task in enumerate(tasks):
        grid, sources_by_length = [], {}
        for length in lengths:
            length_sources = no_sources()
            for d_index, depth in enumerate(depths):
                samples = [
                    generate_task(task, tok, np.random.default_rng([seed, 7, t_index, length, d_index, i]), length,
                                  depth, **(task_params or {}).get(task, {}))
                    for i in range(samples_per_cell)
                ]
                correct = answers = 0
                cell_sources = no_sources()
                for start in range(0, len(samples), batch_size):
                    batch = samples[start : start + batch_size]
                    if check_sources:
                        hits, counts = answer_hits_and_sources(model, batch, device, autocast)
                        cell_sources.merge(counts)
                        length_sources.merge(counts)
                    else:
                        hits = answer_hits(model, batch, device, autocast)
                    for row_hits in hits:
                        correct += sum(row_hits)
                        answers += len(row_hits)
                cell = {"length": length, "depth": depth, "correct": correct, "answers": answers,
                        "accuracy": correct / answers}
                if check_sources:
                    cell["source_selection"] = cell_sources.as_dict()
                grid.append(cell)
            sources_by_length[str(length)] = length_sources
        by_length = _marginal(grid, "length")
        if check_sources:
            for n, entry in by_length.items():
                entry["source_selection"] = sources_by_length[n].as_dict()
        results[task] = {
            "grid": grid,
            "by_length": by_length,
            "by_depth": _marginal(grid, "depth"),
            "accuracy": sum(g["correct"] for g in grid) / sum(g["answers"] for g in grid),
        }
    return results


def _marginal(grid, key) -> dict:
    table: dict = {}
    for cell in grid:
        entry = table.setdefault(str(cell[key]), {"correct": 0, "answers": 0})
        entry["correct"] += cell["correct"]
        entry["answers"] += cell["answers"]
    for entry in table.values():
        entry["accuracy"] = entry["correct"] / entry["answers"]
    return table
