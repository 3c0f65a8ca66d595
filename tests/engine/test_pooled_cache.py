"""The pooled device cache (`block_cache.POOL_DEVICE_CACHE`, with offload on and spill slots):
the engine gives the copying cache's tokens, logits, loads and spill hits bit for bit, on the reference ops
and on the Triton kernels (interpreter), with the misses loaded by the gather or inside the attention, in
one batch and in two micro-batches; and it really is pooled (no spill pages, slots read through their pages)."""

import pytest
import torch

import nosa.engine.attention as engine_attention
import nosa.engine.block_cache as block_cache
from tests.helpers import engine_model, reference_logits
from nosa import ops
from nosa.engine import LLM, SamplingParams

PARAMS = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)


def prompts():
    g = torch.Generator().manual_seed(6)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in (23, 30, 9)]  # past topk 6 x block 4


def run(model, pooled, monkeypatch, micro_batches=1):
    monkeypatch.setattr(block_cache, "POOL_DEVICE_CACHE", pooled)
    llm = LLM(model, device="cpu", max_model_len=48, max_num_seqs=3, device_cache_blocks=model.config.topk_blocks + 3,
              micro_batches=micro_batches)
    assert llm.cache.pooled == pooled and (llm.cache.spill_k is None) == pooled
    return llm.generate(prompts(), PARAMS, use_tqdm=False, return_logits=True), llm


# The Triton cases run under the interpreter on CPU (~20 s each): one per load path, one per mode.
@pytest.mark.parametrize("mode,backend,fuse", [("nosa", "reference", False), ("infllmv2", "reference", False),
                                               ("nosa", "triton", True), ("infllmv2", "triton", False)])
def test_pooled_cache_engine_equals_the_copying_cache_engine(mode, backend, fuse, monkeypatch):
    model = engine_model(mode, seed=5)
    monkeypatch.setattr(engine_attention, "FUSE_GATHER", fuse)
    with ops.use_backend(backend, only=ops.BLOCK_OPS + ("decode_attention",)):
        want, copying = run(model, False, monkeypatch)
        got, pooled = run(model, True, monkeypatch)
    for a, b in zip(want, got):
        assert a.token_ids == b.token_ids and torch.equal(a.logits, b.logits)
    for name, counter in copying.decode_counters().items():
        assert torch.equal(pooled.decode_counters()[name], counter), name
    assert int(pooled.decode_counters()["spill_hits"].sum()) > 0  # blocks came back from the spill slots
    assert not torch.equal(pooled.cache.pool_map, torch.arange(pooled.cache.pool_map.shape[-1]).int().expand_as(pooled.cache.pool_map))


def test_pooled_cache_engine_equals_the_model_forward_and_two_micro_batches_equal_one(monkeypatch):
    model = engine_model("nosa", seed=1)
    one, llm_one = run(model, True, monkeypatch)
    two, llm_two = run(model, True, monkeypatch, micro_batches=2)
    for prompt, a, b in zip(prompts(), one, two):
        # Logits to float32 rounding: a matmul over fewer rows may round differently (test_micro_batches.py).
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)
        ref = reference_logits(model, prompt, a.token_ids)
        torch.testing.assert_close(a.logits, ref, atol=1e-4, rtol=1e-4)
    for name, counter in llm_one.decode_counters().items():
        assert torch.equal(llm_two.decode_counters()[name], counter), name


def test_pooled_cache_charges_what_it_allocates(monkeypatch):
    monkeypatch.setattr(block_cache, "POOL_DEVICE_CACHE", True)
    model = engine_model("nosa")
    cfg = model.config
    size = cfg.topk_blocks + 3
    llm = LLM(model, device="cpu", max_model_len=48, max_num_seqs=2, device_cache_blocks=size)
    want = block_cache.BlockCache.row_bytes(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, model.dtype,
                                            cfg.sparse, 48, size)
    got = llm.cache.allocated_bytes()
    for part in ("kv_slots", "spill_slots", "tables", "total"):
        assert got[part] == 2 * want[part], part
    with pytest.raises(RuntimeError, match="read through slot_page"):
        llm.cache.row_view(0, "k")
