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
  kv_recall          (training rows) many facts, each asked later inside the haystack, and a pass key
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

    def labels(self, full: bool = False) -> list[int]:
        """-100 everywhere except the answer tokens (the model shifts labels itself). full=True: every
        token is a label (language-model loss on the whole row, answers included): the needle's key and
        value then appear twice, so the row also teaches copying (induction), which answer-only rows,
        with ~5 label tokens in thousands, give too little signal for (docs/quality.md)."""
        if full:
            return list(self.input_ids)
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
    """`count` distinct uniform `digits`-digit numbers. Drawn with replacement and deduplicated in order
    (the same distribution as drawing without replacement), because rng.choice(replace=False) permutes
    the whole range: 9 million values for 7 digits, ~100 ms per sample, which starved training."""
    low, high = 10 ** (digits - 1), 10**digits
    if count > high - low:
        raise ValueError(f"cannot draw {count} distinct {digits}-digit numbers")
    if 4 * count > high - low:  # a dense draw: permuting the small range is cheap
        return [str(v) for v in rng.choice(np.arange(low, high), size=count, replace=False)]
    values: list[int] = []
    seen: set[int] = set()
    while len(values) < count:
        for v in rng.integers(low, high, size=2 * (count - len(values))).tolist():
            if v not in seen and len(values) < count:
                seen.add(v)
                values.append(v)
    return [str(v) for v in values]


def _filler(tok: TextTokenizer, rng: np.random.Generator, budget: int) -> tuple[list[int], list[int]]:
    """Exactly `budget` filler tokens and the token offsets where a sentence starts (insertion points)."""
    ids: list[int] = []
    boundaries = [0]
    while len(ids) < budget:
        # Sentences drawn in bulk (per-sentence generator calls dominated the time of a 16K row); a
        # sentence is still 6-13 uniform filler words.
        batch = max(4, (budget - len(ids)) // 40)
        sizes = rng.integers(6, 14, size=batch)
        words = rng.integers(0, len(FILLER_WORDS), size=int(sizes.sum())).tolist()
        at = 0
        for size in sizes.tolist():
            ids.extend(tok.encode(" ".join(FILLER_WORDS[w] for w in words[at : at + size]) + ". "))
            at += size
            boundaries.append(len(ids))
            if len(ids) >= budget:
                break
    # The last sentence is cut to land on the exact length; it is noise either way.
    del ids[budget:]
    return ids, [b for b in boundaries if b <= budget]


def _assemble(tok, rng, task, length, depth, instruction, needles, tail) -> TaskSample:
    """needles: [(depth, text)] in the order they must appear among equal depths, where text may be a
    (question, answer) pair: a question inside the haystack whose answer is an answer span too;
    tail: [(text, is_answer)]."""
    head = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(instruction)
    needle_ids, needle_answers = [], {}
    for i, (d, text) in enumerate(needles):
        if isinstance(text, tuple):
            question, answer = (tok.encode(t) for t in text)
            needle_answers[i] = (len(question), len(answer), text[1])
            needle_ids.append((d, question + answer))
        else:
            needle_ids.append((d, tok.encode(text)))
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
    for i in sorted(needle_answers, key=lambda i: starts[i]):
        offset, size, text = needle_answers[i]
        spans.append((starts[i] + offset, starts[i] + offset + size))
        answers.append(text)
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


def multikey_niah(tok, rng, length, depth, num_needles: int = 4, digits: int = 7, num_queries: int = 1) -> TaskSample:
    """num_queries > 1 (training rows): the first key (at `depth`) is asked first, then num_queries - 1
    other keys in random order, one answer span each: denser supervision from the same haystack."""
    if not 1 <= num_queries <= num_needles:
        raise ValueError(f"multikey_niah needs 1 <= num_queries <= num_needles, got {num_queries} and {num_needles}")
    keys = _codes(rng, num_needles, 6)
    values = _numbers(rng, num_needles, digits)
    depths = [depth] + [float(d) for d in rng.random(num_needles - 1)]
    needles = [(d, f"The magic number for {k} is {v}. ") for d, k, v in zip(depths, keys, values)]
    asked = [0]
    if num_queries > 1:  # drawn after everything else, so num_queries=1 samples are unchanged
        asked += [1 + int(i) for i in rng.permutation(num_needles - 1)[: num_queries - 1]]
    tail = []
    for i in asked:
        tail += [(f"\nWhat is the magic number for {keys[i]}? The magic number for {keys[i]} is ", False), (values[i], True)]
    return _assemble(
        tok, rng, "multikey_niah", length, depth,
        "Some magic numbers are hidden in this text. Remember them.\n",
        needles,
        tail,
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


def kv_recall(tok, rng, length, depth, facts_per_1k: float = 5.0, digits: int = 7) -> TaskSample:
    """Training rows with many retrievals: facts "The magic number for KEY is N." spread over the haystack,
    each asked later in the haystack in multikey_niah's own words at a uniformly random distance (every
    question is an answer span), plus the pass key statement asked at the end as in passkey. One row of
    16K tokens holds ~80 retrievals instead of one, at every distance; `depth` places the pass key."""
    count = max(1, int(length * facts_per_1k / 1000))
    keys = _codes(rng, count, 6)
    values = _numbers(rng, count + 1, digits)
    pass_key = values[-1][:5]
    needles = [(depth, f"The pass key is {pass_key}. Remember it. ")]
    for k, v in zip(keys, values):
        fact_at = float(rng.random())
        ask_at = fact_at + (1.0 - fact_at) * float(rng.random())
        needles.append((fact_at, f"The magic number for {k} is {v}. "))
        needles.append((ask_at, (f"What is the magic number for {k}? The magic number for {k} is ", f"{v}. ")))
    return _assemble(
        tok, rng, "kv_recall", length, depth,
        "There is a pass key and some magic numbers hidden in this text. Remember them.\n",
        needles,
        [("\nWhat is the pass key? The pass key is ", False), (pass_key, True)],
    )


TASKS = {"passkey": passkey, "multikey_niah": multikey_niah, "mqar": mqar, "variable_tracking": variable_tracking,
         "kv_recall": kv_recall}
# Tasks made for training rows only: their answers are not unique in the context by design (a fact is
# asked inside the haystack, and the answer then stands there twice), so evaluation tasks exclude them.
TRAINING_ONLY = ("kv_recall",)


def generate_task(name: str, tok: TextTokenizer, rng: np.random.Generator, length: int, depth: float, **params) -> TaskSample:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    return TASKS[name](tok, rng, length, depth, **params)
