"""Whether a sparse model's selection holds the blocks an answer is copied from.

In the retrieval tasks every answer token also stands earlier in the context (the needle): a model predicts
answer token j at query position j - 1 by attending to the needle's copy of token j. If that token's block
is not among the query's selected blocks, no attention weight can recover it; if it is and the answer is
still wrong, the attention had the block and did not use it. This tells the two apart, per (layer, KV head),
from the very forward that scores the answers (the layers' `selection_log`), and counts how often the
source block was forced (sinks, own block, window: selected whatever the scores say), so that the rest is
what the query-aware and agnostic parts of the selection found. An answer whose tokens do not stand in the
context as one run (variable_tracking's chain of names) has no source and is only counted as such.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nosa.ops.reference import forced_blocks


def source_start(sample, span: tuple[int, int]) -> int | None:
    """Where the copy of the answer `span` begins in the tokens before it (its last occurrence there), or
    None when the answer's tokens do not stand there as one run. The answer is encoded apart from the
    needle's text, so with a subword tokenizer its tokens may differ from the needle's and it has no source;
    the study's byte tokens always match."""
    start, end = span
    answer = sample.input_ids[start:end]
    context = sample.input_ids[:start]
    width = len(answer)
    for at in range(len(context) - width, -1, -1):
        if context[at : at + width] == answer:
            return at
    return None


def answer_sources(sample, span: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(queries, sources) int64 [n]: the query position predicting each answer token (token j is predicted
    at j - 1) and the position of that token's copy in the context; None without a source."""
    src = source_start(sample, span)
    if src is None:
        return None
    start, end = span
    queries = torch.arange(start - 1, end - 1)
    return queries, src + (queries + 1 - start)


@dataclass
class SourceCounts:
    """Counts over answer tokens whose source was found; `selected` is per layer, over (token, KV head)."""

    num_layers: int
    num_kv_heads: int
    tokens: int = 0
    answers_without_source: int = 0
    forced: int = 0
    selected: list[int] = field(default_factory=list)
    tokens_correct: int = 0
    selected_correct: int = 0  # summed over layers and heads, answers predicted right
    selected_wrong: int = 0

    def __post_init__(self):
        if not self.selected:
            self.selected = [0] * self.num_layers

    def merge(self, other: "SourceCounts") -> None:
        for name in ("tokens", "answers_without_source", "forced", "tokens_correct", "selected_correct", "selected_wrong"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.selected = [a + b for a, b in zip(self.selected, other.selected)]

    def as_dict(self) -> dict:
        """Fractions (None where nothing was counted) with the counts they come from."""
        pairs = self.num_kv_heads * self.num_layers

        def frac(num, den):
            return num / den if den else None

        per_layer = [frac(s, self.tokens * self.num_kv_heads) for s in self.selected]
        wrong_tokens = self.tokens - self.tokens_correct
        return {
            "answer_tokens": self.tokens,
            "answers_without_source": self.answers_without_source,
            "forced": frac(self.forced, self.tokens),
            "selected": frac(sum(self.selected), self.tokens * pairs),
            "selected_by_layer": per_layer,
            "selected_in_correct_answers": frac(self.selected_correct, self.tokens_correct * pairs),
            "selected_in_wrong_answers": frac(self.selected_wrong, wrong_tokens * pairs),
            "answer_tokens_correct": self.tokens_correct,
        }


def count_sources(samples, hits: list[list[bool]], selections: list[torch.Tensor], cfg) -> SourceCounts:
    """samples: equal-length TaskSamples; hits: answer_hits' result for them; selections: per layer the
    selected blocks [B, T, H, K] of that forward; cfg: the model's SparseAttentionConfig."""
    counts = SourceCounts(len(selections), selections[0].shape[2])
    for row, sample in enumerate(samples):
        for (start, end), correct in zip(sample.answer_spans, hits[row]):
            found = answer_sources(sample, (start, end))
            if found is None:
                counts.answers_without_source += 1
                continue
            queries, sources = found
            needed = sources // cfg.block_size  # the block holding each token's copy
            forced = forced_blocks(needed, queries // cfg.block_size, cfg)
            # [L, n, H]: whether (layer, token, KV head) selected the needed block
            chosen = torch.stack([(sel[row, queries.to(sel.device)].cpu() == needed[:, None, None]).any(-1)
                                  for sel in selections])
            n = int(queries.numel())
            counts.tokens += n
            counts.forced += int(forced.sum())
            per_layer = chosen.sum(dim=(1, 2))
            counts.selected = [a + int(b) for a, b in zip(counts.selected, per_layer)]
            if correct:
                counts.tokens_correct += n
                counts.selected_correct += int(per_layer.sum())
            else:
                counts.selected_wrong += int(per_layer.sum())
    return counts
