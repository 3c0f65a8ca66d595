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
  copy_drill         (training rows) random characters with random spans that stand twice at random
                     offsets: the only predictable tokens are the second copies, found by content
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


# Characters of copy_drill rows: what the tasks' keys, values and filler are made of (letters, digits, space,
# the punctuation of the needles), so a copying skill learnt on them applies to the tasks' tokens.
COPY_ALPHABET = string.ascii_lowercase + string.ascii_uppercase + string.digits + " .,=?"


_ALPHABETS: list = []  # (tokenizer, characters, token ids): encoding 67 characters per row cost more than the row


def _copy_alphabet(tok) -> tuple[list[str], np.ndarray]:
    for known, chars, ids in _ALPHABETS:
        if known is tok:
            return chars, ids
    chars = [c for c in COPY_ALPHABET if len(tok.encode(c)) == 1]
    ids = np.asarray([tok.encode(c)[0] for c in chars], dtype=np.int64)
    del _ALPHABETS[:-3]  # a few tokenizers at most are alive at once
    _ALPHABETS.append((tok, chars, ids))
    return chars, ids


def copy_drill(tok, rng, length, depth, copy_fraction: float = 0.8, span_min: int = 8, span_max: int = 32,
               cue: int = 3, alphabet: int = 0) -> TaskSample:
    """Training rows where the loss can fall only by content-based copying: uniform random characters of
    COPY_ALPHABET, with spans of span_min..span_max random characters each placed twice, at random offsets
    (both copies of every span land anywhere in the row, so copy distances range over the whole row;
    a longer row drills longer distances). About `copy_fraction` of the row's tokens belong to a span
    (half of them second copies). Nothing marks where a copy starts: the first `cue` tokens of a second
    copy are the cue that finds the first one, and the answer span is the rest of the second copy, so
    the logged answer NLL of this source is the loss of what copying can predict (ln 67 = 4.2 without
    it). `depth` is not used (the spans are everywhere). One numpy draw per part: ~1 ms for 16K tokens.
    `alphabet` > 0 draws from the first `alphabet` characters of COPY_ALPHABET only (the copies' NLL is
    then ln(alphabet) unseen; 0 = all of them).

    Tokens: each character is encoded alone (exact for the byte tokenizer; a subword tokenizer gets its
    single-character tokens, a non-canonical but valid tokenization)."""
    if not 0.0 < copy_fraction < 1.0:
        raise ValueError(f"copy_drill needs 0 < copy_fraction < 1, got {copy_fraction}")
    if not 0 <= cue < span_min <= span_max:
        raise ValueError(f"copy_drill needs 0 <= cue < span_min <= span_max, got {cue}, {span_min}, {span_max}")
    chars, ids = _copy_alphabet(tok)
    if not 0 <= alphabet <= len(ids) or alphabet == 1:
        raise ValueError(f"copy_drill needs alphabet 0 (all) or 2..{len(ids)}, got {alphabet}")
    if alphabet:
        chars, ids = chars[:alphabet], ids[:alphabet]
    head = [tok.bos_id] if tok.bos_id is not None else []
    body = length - len(head)
    if body < 2 * span_max:
        raise ValueError(f"length {length} is too short for copy_drill with span_max {span_max}")
    target = copy_fraction * body / 2  # tokens of first copies (and as many of second copies)
    sizes = rng.integers(span_min, span_max + 1, size=int(target / span_min) + 1)
    count = max(1, int(np.searchsorted(np.cumsum(sizes), target, side="right")))
    sizes = sizes[:count]
    filler = body - 2 * int(sizes.sum())
    # slot order: each span id twice; the first time an id appears is its first copy
    order = rng.permutation(np.repeat(np.arange(count), 2))
    gaps = np.diff(np.concatenate([[0], np.sort(rng.integers(0, filler + 1, size=2 * count)), [filler]]))
    content = rng.integers(0, len(ids), size=filler + int(sizes.sum()))
    span_at = np.concatenate([[0], np.cumsum(sizes)])  # span k's characters: content[span_at[k]:span_at[k+1]]
    fill = content[span_at[-1]:]
    pieces, firsts, seconds, pos, used = [fill[:gaps[0]]], [-1] * count, [-1] * count, len(head) + int(gaps[0]), int(gaps[0])
    for slot, k in enumerate(order.tolist()):
        if firsts[k] < 0:
            firsts[k] = pos
        else:
            seconds[k] = pos
        pieces.append(content[span_at[k]:span_at[k + 1]])
        pos += int(sizes[k])
        g = int(gaps[slot + 1])
        pieces.append(fill[used:used + g])
        used += g
        pos += g
    out = np.concatenate([np.asarray(head, dtype=np.int64), ids[np.concatenate(pieces)]])
    if len(out) != length:
        raise RuntimeError(f"copy_drill assembled {len(out)} tokens instead of {length}")
    by_second = sorted(range(count), key=lambda k: seconds[k])
    spans = [(seconds[k] + cue, seconds[k] + int(sizes[k])) for k in by_second]
    answers = ["".join(chars[c] for c in content[span_at[k] + cue:span_at[k + 1]].tolist()) for k in by_second]
    return TaskSample("copy_drill", out.tolist(), spans, answers, length, float(depth), [firsts[k] for k in by_second])


TASKS = {"passkey": passkey, "multikey_niah": multikey_niah, "mqar": mqar, "variable_tracking": variable_tracking,
         "kv_recall": kv_recall, "copy_drill": copy_drill}
# Tasks made for training rows only: their answers are not unique in the context by design (a fact is
# asked inside the haystack, or a span is copied, and the answer then stands there twice), so evaluation
# tasks exclude them.
TRAINING_ONLY = ("kv_recall", "copy_drill")


def generate_task(name: str, tok: TextTokenizer, rng: np.random.Generator, length: int, depth: float, **params) -> TaskSample:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    return TASKS[name](tok, rng, length, depth, **params)
