"""Micro-batches of the decode step (`LLM(micro_batches=N)`, engine/row_shards.py): each range of rows runs
through the model as a runner of its own. The engine still computes the model's forward, selects and loads
exactly what one batch does (so every per-row buffer was sliced to its range), with the device cache and a
replayed selection source too; bad counts are refused by name. On CPU the micro-batches run one after the
other; tests/engine/test_gpu.py runs them on two streams under CUDA graphs."""

import pytest
import torch

from tests.helpers import engine_model, reference_logits
from nosa.engine import LLM, SamplingParams
from nosa.engine.row_shards import shard_bounds
from nosa.engine.selection_source import ReplaySelections

LENGTHS = (9, 14, 3, 21, 17)  # rows at different positions; 5 rows cut unevenly
GREEDY = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)


def prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in LENGTHS]


def run(model, micro_batches, offload=True, device_cache_blocks=None, source=None, record=False):
    llm = LLM(model, device="cpu", offload=offload, max_model_len=80, max_num_seqs=len(LENGTHS), prefill_chunk=5,
              micro_batches=micro_batches, device_cache_blocks=device_cache_blocks)
    llm.runner.load_log = []
    if source is not None:
        llm.set_selection_source(source)
    outs = llm.generate(prompts(), GREEDY, use_tqdm=False, return_logits=True, record_selections=record)
    loads = torch.stack([loads for _, loads in llm.runner.load_log])  # [steps, L, R, H]
    return outs, loads, llm


def assert_micro_batches_ran(llm, count):
    """The step really ran as `count` micro-batches: each one's attention began its last step on its own rows."""
    runner = llm.runner
    assert runner.micro_batches == count and len(runner.shards) == (count if count > 1 else 0)
    for start, stop, attention in runner.shards:
        assert attention.positions is not None and attention.positions.shape == (stop - start,)
        assert attention.positions.data_ptr() == runner.step_inputs[1, start:stop].data_ptr()


def assert_same_run(a, b):
    """Same tokens, selections and loads; logits to float32 rounding (a matmul over fewer rows may round
    differently)."""
    (outs_a, loads_a, llm_a), (outs_b, loads_b, llm_b) = a, b
    assert torch.equal(loads_a, loads_b)
    for x, y in zip(outs_a, outs_b):
        assert x.token_ids == y.token_ids
        torch.testing.assert_close(x.logits, y.logits, atol=1e-4, rtol=1e-4)
        if x.selections is not None:
            assert torch.equal(x.selections, y.selections)
    for name, counter in llm_a.decode_counters().items():
        assert torch.equal(counter, llm_b.decode_counters()[name]), name


@pytest.mark.parametrize("offload", [True, False])
@pytest.mark.parametrize("mode", ["nosa", "dense", "infllmv2", "dma"])
def test_micro_batches_equal_the_model_forward_and_one_batch(mode, offload):
    model = engine_model(mode)
    whole = run(model, 1, offload, record=mode != "dense")
    split = run(model, 2, offload, record=mode != "dense")
    assert_micro_batches_ran(split[2], 2)
    for prompt, out in zip(prompts(), split[0]):
        ref = reference_logits(model, prompt, out.token_ids)
        torch.testing.assert_close(out.logits, ref, atol=1e-4, rtol=1e-4)
        assert out.token_ids == ref.argmax(-1).tolist()
    assert_same_run(whole, split)
    if offload and mode in ("nosa", "infllmv2"):
        assert whole[2].stats().blocks_loaded_per_step > 0  # blocks really move, so equal loads mean something


@pytest.mark.parametrize("offload", [True, False])
def test_micro_batches_with_the_device_cache(offload):
    model = engine_model("nosa", seed=4)
    size = model.config.topk_blocks + 3
    whole = run(model, 1, offload, device_cache_blocks=size, record=True)
    split = run(model, 3, offload, device_cache_blocks=size, record=True)  # 2 + 2 + 1 rows
    assert_micro_batches_ran(split[2], 3)
    assert_same_run(whole, split)
    assert int(whole[2].decode_counters()["spill_hits"].sum()) > 0


@pytest.mark.parametrize("on_device", [True, False])
def test_micro_batches_replay_a_selection_source(on_device):
    """A replayed trace: each micro-batch reads its own rows' entries of the source's buffers."""
    model = engine_model("nosa", seed=7)
    original = run(model, 1, record=True)
    cfg = model.config.sparse

    def source():
        replay = ReplaySelections(cfg.block_size, cfg.topk_blocks, on_device=on_device)
        for i, out in enumerate(original[0]):
            replay.add(i, out.selections, out.selection_first_position)
        return replay

    other = engine_model("nosa", seed=8)  # another model: only the source can make the selections agree
    split = run(other, 2, source=source(), record=True)
    assert_micro_batches_ran(split[2], 2)
    assert_same_run(run(other, 1, source=source(), record=True), split)


@pytest.mark.parametrize("count", [0, 6, True, 2.0])
def test_bad_micro_batch_counts_are_refused(count):
    with pytest.raises(ValueError, match="micro_batches"):
        LLM(engine_model("nosa"), device="cpu", max_model_len=80, max_num_seqs=len(LENGTHS), micro_batches=count)


def test_shard_bounds_cover_the_rows_in_order():
    assert shard_bounds(5, 1) == [(0, 5)]
    assert shard_bounds(5, 2) == [(0, 3), (3, 5)]
    assert shard_bounds(121, 2) == [(0, 61), (61, 121)]
    assert shard_bounds(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_shared_launches_size_each_micro_batch_for_its_share_of_the_sms(monkeypatch):
    """With SHARE_LAUNCHES each micro-batch's layers run inside `ops.launch_share(1/N)` (so its occupancy-split
    launches aim at 1/N of the SMs) and the run is still one batch's; outside the step the share is whole."""
    import nosa.engine.model_runner as model_runner
    from nosa.engine.attention import DecodeAttention
    from nosa.ops import occupancy

    seen = []
    attend = DecodeAttention.attend

    def spy(self, *args, **kwargs):
        seen.append(occupancy.current_share())
        return attend(self, *args, **kwargs)

    model = engine_model("nosa")
    whole = run(model, 1)
    monkeypatch.setattr(model_runner, "SHARE_LAUNCHES", True)
    monkeypatch.setattr(DecodeAttention, "attend", spy)
    shared = run(model, 2)
    assert shared[2].runner.launch_share == 0.5
    assert seen and set(seen) == {0.5}
    assert occupancy.current_share() == 1.0
    assert_same_run(whole, shared)
