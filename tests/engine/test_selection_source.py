"""Selection sources (engine/selection_source.py): replaying a trace the engine recorded reproduces the
original run, the step after the selection runs as in normal decoding, and bad selections are refused."""

import pytest
import torch

from tests.helpers import engine_model
from nosa.engine import LLM, SamplingParams
from nosa.engine.selection_source import ReplaySelections, RowStep, SelectionSource, check_selection

LENGTHS = (9, 22, 15)  # rows at different positions (each selected at its own)
STEPS = 24
GREEDY = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True)


def prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in LENGTHS]


def run(model, source_from=None, offload=True, record=False, on_device=True):
    """Greedy decode of prompts(); with source_from (RequestOutputs), request i replays its selections
    (picked on the device from the source's table, or stacked on the host each step)."""
    llm = LLM(model, device="cpu", max_model_len=64, max_num_seqs=len(LENGTHS), offload=offload)
    llm.runner.load_log = []
    if source_from is not None:
        cfg = model.config.sparse
        source = ReplaySelections(cfg.block_size, cfg.topk_blocks, on_device=on_device)
        for i, out in enumerate(source_from):
            source.add(i, out.selections, out.selection_first_position)  # generate numbers requests 0..n-1
        llm.set_selection_source(source)
    outs = llm.generate(prompts(), GREEDY, use_tqdm=False, return_logits=True, record_selections=record)
    loads = torch.stack([loads for _, loads in llm.runner.load_log])  # [steps, L, R, H]
    return outs, loads, llm


@pytest.mark.parametrize("on_device", [True, False])
@pytest.mark.parametrize("mode", ["nosa", "infllmv2"])
def test_replaying_the_engines_own_trace_reproduces_the_run(mode, on_device):
    model = engine_model(mode, seed=7)
    original, loads, llm = run(model, record=True)
    assert llm.stats().blocks_loaded_per_step > 0  # blocks really move, so equal loads mean something
    replayed, replay_loads, replay_llm = run(model, source_from=original, record=True, on_device=on_device)
    assert replay_llm.selection_source.on_device == on_device
    assert torch.equal(loads, replay_loads)
    for a, b in zip(original, replayed):
        assert a.token_ids == b.token_ids and torch.equal(a.logits, b.logits)
        assert torch.equal(a.selections, b.selections)
    assert replay_llm.stats().hit_rate_per_layer == llm.stats().hit_rate_per_layer


def test_the_trace_not_the_model_decides_the_loads():
    """Another model replaying the trace loads exactly what the traced run loaded once its first step has
    replaced the install's (model-chosen) selection, and selects what the trace says."""
    original, loads, _ = run(engine_model("nosa", seed=7), record=True)
    other = engine_model("nosa", seed=8)
    replayed, replay_loads, _ = run(other, source_from=original, record=True)
    assert torch.equal(loads[1:], replay_loads[1:])
    for a, b in zip(original, replayed):
        assert torch.equal(b.selections[:, : len(b.token_ids) - 1], a.selections[:, : len(b.token_ids) - 1])
    _, own_loads, _ = run(other)
    assert not torch.equal(own_loads[1:], replay_loads[1:])  # its own scores would have loaded otherwise


def test_device_replay_follows_rows_and_added_traces():
    """The device-side source across two generate calls on one engine: the second call's requests take the
    rows the first gave back and their traces are added after the source was set (the table is rebuilt),
    at other prompt lengths (other rows' offsets); each call equals the host-side source's run."""
    model = engine_model("nosa", seed=8)
    original, _, _ = run(engine_model("nosa", seed=7), record=True)
    cfg = model.config.sparse
    g = torch.Generator().manual_seed(9)
    later = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (13, 7, 19)]
    later_traces = run_on(engine_model("nosa", seed=7), later, record=True)
    results = {}
    for on_device in (True, False):
        llm = LLM(model, device="cpu", max_model_len=64, max_num_seqs=len(LENGTHS))
        source = ReplaySelections(cfg.block_size, cfg.topk_blocks, on_device=on_device)
        for i, out in enumerate(original):
            source.add(i, out.selections, out.selection_first_position)
        llm.set_selection_source(source)
        first = llm.generate(prompts(), GREEDY, use_tqdm=False, return_logits=True)
        table = llm.runner.source_table
        for i, out in enumerate(later_traces):  # generate numbers the next requests 3, 4, 5
            source.add(len(LENGTHS) + i, out.selections, out.selection_first_position)
        second = llm.generate(later, GREEDY, use_tqdm=False, return_logits=True)
        if on_device:
            assert table is not None and llm.runner.source_table is not table  # rebuilt with the new traces
        results[on_device] = first + second
    for a, b in zip(results[True], results[False]):
        assert a.token_ids == b.token_ids and torch.equal(a.logits, b.logits)
    # The traces decided: the second call's replay differs from the model's own choices.
    own = run_on(model, later)
    assert any(not torch.equal(a.logits, b.logits) for a, b in zip(own, results[True][len(LENGTHS):]))


def run_on(model, prompt_list, record=False):
    llm = LLM(model, device="cpu", max_model_len=64, max_num_seqs=len(prompt_list))
    return llm.generate(prompt_list, GREEDY, use_tqdm=False, return_logits=True, record_selections=record)


