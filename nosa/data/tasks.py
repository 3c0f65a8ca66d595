"""Synthetic long-context tasks, generated on the fly at an exact token length and needle depth.

Every sample is one sequence of exactly `length` tokens: [bos] instruction, a haystack of filler
sentences with needle statements inserted, the question, and the answer(s). `answer_spans` mark the
answer tokens: training puts its loss there only, and eval scores a sample correct when the model's
argmax predicts every answer token (teacher forcing; equal to greedy decoding reproducing the answer).

Solvable by construction: filler is lowercase words without digits, keys and variable names are
uppercase, values are digit strings, all drawn without repetition inside one sample; so each answer
occurs in the context exactly once (variable tracking: the value occurs exactly once and each answer
variable is assigned exactly once). `depth` in [0, 1] is where in the haystack the (queried) needle goes.

Tasks:
  passkey            one number hidden in the haystack; recall it
  multikey_niah      `num_needles` key -> number statements at random depths; recall one key's number
  mqar               `num_pairs` KEY=value pairs in one block; recall `num_queries` of them (one answer each)
  variable_tracking  `num_chains` chains VAR A = 12345, VAR B = A, ...; list the variables holding one value
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

import numpy as np

from nosa.data.tokenization import TextTokenizer

FILLER_WORDS = (
    "the quiet river runs past old stone walls and green fields where small birds sing in the morning light "
    "while farmers walk slowly toward the market with baskets of bread apples and cheese under a pale sky "
    "children laugh near the bridge as boats drift along the water and the wind moves through tall grass"
).split()


@dataclass
class TaskSample:
    """input_ids: exactly `length` tokens; answer_spans: [start, end) of each answer in input_ids."""

    task: str
    input_ids: list[int]
    answer_spans: list[tuple[int, int]]
    answers: list[str]
    length: int
    depth: float
    needle_starts: list[int] = field(default_factory=list)

    def labels(self) -> list[int]:
        """-100 everywhere except the answer tokens (the model shifts labels itself)."""
        labels = [-100] * len(self.input_ids)
        for start, end in self.answer_spans:
            labels[start:end] = self.input_ids[start:end]
        return labels

    def context_end(self) -> int:
        """Tokens before the first answer: what a model may read before answering."""
        return self.answer_spans[0][0]


def _codes(rng: np.random.Generator, count: int, letters: int) -> list[str]:
    # A list, not a set: set order depends on PYTHONHASHSEED and samples must be reproducible.
    codes: list[str] = []
    while len(codes) < count:
        code = "".join(rng.choice(list(string.ascii_uppercase), size=letters))
        if code not in codes:
            codes.append(code)
    return codes


def _numbers(rng: np.random.Generator, count: int, digits: int) -> list[str]:
    low, high = 10 ** (digits - 1), 10**digits
    if count > high - low:
        raise ValueError(f"cannot draw {count} distinct {digits}-digit numbers")
    return [str(v) for v in rng.choice(np.arange(low, high), size=count, replace=False)]


def _filler(tok: TextTokenizer, rng: np.random.Generator, budget: int) -> tuple[list[int], list[int]]:
    """Exactly `budget` filler tokens and the token offsets where a sentence starts (insertion points)."""
    ids: list[int] = []
    boundaries = [0]
    while len(ids) < budget:
        words = rng.choice(FILLER_WORDS, size=int(rng.integers(6, 14)))
        sentence = " ".join(words) + ". "
        ids.extend(tok.encode(sentence))
        boundaries.append(len(ids))
    # The last sentence is cut to land on the exact length; it is noise either way.
    del ids[budget:]
    return ids, [b for b in boundaries if b <= budget]


def _assemble(tok, rng, task, length, depth, instruction, needles, tail) -> TaskSample:
    """needles: [(depth, text)] in the order they must appear among equal depths; tail: [(text, is_answer)]."""
    head = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(instruction)
    needle_ids = [(d, tok.encode(text)) for d, text in needles]
    tail_ids = [(tok.encode(text), is_answer, text) for text, is_answer in tail]
    fixed = len(head) + sum(len(n) for _, n in needle_ids) + sum(len(t) for t, _, _ in tail_ids)
    budget = length - fixed
    if budget < 0:
        raise ValueError(f"length {length} is too short for task {task!r}: its fixed parts alone take {fixed} tokens")
    filler, boundaries = _filler(tok, rng, budget)
    bounds = np.asarray(boundaries)
    # Stable sort: needles of one chain keep their order when they land on the same boundary.
    order = sorted(range(len(needle_ids)), key=lambda i: needle_ids[i][0])
    inserts: dict[int, list[int]] = {}
    for i in order:
        d = needle_ids[i][0]
        point = int(bounds[np.argmin(np.abs(bounds - d * budget))])
        inserts.setdefault(point, []).append(i)
    ids = list(head)
    starts = [0] * len(needle_ids)
    cursor = 0
    for point in sorted(inserts):
        ids.extend(filler[cursor:point])
        cursor = point
        for i in inserts[point]:
            starts[i] = len(ids)
            ids.extend(needle_ids[i][1])
    ids.extend(filler[cursor:])
    spans, answers = [], []
    for piece, is_answer, text in tail_ids:
        if is_answer:
            spans.append((len(ids), len(ids) + len(piece)))
            answers.append(text)
        ids.extend(piece)
    if len(ids) != length:
        raise RuntimeError(f"task {task!r} assembled {len(ids)} tokens instead of {length}")
    return TaskSample(task, ids, spans, answers, length, float(depth), starts)


def passkey(tok, rng, length, depth, digits: int = 5) -> TaskSample:
    key = _numbers(rng, 1, digits)[0]
    return _assemble(
        tok, rng, "passkey", length, depth,
        "There is a pass key hidden in this text. Find it and remember it.\n",
        [(depth, f"The pass key is {key}. Remember it. ")],
        [("\nWhat is the pass key? The pass key is ", False), (key, True)],
    )


def multikey_niah(tok, rng, length, depth, num_needles: int = 4, digits: int = 7) -> TaskSample:
    keys = _codes(rng, num_needles, 6)
    values = _numbers(rng, num_needles, digits)
    depths = [depth] + [float(d) for d in rng.random(num_needles - 1)]
    needles = [(d, f"The magic number for {k} is {v}. ") for d, k, v in zip(depths, keys, values)]
    return _assemble(
        tok, rng, "multikey_niah", length, depth,
        "Some magic numbers are hidden in this text. Remember them.\n",
        needles,
        [(f"\nWhat is the magic number for {keys[0]}? The magic number for {keys[0]} is ", False), (values[0], True)],
    )


def mqar(tok, rng, length, depth, num_pairs: int = 8, num_queries: int = 4) -> TaskSample:
    if not 1 <= num_queries <= num_pairs:
        raise ValueError(f"mqar needs 1 <= num_queries <= num_pairs, got {num_queries} and {num_pairs}")
    keys = _codes(rng, num_pairs, 4)
    values = _numbers(rng, num_pairs, 4)
    block = "Memorize these pairs: " + ", ".join(f"{k}={v}" for k, v in zip(keys, values)) + ". "
    tail = [("\nRecall the pairs: ", False)]
    for j, i in enumerate(rng.choice(num_pairs, size=num_queries, replace=False)):
        tail += [(("" if j == 0 else ", ") + f"{keys[i]}=", False), (values[i], True)]
    return _assemble(tok, rng, "mqar", length, depth, "Key-value pairs are hidden in this text.\n", [(depth, block)], tail)


def variable_tracking(tok, rng, length, depth, num_chains: int = 2, hops: int = 4) -> TaskSample:
    names = _codes(rng, num_chains * (hops + 1), 5)
    values = _numbers(rng, num_chains, 5)
    needles = []
    for c in range(num_chains):
        chain = names[c * (hops + 1) : (c + 1) * (hops + 1)]
        if c == 0:
            depths = [depth + (1.0 - depth) * i / (hops + 1) for i in range(hops + 1)]
        else:
            depths = sorted(float(d) for d in rng.random(hops + 1))
        needles.append((depths[0], f"VAR {chain[0]} = {values[c]}. "))
        needles += [(depths[i], f"VAR {chain[i]} = {chain[i - 1]}. ") for i in range(1, hops + 1)]
    answer = " ".join(names[: hops + 1])
    return _assemble(
        tok, rng, "variable_tracking", length, depth,
        "Track the variable assignments in this text.\n",
        needles,
        [(f"\nFind all variables that are assigned the value {values[0]}. Answer: ", False), (answer, True)],
    )


TASKS = {"passkey": passkey, "multikey_niah": multikey_niah, "mqar": mqar, "variable_tracking": variable_tracking}


def generate_task(name: str, tok: TextTokenizer, rng: np.random.Generator, length: int, depth: float, **params) -> TaskSample:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    return TASKS[name](tok, rng, length, depth, **params)
