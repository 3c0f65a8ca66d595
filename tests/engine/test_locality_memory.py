"""Spec sec. 5's invariant as the engine sees it, and the device footprint per sequence."""

import pytest
import torch

from tests.helpers import engine_model as tiny_model
from nosa.engine import LLM, SamplingParams


def decode_with_load_log(model, lengths=(9, 30, 17), steps=60, **llm_args):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]
    llm = LLM(model, device="cpu", max_model_len=128, max_num_seqs=len(lengths), **llm_args)
    llm.runner.load_log = []
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True), use_tqdm=False)
    return llm


@pytest.mark.parametrize("topk,window,query", [(6, 1, 2), (8, 2, 1), (10, 1, 4)])
def test_nosa_loads_at_most_query_blocks_per_step(topk, window, query):
    model = tiny_model("nosa", seed=4, topk_blocks=topk, window_blocks=window, query_blocks=query)
    llm = decode_with_load_log(model)
    worst = 0
    for positions, loads in llm.runner.load_log:  # loads: [L, R, H]
        crossed = (positions % model.config.block_size == 0).long()  # a block left the window this step
        bound = query + crossed[None, :, None]
        assert bool((loads <= bound).all()), f"loads {loads.tolist()} exceed query_blocks={query} (+1 at a boundary)"
        worst = max(worst, int(loads.max()))
    assert worst >= 1  # blocks really were evicted and reloaded: the bound was exercised
    # Each entry is that step's own snapshot, not one live buffer seen many times.
    assert len({tuple(loads.flatten().tolist()) for _, loads in llm.runner.load_log}) > 1
    assert len({tuple(positions.tolist()) for positions, _ in llm.runner.load_log}) == len(llm.runner.load_log)


def violations_in_load_log(llm, quota: int) -> list[int]:
    """(row, KV head) steps per layer whose loads exceed the bound, counted from the load log (active rows:
    a finished row keeps its position but loads nothing)."""
    counts = [0] * llm.config.num_hidden_layers
    for positions, loads in llm.runner.load_log:
        bound = quota + (positions % llm.config.block_size == 0).long()
        for l, over in enumerate((loads > bound[None, :, None]).sum(dim=(1, 2)).tolist()):
            counts[l] += over
    return counts


def test_stats_report_no_violation_where_the_geometry_has_the_bound():
    model = tiny_model("nosa", seed=4, topk_blocks=8, window_blocks=2, query_blocks=1)
    stats = decode_with_load_log(model, steps=30).stats()
    assert stats.has_locality_bound and stats.locality_quota == 1
    assert stats.bound_violations_per_layer == [0, 0] and stats.blocks_loaded_per_step > 0
    text = repr(stats)
    assert "0 violations" in text and "not guaranteed" not in text and "tokens/s" in text


@pytest.mark.filterwarnings("ignore:this .* geometry has no locality bound")
def test_stats_report_violations_where_the_geometry_lacks_the_bound():
    # docs/locality.md's example: window 0, and the window starting at token 4j lies half in block j + 1.
    model = tiny_model("dma", seed=4, topk_blocks=4, sink_blocks=1, window_blocks=0, compress_kernel=8, compress_stride=4)
    llm = decode_with_load_log(model, steps=40)
    stats = llm.stats()
    assert not stats.has_locality_bound and stats.locality_quota == 0
    # The engine's own counter (no host sync per step) counts exactly what the per-step log shows.
    assert stats.bound_violations_per_layer == violations_in_load_log(llm, 0)
    assert stats.bound_violations > 0
    assert f"{stats.bound_violations} violations" in repr(stats) and "not guaranteed for this geometry" in repr(stats)


def test_stats_repr_reads_as_a_summary():
    from nosa.engine import EngineStats

    stats = EngineStats(decode_steps=10, decode_tokens=30, decode_s=0.5, prefill_tokens=64, prefill_s=0.25,
                        hit_rate_per_layer=[0.9, 0.75], blocks_loaded_per_step=1.5, bytes_host_to_device=3 << 20,
                        locality_quota=2, has_locality_bound=True, bound_violations_per_layer=[0, 3])
    text = repr(stats)
    for part in ("30 tokens in 10 steps", "60.0 tokens/s", "256.0 tokens/s", "[0.900 0.750]", "1.50 blocks loaded",
                 "3.00 MiB", "<= 2 loads", "3 violations (per layer [0, 3])", "the bound is broken"):
        assert part in text, (part, text)
    dense = EngineStats(0, 0, 0.0, 0, 0.0, [], 0.0, 0)
    assert "locality bound: none" in repr(dense) and "0.0 tokens/s" in repr(dense)


def test_infllmv2_is_not_bounded_the_same_way():
    """Control for the test above: with every free slot query-aware, a step can load more than
    `query_blocks` (here 2) blocks, so the bound is a property of nosa's selection, not of the engine."""
    model = tiny_model("infllmv2", seed=4, topk_blocks=10, window_blocks=1, query_blocks=2)
    llm = decode_with_load_log(model)
    assert max(int(loads.max()) for _, loads in llm.runner.load_log) > 3


