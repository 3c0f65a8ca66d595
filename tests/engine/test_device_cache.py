"""The device block cache beyond the selection (`device_cache_blocks`, spill slots, `ops.spill_step`): the
engine still computes what the model computes, offload on == off, blocks that come back are device copies
instead of host loads (counted, and equal to the CPU cache simulation step by step), and the budget
charges it."""

import numpy as np
import pytest
import torch

from tests.helpers import engine_model, reference_logits
from nosa import ops
from nosa.engine import LLM, SamplingParams
from nosa.engine.block_cache import BlockCache
from nosa.results.cache_sim import engine_cache_loads, policy_cache_loads

LENGTHS = (9, 14, 3, 21)
STEPS = 40


def prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in LENGTHS]


def run(model, cache_blocks, offload=True, load_log=False, prefill_chunk=5, steps=STEPS):
    llm = LLM(model, device="cpu", offload=offload, max_model_len=80, max_num_seqs=len(LENGTHS), prefill_chunk=prefill_chunk,
              device_cache_blocks=cache_blocks)
    if load_log:
        llm.runner.load_log = []
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    outs = llm.generate(prompts(), params, use_tqdm=False, return_logits=True, record_selections=load_log)
    return outs, llm


@pytest.mark.parametrize("mode", ["nosa", "infllmv2"])
def test_engine_with_a_larger_cache_equals_full_forward(mode):
    model = engine_model(mode, seed=1)
    outs, llm = run(model, model.config.topk_blocks + 3)
    for prompt, out in zip(prompts(), outs):
        ref = reference_logits(model, prompt, out.token_ids)
        torch.testing.assert_close(out.logits, ref, atol=1e-4, rtol=1e-4)
        assert out.token_ids == ref.argmax(-1).tolist()
    stats = llm.stats()
    assert stats.spill_hits_per_step > 0 and stats.blocks_loaded_per_step > 0  # both paths exercised
    on, _ = run(model, model.config.topk_blocks + 3, offload=True)
    off, _ = run(model, model.config.topk_blocks + 3, offload=False)
    for a, b in zip(on, off):
        assert a.token_ids == b.token_ids and torch.equal(a.logits, b.logits)


@pytest.mark.parametrize("offload", [True, False])
def test_engine_with_the_spill_kernel_equals_the_reference_engine_and_the_forward(offload, monkeypatch):
    """The spill step on its Triton kernel (interpreter; two launches per layer) gives the reference spill
    step's engine bit for bit: tokens, logits, loads and spill hits; both equal the model forward. Offload on
    (slot <-> spill copies) and off (tables only). 20 tokens: the interpreter is slow, and hits start early."""
    from nosa.ops import dispatch
    from nosa.ops.kernels import spill as spill_kernels

    model = engine_model("nosa", seed=1)
    size = model.config.topk_blocks + 3
    steps = 20
    want, ref_llm = run(model, size, offload=offload, steps=steps)
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return spill_kernels.spill_step(*args, **kwargs)

    dispatch._load_kernels()
    monkeypatch.setitem(dispatch._KERNELS, "spill_step", counted)
    with ops.use_backend("triton", only=("spill_step",)):
        got, llm = run(model, size, offload=offload, steps=steps)
    assert len(calls) >= steps * model.config.num_hidden_layers  # the engine really ran the kernel
    for prompt, a, b in zip(prompts(), want, got):
        assert a.token_ids == b.token_ids and torch.equal(a.logits, b.logits)
        ref = reference_logits(model, prompt, b.token_ids)
        torch.testing.assert_close(b.logits, ref, atol=1e-4, rtol=1e-4)
        assert b.token_ids == ref.argmax(-1).tolist()
    for name, counter in ref_llm.decode_counters().items():
        assert torch.equal(llm.decode_counters()[name], counter), name
    assert int(llm.decode_counters()["spill_hits"].sum()) > 0


def test_blocks_that_come_back_are_device_hits_not_host_loads():
    model = engine_model("nosa", seed=1)
    topk = model.config.topk_blocks
    _, base = run(model, None)
    base_loads = base.decode_counters()["loaded"]
    previous = None
    for size in (topk, topk + 2, topk + 6, 40):
        _, llm = run(model, size)
        counters = llm.decode_counters()
        # Same selections (exactness), so every block the small cache loaded is a load or a spill hit here.
        assert torch.equal(counters["loaded"] + counters["spill_hits"], base_loads)
        total = int(counters["loaded"].sum())
        assert previous is None or total <= previous
        previous = total
    assert previous == 0  # 40 blocks hold every block of an 80-token sequence: nothing is reloaded


def install_selection(model, prompt):
    """The prompt's last token's selection [L, H, K] from the model's own full forward (what install loads)."""
    layers = [layer.self_attn for layer in model.model.layers]
    for attn in layers:
        attn.selection_log = []
    try:
        with torch.no_grad():
            model(torch.tensor(prompt)[None])
        return torch.stack([attn.selection_log[0][0, -1] for attn in layers])
    finally:
        for attn in layers:
            attn.selection_log = None


def test_engine_loads_equal_the_cache_simulation_step_by_step():
    model = engine_model("nosa", seed=1)
    cfg = model.config
    size = cfg.topk_blocks + 3
    # Every prompt prefilled in the first step, so decode step s of every row is load_log[s].
    outs, llm = run(model, size, load_log=True, prefill_chunk=64)
    loads = torch.stack([l for _, l in llm.runner.load_log])  # [steps, L, R, H]
    for r, (prompt, out) in enumerate(zip(prompts(), outs)):
        sel = out.selections.long()  # [L, S, H, K]
        L, S, H, K = sel.shape
        streams = sel.permute(0, 2, 1, 3).reshape(L * H, S, K)
        initial = install_selection(model, prompt).reshape(L * H, K)
        sim = engine_cache_loads(streams, np.full(L * H, len(prompt)), cfg.block_size, size, initial=initial)
        assert torch.equal(sim["loads"], loads[:S, :, r].reshape(S, L * H).T.long())


