"""`LLM.add_prefilled_request` (how the decode benchmark installs its prompt cache): given the prompt's
real K/V, eviction scores and last selection, the engine decodes exactly what `generate` decodes; and
the benchmark's own install + timing loop runs on the public API."""

import pytest
import torch
from transformers.cache_utils import DynamicCache

from nosa.engine import LLM, SamplingParams
from tests.helpers import engine_model

PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def prompt_cache(model, prompt):
    """The model's own K/V [L, 1, T, H, D], eviction scores [L, 1, T, H], the last token's selection per
    layer [H, K] and its greedy next token."""
    layers = [layer.self_attn for layer in model.model.layers]
    for attn in layers:
        attn.selection_log = []
    cache = DynamicCache()
    with torch.no_grad():
        logits = model(torch.tensor(prompt)[None], cache=cache, use_cache=True).logits
    keys = torch.stack([cache.layers[l].keys.transpose(1, 2) for l in range(len(layers))])
    values = torch.stack([cache.layers[l].values.transpose(1, 2) for l in range(len(layers))])
    evictions = None
    if layers[0].eviction is not None:
        evictions = torch.stack([attn.eviction_scores(values[l]) for l, attn in enumerate(layers)])
    last = [attn.selection_log[0][0, -1] if attn.selection_log else None for attn in layers]
    for attn in layers:
        attn.selection_log = None
    return keys, values, evictions, last, int(logits[0, -1].argmax())


@pytest.mark.parametrize("mode", ["nosa", "dense", "dma"])
def test_a_prefilled_request_decodes_what_generate_decodes(mode):
    model = engine_model(mode, seed=2)
    prompts = [[7, 3, 99, 120, 5, 61, 2, 18, 40], [1, 2, 3, 250, 17]]
    want = LLM(model, device="cpu", max_model_len=64).generate(prompts, PARAMS, use_tqdm=False)
    llm = LLM(model, device="cpu", max_model_len=64)
    ids = [llm.add_prefilled_request(p, PARAMS, *prompt_cache(model, p)) for p in prompts]
    assert llm.num_running == 2
    while llm.has_unfinished():
        llm.step()
    assert [llm.output(i).token_ids for i in ids] == [o.token_ids for o in want]
    keys, values, evictions, last, first = prompt_cache(model, prompts[0])
    with pytest.raises(ValueError, match="keys and values must be"):
        llm.add_prefilled_request(prompts[0][:-1], PARAMS, keys, values, evictions, last, first)


def test_the_decode_benchmark_drives_the_engine_through_public_methods(monkeypatch):
    from nosa.bench import decode

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)  # the CPU dry run of a CUDA benchmark
    model = engine_model("nosa", seed=1)
    llm = LLM(model, device="cpu", max_model_len=40, max_num_seqs=3)
    # Rows at different lengths (a :spreadN config): each installed at its own length.
    ids = decode.synthetic_install(llm, decode.spread_lengths(20, 3, 6), torch.Generator().manual_seed(1))
    assert len(ids) == 3 and llm.num_running == 3 and llm.free_rows == 0
    assert sorted(seq.cached_tokens for seq in llm.scheduler.running.values()) == [16, 18, 20]
    run = decode.time_decode(llm, ids, warmup=2, steps=5)
    assert run["tokens_per_s"] > 0 and run["blocks_loaded_per_step"] > 0
    assert all(0 <= h <= 1 for h in run["hit_rate_per_layer"])
    assert llm.stats().decode_steps == 7 and llm.num_running == 3
