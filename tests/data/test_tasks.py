"""The synthetic tasks are solvable by construction: exact length, answers where the spans say, each
answer in the context exactly once, needles placed by depth, reproducible from the seed."""

import re

import numpy as np
import pytest

from nosa.data.tasks import TASKS, TRAINING_ONLY, generate_task
from nosa.data.tokenization import load_tokenizer

TOK = load_tokenizer("byte")


def _sample(task, length=600, depth=0.5, seed=0, **params):
    return generate_task(task, TOK, np.random.default_rng(seed), length, depth, **params)


@pytest.mark.parametrize("task", sorted(set(TASKS) - set(TRAINING_ONLY)))
@pytest.mark.parametrize("length", [400, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_length_answers_and_uniqueness(task, length, depth):
    for seed in range(3):
        sample = _sample(task, length, depth, seed)
        assert len(sample.input_ids) == length
        assert sample.input_ids[0] == TOK.bos_id
        context = TOK.decode(sample.input_ids[: sample.context_end()])
        for (start, end), answer in zip(sample.answer_spans, sample.answers):
            assert TOK.decode(sample.input_ids[start:end]) == answer
        labels = sample.labels()
        labelled = [i for i, x in enumerate(labels) if x != -100]
        assert labelled == [i for s, e in sample.answer_spans for i in range(s, e)]
        if task == "variable_tracking":
            names = sample.answers[0].split()
            value = re.search(r"assigned the value (\d+)\.", context).group(1)
            assert context.count(value) == 2  # its one assignment, and the question that names it
            assert context.count(f"VAR {names[0]} = {value}.") == 1
            for prev, name in zip(names, names[1:]):
                assert context.count(f"VAR {name} =") == 1
                assert f"VAR {name} = {prev}." in context
                assert context.index(f"VAR {prev} =") < context.index(f"VAR {name} =")
        else:
            haystack = context[: context.rindex("\n")]  # the question line follows the last newline
            for answer in sample.answers:
                assert haystack.count(answer) == 1, (task, answer)


def test_needle_depth_moves_the_needle():
    starts = [_sample("passkey", 2000, d, seed=5).needle_starts[0] for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert starts == sorted(starts) and starts[0] < 100 and starts[-1] > 1800


def test_reproducible_and_seed_dependent():
    a, b, c = _sample("mqar", seed=3), _sample("mqar", seed=3), _sample("mqar", seed=4)
    assert a.input_ids == b.input_ids
    assert a.input_ids != c.input_ids


def test_task_params_and_errors():
    s = _sample("multikey_niah", 800, 0.5, num_needles=6)
    assert TOK.decode(s.input_ids).count("The magic number for") == 6 + 1  # 6 needles + the question
    s = _sample("mqar", 800, 0.5, num_pairs=10, num_queries=3)
    assert len(s.answer_spans) == 3
    with pytest.raises(ValueError, match="too short"):
        _sample("passkey", 50)
    with pytest.raises(ValueError, match="unknown task"):
        generate_task("nope", TOK, np.random.default_rng(0), 500, 0.5)
    with pytest.raises(ValueError, match="depth"):
        _sample("passkey", 500, 1.5)
    with pytest.raises(ValueError, match="num_queries"):
        _sample("mqar", 800, 0.5, num_pairs=2, num_queries=3)


def test_kv_recall_asks_every_fact_after_it_and_the_pass_key_last():
    for seed in range(3):
        sample = _sample("kv_recall", 3000, 0.4, seed)
        text = TOK.decode(sample.input_ids)
        assert len(sample.input_ids) == 3000 and len(sample.answer_spans) == 15 + 1  # 5 facts per 1K, the pass key
        assert sample.labels(full=True) == sample.input_ids
        for (start, end), answer in zip(sample.answer_spans, sample.answers):
            assert TOK.decode(sample.input_ids[start:end]) == answer
        for key, value in re.findall(r"What is the magic number for ([A-Z]+)\? The magic number for \1 is (\d+)\. ", text):
            fact = text.index(f"The magic number for {key} is {value}. ")
            assert fact < text.index(f"What is the magic number for {key}?")
            assert text.count(f"for {key} is") == 2
        pass_key = sample.answers[-1]
        assert text.endswith(f"The pass key is {pass_key}") and text.count(f"The pass key is {pass_key}") == 2


def test_multikey_niah_more_queries_keeps_the_first_and_asks_distinct_keys():
    one, four = _sample("multikey_niah", 1200, 0.5, 2), _sample("multikey_niah", 1200, 0.5, 2, num_queries=4)
    assert len(four.answers) == 4 and len(set(four.answers)) == 4
    keys = re.findall(r"What is the magic number for ([A-Z]+)\?", TOK.decode(four.input_ids))
    assert len(set(keys)) == 4
    assert TOK.decode(one.input_ids).count("What is the magic number") == 1
    with pytest.raises(ValueError, match="num_queries"):
        _sample("multikey_niah", 1200, 0.5, 2, num_queries=5)


@pytest.mark.parametrize("length", [256, 1000, 4096])
def test_copy_drill_spans_stand_twice_and_rows_have_the_length(length):
    from nosa.data.tasks import COPY_ALPHABET

    for seed in range(4):
        sample = _sample("copy_drill", length, 0.5, seed)
        ids = sample.input_ids
        assert len(ids) == length and ids[0] == TOK.bos_id
        assert set(TOK.decode(ids[1:])) <= set(COPY_ALPHABET)
        assert sample.labels(full=True) == ids
        assert len(sample.answer_spans) == len(sample.needle_starts) == len(sample.answers) >= 3
        covered = np.zeros(length, dtype=int)
        for (start, end), first, answer in zip(sample.answer_spans, sample.needle_starts, sample.answers):
            second = start - 3  # the default cue: the copy's first 3 tokens, not an answer
            size = end - second
            assert 8 <= size <= 32 and first + size <= second  # the first copy ends before the second starts
            assert ids[first:first + size] == ids[second:end]  # the span really stands twice
            assert TOK.decode(ids[start:end]) == answer
            covered[first:first + size] += 1
            covered[second:end] += 1
        assert covered.max() == 1  # copies never overlap one another
        # ~copy_fraction 0.8 of the row belongs to a span (less a part of one span length)
        assert 0.8 - 64 / length <= covered.sum() / length <= 0.8 + 1e-9
        assert [s for s, _ in sample.answer_spans] == sorted(s for s, _ in sample.answer_spans)
    a, b, c = (_sample("copy_drill", 600, 0.5, s).input_ids for s in (7, 7, 8))
    assert a == b and a != c


def test_copy_drill_distances_cover_the_row_and_params_are_checked():
    gaps = []
    for seed in range(20):
        s = _sample("copy_drill", 2048, 0.5, seed)
        gaps += [start - 3 - first for (start, _), first in zip(s.answer_spans, s.needle_starts)]
    assert min(gaps) < 200 and max(gaps) > 1500  # short and long copy distances in one row length
    s = _sample("copy_drill", 512, 0.5, 1, copy_fraction=0.5, span_min=4, span_max=4, cue=1)
    assert all(e - b == 3 for b, e in s.answer_spans)
    with pytest.raises(ValueError, match="copy_fraction"):
        _sample("copy_drill", 512, 0.5, copy_fraction=1.0)
    with pytest.raises(ValueError, match="cue"):
        _sample("copy_drill", 512, 0.5, span_min=3, cue=3)
    with pytest.raises(ValueError, match="too short"):
        _sample("copy_drill", 40, 0.5)


def test_copy_drill_alphabet_restricts_the_characters():
    from nosa.data.tasks import COPY_ALPHABET

    s = _sample("copy_drill", 512, 0.5, 3, alphabet=16)
    assert set(TOK.decode(s.input_ids[1:])) == set(COPY_ALPHABET[:16])  # 500 draws hit every one of 16
    for (start, end), first in zip(s.answer_spans, s.needle_starts):
        assert s.input_ids[first:first + end - start + 3] == s.input_ids[start - 3:end]
    full = _sample("copy_drill", 512, 0.5, 3)
    assert _sample("copy_drill", 512, 0.5, 3, alphabet=0).input_ids == full.input_ids
    assert set(TOK.decode(full.input_ids[1:])) - set(COPY_ALPHABET[:16])
    for bad in (1, -1, len(COPY_ALPHABET) + 1):
        with pytest.raises(ValueError, match="alphabet"):
            _sample("copy_drill", 512, 0.5, alphabet=bad)
