"""The engine computes what the model computes: greedy tokens and per-step logits equal the model's full
forward on the same tokens, in every attn_mode, for a batch of unequal prompts whose decoding crosses many
block (4 tokens) and window (stride 2) boundaries; offload on == offload off; chunked prefill."""

import pytest
import torch

from tests.helpers import engine_model as tiny_model, reference_logits
from nosa.engine import LLM, SamplingParams

MODES = ["nosa", "dense", "infllmv2", "dma"]
PROMPT_LENGTHS = (9, 14, 3, 21)
STEPS = 40  # 10 blocks and 20 windows past the prompt


def make_prompts(lengths=PROMPT_LENGTHS):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def run(model, offload=True, prefill_chunk=5, max_num_seqs=4, prompts=None, steps=STEPS):
    prompts = prompts or make_prompts()
    llm = LLM(model, device="cpu", offload=offload, max_model_len=80, max_num_seqs=max_num_seqs, prefill_chunk=prefill_chunk)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True), use_tqdm=False, return_logits=True)
    return prompts, outs, llm


@pytest.mark.parametrize("mode", MODES)
def test_engine_equals_full_forward(mode):
    model = tiny_model(mode)
    prompts, outs, llm = run(model)
    for prompt, out in zip(prompts, outs):
        assert len(out.token_ids) == STEPS and out.finish_reason == "length"
        ref = reference_logits(model, prompt, out.token_ids)
        torch.testing.assert_close(out.logits, ref, atol=1e-4, rtol=1e-4)
        assert out.token_ids == out.logits.argmax(-1).tolist()  # each token sampled from its own row's logits
        assert out.token_ids == ref.argmax(-1).tolist()
    if mode in ("nosa", "infllmv2"):
        # The sparse modes really did evict and reload blocks (the cache is smaller than the context).
        assert llm.stats().blocks_loaded_per_step > 0
        assert min(llm.stats().hit_rate_per_layer) < 1.0


@pytest.mark.parametrize("mode", MODES)
def test_offload_on_equals_offload_off(mode):
    model = tiny_model(mode, seed=1)
    _, on, _ = run(model, offload=True)
    _, off, _ = run(model, offload=False)
    for a, b in zip(on, off):
        assert a.token_ids == b.token_ids
        assert torch.equal(a.logits, b.logits)


def test_prefill_chunk_size_does_not_change_results():
    model = tiny_model("nosa", seed=2)
    _, whole, _ = run(model, prefill_chunk=64, steps=12)
    _, chunked, _ = run(model, prefill_chunk=3, steps=12)
    for a, b in zip(whole, chunked):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)


def test_batch_equals_one_at_a_time_and_rows_are_reused():
    """Two rows for four requests: continuous batching admits the waiting ones as rows free up, and each
    request gets what it gets alone."""
    model = tiny_model("nosa", seed=3)
    _, batched, _ = run(model, max_num_seqs=2, steps=15)
    for i, prompt in enumerate(make_prompts()):
        _, alone, _ = run(model, max_num_seqs=1, prompts=[prompt], steps=15)
        assert batched[i].token_ids == alone[0].token_ids
        torch.testing.assert_close(batched[i].logits, alone[0].logits, atol=1e-5, rtol=1e-5)


def test_rows_out_of_order_sample_their_own_logits():
    """Requests finishing at different steps leave the running rows out of row order ([1, 0]: the sampler
    then gathers the rows' logits instead of taking rows 0..n-1 as a view): every request still gets the
    model forward's tokens and logits."""
    model = tiny_model("nosa", seed=3)
    prompts = make_prompts()
    llm = LLM(model, device="cpu", max_model_len=80, max_num_seqs=2, prefill_chunk=5)
    lengths = (3, 12, 9, 5)  # request 0 (row 0) finishes first; request 2 takes row 0 behind request 1 on row 1
    ids = [llm.add_request(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), return_logits=True)
           for p, n in zip(prompts, lengths)]
    orders = set()
    while llm.has_unfinished():
        orders.add(tuple(s.row for s in llm.scheduler.decoding))
        llm.step()
    assert (1, 0) in orders, f"the rows never ran out of order: {orders}"
    for rid, prompt in zip(ids, prompts):
        out = llm.output(rid)
        ref = reference_logits(model, prompt, out.token_ids)
        torch.testing.assert_close(out.logits, ref, atol=1e-4, rtol=1e-4)
        assert out.token_ids == out.logits.argmax(-1).tolist()  # each token sampled from its own row's logits
