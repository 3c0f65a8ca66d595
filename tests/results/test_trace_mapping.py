"""Trace replay on a longer prompt (nosa.results.traces.map_to_prompt / benchmark_traces): the mapped trace
is a valid engine selection at the new positions and changes exactly as many blocks per step as the trace
(the locality is kept), on the committed traces of the quality study; bad files and geometry are refused."""

import os

import numpy as np
import pytest
import torch

from nosa.engine.selection_source import check_selection
from nosa.results.locality import step_changes
from nosa.results.traces import benchmark_traces, load_traces, map_to_prompt, save_traces

TRACES = {mode: os.path.join("results", "quality", f"traces_{mode}.npz") for mode in ("nosa", "infllmv2")}
STEPS = 80


@pytest.mark.parametrize("mode", sorted(TRACES))
@pytest.mark.parametrize("prompt", [32768, 65536])
def test_mapped_traces_keep_locality_and_stay_valid(mode, prompt):
    data = load_traces(TRACES[mode])
    mapped, description = benchmark_traces(TRACES[mode], prompt, 4, 2, STEPS, 64, 64)
    kept = [(t, p) for t, p in zip(data["traces"], data["first_position"]) if p <= prompt]
    assert description["attn_mode"] == mode and len(mapped) == len(kept) >= 2
    assert len(description["skipped_longer_than_prompt"]) == len(data["traces"]) - len(kept)
    for (original, first), new in zip(kept, mapped):
        assert new.shape == (4, STEPS, 2, 64) and new.dtype == np.int32
        check_selection(torch.from_numpy(new), torch.arange(prompt, prompt + STEPS), 64, 64)
        # Same blocks changed per step, layer by layer (layers 0..3 replay trace layers 0..3).
        _, new_changes = step_changes(torch.from_numpy(new))
        _, old_changes = step_changes(torch.from_numpy(original[:4, :STEPS].astype(np.int64)))
        assert torch.equal(new_changes, old_changes)
        assert (new >= 0).sum() == (original[:4, :STEPS] >= 0).sum()
        if first < prompt:
            assert int(new.max()) > int(original.max())  # the history really was stretched/shifted


def test_mapping_rule_on_a_small_example():
    # block 4, sink 1, window 2; trace at position 20 (own block 5, window starts at 3) onto position 36.
    trace = np.array([[[[0, 1, 2, 3, 4, 5, -1]]]])
    out = map_to_prompt(trace, 20, 36, 4, 1, 2)
    # shift D = 4; history 1..2 stretched onto 1..6 by (W + D - sink) / (W - sink) = 6 / 2.
    assert out.tolist() == [[[[0, 1, 4, 7, 8, 9, -1]]]]


def test_bad_replays_are_refused(tmp_path):
    with pytest.raises(ValueError, match="shorter prompt"):
        map_to_prompt(np.zeros((1, 1, 1, 1)), 128, 64, 64, 1, 16)
    with pytest.raises(ValueError, match="multiple of"):
        map_to_prompt(np.zeros((1, 1, 1, 1)), 128, 160, 64, 1, 16)
    with pytest.raises(ValueError, match="topk_blocks: trace 64, benchmark 32"):
        benchmark_traces(TRACES["nosa"], 65536, 4, 2, STEPS, 64, 32)
    with pytest.raises(ValueError, match="longer prompt"):
        benchmark_traces(TRACES["nosa"], 8192, 4, 2, STEPS, 64, 64)
    with pytest.raises(ValueError, match="decode steps"):
        benchmark_traces(TRACES["nosa"], 65536, 4, 2, 300, 64, 64)
    bad = save_traces(str(tmp_path / "bad.npz"), [np.zeros((1, 2, 1, 4))], [8], {"attn_mode": "nosa"}, ["x"])
    with pytest.raises(ValueError, match="geometry"):
        benchmark_traces(bad, 64, 1, 1, 2, 64, 64)
    with pytest.raises(OSError):
        benchmark_traces(str(tmp_path / "missing.npz"), 64, 1, 1, 2, 64, 64)