def test_policy_simulator_bounds():
    rng = np.random.default_rng(0)
    sel = np.stack([rng.choice(12, 4, replace=False) for _ in range(60)])
    lru = policy_cache_loads(sel, 1, 1000, 7, "lru").sum()
    assert policy_cache_loads(sel, 1, 1000, 7, "belady").sum() <= lru
    # A cache of just the selection loads every new block, whatever the policy, like the engine.
    exact = engine_cache_loads(sel[None], np.array([1]), 1000, 4)["loads"][0].numpy()
    for policy in ("lru", "lfu", "belady"):
        assert np.array_equal(policy_cache_loads(sel, 1, 1000, 4, policy), exact)
    with pytest.raises(ValueError, match="policy"):
        policy_cache_loads(sel, 1, 1000, 7, "fifo")


def test_budget_charges_the_cache_and_bad_sizes_are_refused():
    model = engine_model("nosa")
    cfg = model.config
    L, H, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    plain = BlockCache.row_bytes(L, H, D, torch.float32, cfg.sparse, 64)
    larger = BlockCache.row_bytes(L, H, D, torch.float32, cfg.sparse, 64, cfg.topk_blocks + 4)
    assert larger["spill_slots"] == 2 * L * 4 * cfg.block_size * H * D * 4 + 8 * L * H * 4
    # A pooled cache (POOL_DEVICE_CACHE) adds the attention's page per slot [H, K] and the page map [L, H, K + E].
    K = cfg.topk_blocks
    pooled = BlockCache.is_pooled(cfg.sparse, K + 4, in_place=False)
    assert larger["total"] == plain["total"] + larger["spill_slots"] + (4 * (H * K + L * H * (K + 4)) if pooled else 0)
    llm = LLM(model, device="cpu", max_model_len=64, max_num_seqs=2, device_cache_blocks=cfg.topk_blocks + 4)
    assert llm.cache.allocated_bytes()["total"] == 2 * larger["total"]
    row, _ = LLM.device_bytes(cfg, torch.float32, True, 64, cfg.topk_blocks + 4)
    assert row == larger["total"]
    with pytest.raises(ValueError, match="device_cache_blocks must be an integer >= topk_blocks"):
        LLM(model, device="cpu", max_model_len=64, device_cache_blocks=cfg.topk_blocks - 1)
    with pytest.raises(ValueError, match="dense mode holds every block"):
        LLM(engine_model("dense"), device="cpu", max_model_len=64, device_cache_blocks=8)


def _budget_for(model, rows, cache_blocks, offload=True, max_model_len=80):
    from nosa.engine.budget import device_bytes

    row, workspace = device_bytes(model.config, model.dtype, offload, max_model_len, cache_blocks)
    return workspace + rows * row


def test_auto_cache_takes_only_memory_no_row_would_use():
    """device_cache_blocks="auto": the largest cache up to 2 x topk whose rows still fit max_num_seqs in the
    budget; no rows are lost to it, and it equals the model's forward like any fixed size."""
    model = engine_model("nosa", seed=1)
    topk, rows = model.config.topk_blocks, len(LENGTHS)
    ceiling = min(2 * topk, ops.num_blocks(80, model.config.block_size))
    kwargs = dict(device="cpu", max_model_len=80, max_num_seqs=rows, prefill_chunk=5)
    # room for max_num_seqs rows at the ceiling: the ceiling
    llm = LLM(model, gpu_memory_budget=_budget_for(model, rows, ceiling), device_cache_blocks="auto", **kwargs)
    assert llm.device_cache_blocks == ceiling and llm.max_num_seqs == rows
    # room for topk + 3 but not topk + 4: exactly topk + 3, still every row
    between = _budget_for(model, rows, topk + 4) - 1
    assert _budget_for(model, rows, topk + 3) <= between
    llm = LLM(model, gpu_memory_budget=between, device_cache_blocks="auto", **kwargs)
    assert llm.device_cache_blocks == topk + 3 and llm.max_num_seqs == rows
    params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True)
    outs = llm.generate(prompts(), params, use_tqdm=False, return_logits=True)
    fixed, _ = run(model, topk + 3)
    for a, b in zip(outs, fixed):
        assert a.token_ids == b.token_ids and torch.equal(a.logits, b.logits)
    assert llm.stats().spill_hits_per_step > 0
    # a budget that max_num_seqs rows fill without a cache, no budget, offload off, dense: no cache
    tight = _budget_for(model, rows, None)
    assert LLM(model, gpu_memory_budget=tight, device_cache_blocks="auto", **kwargs).device_cache_blocks is None
    assert LLM(model, device_cache_blocks="auto", **kwargs).device_cache_blocks is None
    off = _budget_for(model, rows, ceiling, offload=False)
    assert LLM(model, offload=False, gpu_memory_budget=off, device_cache_blocks="auto", **kwargs).device_cache_blocks is None
    dense = engine_model("dense", seed=1)
    big = _budget_for(dense, rows, None) * 4
    assert LLM(dense, gpu_memory_budget=big, device_cache_blocks="auto", **kwargs).device_cache_blocks is None


def test_a_bad_device_cache_size_names_the_accepted_values():
    model = engine_model("nosa", seed=1)
    for bad in ("Auto", 2, 1.5, True):
        with pytest.raises(ValueError, match="device_cache_blocks must be an integer >= topk_blocks=.* or 'auto'"):
            LLM(model, device="cpu", max_model_len=80, max_num_seqs=2, device_cache_blocks=bad)
