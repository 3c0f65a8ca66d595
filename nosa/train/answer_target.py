"""Stop training once the task answers are learnt: `stop_at_answer_nll` in the training config.

Retrieval forms abruptly and at a step that varies from run to run (the quality study's runs 3-6 saw it form
in different phases or not at all), so a fixed step count either stops before it forms or wastes the rest of
the budget after. The rule here stops a run once, for every named task, the answer tokens' mean NLL over the
last `stop_window_steps` steps is at or below its threshold. The mean is token-weighted over the window
(sum of answer NLL / answer tokens), so a step with few answers of a task weighs little. A task with no
answer token in the window has not shown anything yet and keeps the run going. The sums come from the
all-reduced per-step statistics; the loop still takes rank 0's decision through its stop flag, so the
processes agree even if their sums differed in the last bit.

The window starts empty at every (re)start: a run resumed from a checkpoint trains at least
`stop_window_steps` more steps before it can stop by its target. A run that ended by meeting its target
records the thresholds and the window in its end record; resuming it with a target that those window means
still meet (same window) trains nothing, and with a stricter or different target it trains on.
"""

from __future__ import annotations

import math
from collections import deque


DEFAULT_WINDOW_STEPS = 20


def target_still_met(end_record: dict, thresholds: dict[str, float], window_steps: int) -> bool:
    """Whether a run that ended by meeting its answer target (`end_record`, its metrics' end line) also meets
    `thresholds` over `window_steps`: the same window, and every named task's recorded mean at or below."""
    means = end_record.get("stopped_by_answer_target") or {}
    target = end_record.get("answer_target") or {}
    if not thresholds or target.get("window_steps") != window_steps:
        return False
    return all(means.get(task) is not None and means[task] <= limit for task, limit in thresholds.items())


class AnswerTarget:
    def __init__(self, thresholds: dict[str, float], window_steps: int):
        if window_steps < 1:
            raise ValueError(f"stop_window_steps must be >= 1, got {window_steps}")
        self.thresholds = dict(thresholds)
        self.window_steps = window_steps
        self._steps: deque[dict[str, tuple[float, float]]] = deque(maxlen=window_steps)

    @property
    def active(self) -> bool:
        return bool(self.thresholds)

    def update(self, nll_sums: dict[str, float], answer_tokens: dict[str, float]) -> bool:
        """Record one step's answer NLL sums and answer token counts by source; True once the target is
        met (the window is full and every named task's mean is at or below its threshold)."""
        self._steps.append({src: (float(nll_sums.get(src, 0.0)), float(answer_tokens.get(src, 0.0)))
                            for src in self.thresholds})
        if not self.active or len(self._steps) < self.window_steps:
            return False
        means = self.means()
        return all(means[src] is not None and means[src] <= limit for src, limit in self.thresholds.items())

    def means(self) -> dict[str, float | None]:
        """Each named task's token-weighted answer NLL over the window; None where it had no answer."""
        out = {}
        for src in self.thresholds:
            total = sum(step[src][0] for step in self._steps)
            tokens = sum(step[src][1] for step in self._steps)
            out[src] = total / tokens if tokens > 0 else None
        return out


def validate_thresholds(thresholds, mixture: dict, tasks) -> dict[str, float]:
    """The config's `stop_at_answer_nll`: a mapping of task -> NLL (nats per answer token), each task one
    that the mixture draws (a task it never draws would never meet its target, and the run would silently
    go to max_steps), each threshold finite and > 0."""
    if not isinstance(thresholds, dict):
        raise ValueError(f"stop_at_answer_nll must be a mapping of task -> answer NLL, got {thresholds!r}")
    out = {}
    for task, limit in thresholds.items():
        if isinstance(limit, bool):
            raise ValueError(f"stop_at_answer_nll.{task} must be a number, got {limit!r}")
        if task not in tasks:
            raise ValueError(f"stop_at_answer_nll names {task!r}, which is not a task; tasks: {sorted(tasks)}")
        if mixture.get(task, 0.0) <= 0:
            raise ValueError(f"stop_at_answer_nll names {task!r}, which the mixture does not draw "
                             f"(mixture: {mixture}); its target could never be met")
        try:
            value = float(limit)
        except (TypeError, ValueError):
            raise ValueError(f"stop_at_answer_nll.{task} must be a number, got {limit!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"stop_at_answer_nll.{task} must be finite and > 0, got {limit!r}")
        out[task] = value
    return out


def validate_window(window_steps, thresholds: dict, max_steps: int) -> int | None:
    """`stop_window_steps`: None (the default window, DEFAULT_WINDOW_STEPS, when there is a target) or an
    integer from 1 to max_steps (a longer window could never fill, so the target could never be met); refused
    without a target, where it would be silently ignored."""
    if window_steps is None:
        return None
    if not thresholds:
        raise ValueError(f"stop_window_steps={window_steps!r} is given without stop_at_answer_nll; "
                         "it only means something with a target")
    if isinstance(window_steps, bool) or not isinstance(window_steps, int) or not 1 <= window_steps <= max_steps:
        raise ValueError(f"stop_window_steps must be an integer from 1 to max_steps={max_steps} (a longer "
                         f"window never fills), got {window_steps!r}")
    return window_steps