def test_device_replay_refuses_mixed_rows():
    original, _, _ = run(engine_model("nosa", seed=7), record=True)
    cfg = engine_model("nosa").config.sparse
    source = ReplaySelections(cfg.block_size, cfg.topk_blocks)
    source.add(0, original[0].selections, original[0].selection_first_position)  # requests 1 and 2 have none
    llm = LLM(engine_model("nosa"), device="cpu", max_model_len=64, max_num_seqs=3)
    llm.set_selection_source(source)
    with pytest.raises(ValueError, match="replay all or none"):
        llm.generate(prompts(), GREEDY, use_tqdm=False)
    assert llm.num_running == 0 and llm.free_rows == 3


def test_replay_offload_on_equals_off():
    original, _, _ = run(engine_model("nosa", seed=7), record=True)
    on, _, _ = run(engine_model("nosa", seed=8), source_from=original, offload=True)
    off, _, _ = run(engine_model("nosa", seed=8), source_from=original, offload=False)
    for a, b in zip(on, off):
        assert a.token_ids == b.token_ids and torch.equal(a.logits, b.logits)


def test_check_selection_names_the_problem():
    positions = torch.tensor([9])  # own block 2 at block size 4
    good = torch.tensor([[[0, 2, 1, -1]]])
    check_selection(good, positions, 4, 4)
    with pytest.raises(ValueError, match="outside"):
        check_selection(torch.tensor([[[0, 3, 2, -1]]]), positions, 4, 4)
    with pytest.raises(ValueError, match="twice"):
        check_selection(torch.tensor([[[0, 2, 0, -1]]]), positions, 4, 4)
    with pytest.raises(ValueError, match="own block 2"):
        check_selection(torch.tensor([[[0, 1, -1, -1]]]), positions, 4, 4)
    with pytest.raises(ValueError, match="topk_blocks=6"):
        check_selection(good, positions, 4, 6)


@pytest.mark.parametrize("on_device", [True, False])
def test_bad_sources_are_refused(on_device):
    original, _, _ = run(engine_model("nosa", seed=7), record=True)
    cfg = engine_model("nosa").config.sparse
    source = ReplaySelections(cfg.block_size, cfg.topk_blocks)
    with pytest.raises(ValueError, match="does not select its own block"):
        source.add(0, original[0].selections, original[0].selection_first_position + cfg.block_size)
    with pytest.raises(ValueError, match=r"\[layers, steps, kv heads, topk\]"):
        source.add(0, original[0].selections[0], original[0].selection_first_position)
    short = ReplaySelections(cfg.block_size, cfg.topk_blocks, on_device=on_device)
    for i, out in enumerate(original):
        short.add(i, out.selections[:, :5], out.selection_first_position)
    llm = LLM(engine_model("nosa"), device="cpu", max_model_len=64, max_num_seqs=3)
    llm.set_selection_source(short)
    with pytest.raises(ValueError, match="outside its trace"):
        llm.generate(prompts(), GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="dense"):
        LLM(engine_model("dense"), device="cpu", max_model_len=64).set_selection_source(short)
    with pytest.raises(ValueError, match="SelectionSource"):
        llm.set_selection_source(lambda rows: None)


class Unchecked(SelectionSource):
    """A source that returns a block past the query's own: the engine must check it."""

    def selections(self, rows: list[RowStep]):
        sel = torch.full((2, len(rows), 2, 6), -1, dtype=torch.int32)
        for i, step in enumerate(rows):
            sel[:, i, :, 0] = step.position // 4
            sel[:, i, :, 1] = step.position // 4 + 1
        return sel


def test_the_engine_checks_sources_that_did_not_check_themselves():
    llm = LLM(engine_model("nosa"), device="cpu", max_model_len=64, max_num_seqs=3)
    llm.set_selection_source(Unchecked())
    with pytest.raises(ValueError, match="outside"):
        llm.generate(prompts(), GREEDY, use_tqdm=False)
    assert llm.num_running == 0 and llm.free_rows == 3  # the failing step's requests were given back


def test_row_bases_of_an_unchanged_batch_still_check_every_position():
    """row_bases answers an unchanged batch from its last answer while the positions lie inside every trace,
    and still refuses the first position past the shortest one (or before the latest start)."""
    original, _, _ = run(engine_model("nosa", seed=7), record=True)
    cfg = engine_model("nosa").config.sparse
    source = ReplaySelections(cfg.block_size, cfg.topk_blocks)
    first = original[0].selection_first_position
    source.add(0, original[0].selections[:, :6], first)
    source.add(1, original[0].selections[:, :4], first)
    source.add(2, original[0].selections[:, 1:8], first + 1)
    bases = source.row_bases([0, 1], [first, first])
    assert bases == [0 - first, 6 - first]
    for s in range(1, 4):
        assert source.row_bases([0, 1], [first + s, first + s]) == bases
    with pytest.raises(ValueError, match="request 1 is at position"):
        source.row_bases([0, 1], [first + 4, first + 4])
    assert source.row_bases([0, 2], [first + 5, first + 5]) == [0 - first, 10 - (first + 1)]
    with pytest.raises(ValueError, match="request 2 is at position"):
        source.row_bases([0, 2], [first, first])
    assert source.row_bases([], []) is None