@pytest.mark.parametrize("mode", ["nosa", "infllmv2", "dma"])
def test_device_kv_per_sequence_is_topk_blocks_whatever_the_context(mode):
    model = tiny_model(mode)
    cfg = model.config
    expected = 2 * cfg.num_hidden_layers * cfg.topk_blocks * cfg.block_size * cfg.num_key_value_heads * cfg.head_dim * 4
    sizes = {}
    for max_len in (32, 256):
        llm = LLM(model, device="cpu", max_model_len=max_len, max_num_seqs=3)
        sizes[max_len] = llm.cache.allocated_bytes()
        assert sizes[max_len]["kv_slots"] == 3 * expected
        # The full history lives in the host store, which does grow with the context.
        assert llm.store.capacity_bytes == 3 * -(-max_len // cfg.block_size) * expected // cfg.topk_blocks
    # The small selection state grows as T / stride (compressed keys) and T x H floats (eviction scores).
    assert sizes[256]["compressed_keys"] > sizes[32]["compressed_keys"]


def test_dense_mode_holds_every_block():
    model = tiny_model("dense")
    small = LLM(model, device="cpu", max_model_len=32, max_num_seqs=1).cache.allocated_bytes()["kv_slots"]
    large = LLM(model, device="cpu", max_model_len=256, max_num_seqs=1).cache.allocated_bytes()["kv_slots"]
    assert large == 8 * small


def test_gpu_budget_sets_the_number_of_rows_and_matches_what_is_allocated():
    from nosa.engine.block_cache import BlockCache

    model = tiny_model("nosa")
    cfg = model.config
    L, H, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    row = BlockCache.row_bytes(L, H, D, torch.float32, cfg.sparse, 64)["total"]
    # K/V and eviction scores of all layers for the prompts being prefilled: a longest prompt + one step's
    # budget of others (2048 by default, at most another longest prompt).
    workspace = L * (64 + 64) * H * (2 * D * 4 + 4)
    llm = LLM(model, device="cpu", max_model_len=64, max_num_seqs=8, gpu_memory_budget=workspace + 3 * row + row // 2)
    assert llm.max_num_seqs == 3
    assert llm.cache.allocated_bytes()["total"] == 3 * row


@pytest.mark.parametrize("mode", ["nosa", "dense", "infllmv2"])
@pytest.mark.parametrize("offload", [True, False])
def test_device_bytes_is_the_accounting_the_budget_uses(mode, offload):
    """`LLM.device_bytes` (what the equal-memory benchmark reads) is exactly what the budget is charged."""
    model = tiny_model(mode)
    row, workspace = LLM.device_bytes(model.config, torch.float32, offload, 64)
    for rows in (1, 3):
        llm = LLM(model, device="cpu", offload=offload, max_model_len=64, max_num_seqs=8,
                  gpu_memory_budget=workspace + rows * row + row - 1)
        assert llm.max_num_seqs == rows
    with pytest.raises(ValueError):
        LLM(model, device="cpu", offload=offload, max_model_len=64, gpu_memory_budget=workspace + row - 1)


@pytest.mark.parametrize("mode,extra_cache_blocks", [("nosa", None), ("dense", None), ("nosa", 2)])
def test_offload_off_holds_one_copy_and_is_charged_what_it_allocates(mode, extra_cache_blocks):
    """Offload off: the store on the device is the only copy of the KV (no slot cache, no spill copies),
    and the budget's charge (rows x row + workspace) is exactly the cache, the store and the prefill
    workspace."""
    from nosa.engine.host_store import HostStore

    model = tiny_model(mode)
    cfg = model.config
    L, H, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    cache_blocks = None if extra_cache_blocks is None else cfg.topk_blocks + extra_cache_blocks
    row, workspace = LLM.device_bytes(cfg, torch.float32, False, 64, cache_blocks)
    llm = LLM(model, device="cpu", offload=False, max_model_len=64, max_num_seqs=3, device_cache_blocks=cache_blocks)
    assert llm.cache.allocated_bytes()["kv_slots"] == 0 and llm.cache.slot_k is None and llm.cache.spill_k is None
    page = HostStore.page_bytes(L, H, cfg.block_size, D, torch.float32)
    prefill = L * (64 + 64) * H * (2 * D * 4 + 4)  # a longest prompt + one step's budget (at most another)
    assert workspace == prefill + page  # the scratch page
    assert llm.cache.allocated_bytes()["total"] + llm.store.allocated_bytes == 3 * row + page
    # The KV of a row is charged once: its full-length store pages, nothing for slots.
    assert row - llm.cache.allocated_bytes()["total"] // 3 == -(-64 // cfg.block_size) * page
