"""Batched, interleaved prefill: the prompts of several requests are prefilled together in packed chunks
(at most `prefill_chunk` tokens of one prompt, `max_prefill_tokens` in all per step) beside the decode
steps of the requests already running, and the results stay the model's own: greedy tokens and logits
equal the full forward in every attn_mode, offload on == off bit for bit; the per-step budget holds; a
failing prefill fails only its own request."""

import pytest
import torch

from tests.helpers import engine_model as tiny_model, reference_logits
from nosa.engine import LLM, SamplingParams

MODES = ["nosa", "dense", "infllmv2", "dma"]
# Odd lengths; 3 rows for 5 requests, so the last ones are admitted (and prefilled) while others decode.
LENGTHS = (23, 5, 17, 2, 11)
STEPS = 14
CHUNK, BUDGET = 4, 7  # 7 is not a multiple of 4: the budget splits chunks as well


def make_prompts(lengths=LENGTHS, seed=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def make_llm(model, offload=True, **kw):
    kw.setdefault("prefill_chunk", CHUNK)
    kw.setdefault("max_prefill_tokens", BUDGET)
    return LLM(model, device="cpu", offload=offload, max_model_len=48, max_num_seqs=3, **kw)


def record_prefills(llm):
    """Wrap the runner's packed prefill: returns the list of (per step) chunk lengths it ran."""
    calls, real = [], llm.runner.prefill

    def recording(chunks):
        calls.append([(c.start, c.end) for c in chunks])
        return real(chunks)

    llm.runner.prefill = recording
    return calls


def greedy(steps=STEPS):
    return SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)


@pytest.mark.parametrize("mode", MODES)
def test_interleaved_batched_prefill_equals_the_full_forward_offload_on_and_off(mode):
    model = tiny_model(mode, seed=5)
    prompts = make_prompts()
    results = {}
    for offload in (True, False):
        llm = make_llm(model, offload)
        calls = record_prefills(llm)
        interleaved = 0
        ids = [llm.add_request(p, greedy(), return_logits=True) for p in prompts]
        while llm.has_unfinished():
            prefilling_before = llm.num_prefilling
            outs = llm.step()
            # A step that decoded some request while another's prompt was still being prefilled.
            decoded = [o for o in outs if o.request_id in ids and llm.num_prefilling + prefilling_before > 0]
            interleaved += bool(decoded) and llm.num_prefilling > 0
        assert interleaved > 0 and any(len(c) > 1 for c in calls)
        for chunks in calls:
            assert sum(e - s for s, e in chunks) <= BUDGET and all(e - s <= CHUNK for s, e in chunks)
        results[offload] = [llm.output(i) for i in ids]
    for prompt, on, off in zip(prompts, results[True], results[False]):
        assert on.token_ids == off.token_ids and torch.equal(on.logits, off.logits)
        ref = reference_logits(model, prompt, on.token_ids)
        torch.testing.assert_close(on.logits, ref, atol=1e-4, rtol=1e-4)
        assert on.token_ids == ref.argmax(-1).tolist()


def test_the_budget_and_chunk_do_not_change_results():
    """One prompt per step in whole (the old schedule) == many packed small chunks."""
    model = tiny_model("nosa", seed=6)
    prompts = make_prompts()
    whole = make_llm(model, prefill_chunk=64, max_prefill_tokens=64).generate(prompts, greedy(8), use_tqdm=False, return_logits=True)
    packed = make_llm(model, prefill_chunk=3, max_prefill_tokens=5).generate(prompts, greedy(8), use_tqdm=False, return_logits=True)
    for a, b in zip(whole, packed):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)


def test_a_long_prompt_does_not_stall_decoding_and_short_ones_start_at_once():
    model = tiny_model("nosa", seed=7)
    llm = make_llm(model, prefill_chunk=4, max_prefill_tokens=8)
    running = llm.add_request(make_prompts((4,))[0], greedy(30))
    llm.step()  # prefilled (one chunk) and decoding
    long_id = llm.add_request(make_prompts((36,))[0], greedy(2))
    short_id = llm.add_request(make_prompts((3,))[0], greedy(2))
    first = llm.step()  # the long prompt's first chunk and the whole short prompt, beside a decode step
    assert {o.request_id for o in first} == {running, short_id} and llm.num_prefilling == 1
    for _ in range(8):  # 36 tokens in chunks of 4: eight more steps, each still decoding the first request
        assert running in {o.request_id for o in llm.step()}
    assert llm.num_prefilling == 0 and llm.output(short_id).finish_reason == "length"
    assert llm.output(long_id).token_ids  # its first token came with the last chunk


def test_a_failing_prefill_fails_only_its_own_request():
    model = tiny_model("nosa", seed=8)
    prompts = make_prompts()
    expected = make_llm(model).generate(prompts, greedy(), use_tqdm=False)
    poison = prompts[2]
    llm = make_llm(model)
    real = llm.runner.prefill

    def failing(chunks):
        if any(c.state.token_ids.tolist() == poison for c in chunks):
            raise RuntimeError("injected prefill failure")
        return real(chunks)

    llm.runner.prefill = failing
    ids = [llm.add_request(p, greedy()) for p in prompts]
    errors = []
    while llm.has_unfinished():
        errors += [o.request_id for o in llm.step() if o.finish_reason == "error"]
    assert errors == [ids[2]]
    failed = llm.output(ids[2])
    assert failed.finish_reason == "error" and "injected prefill failure" in failed.error and failed.token_ids == []
    for i, want in zip(ids, expected):
        if i != ids[2]:
            assert llm.output(i).token_ids == want.token_ids
    assert llm.free_rows == 3 and llm.free_pages == llm.num_pages and llm.scheduler.workspace_free == llm.scheduler.workspace_tokens


def test_the_prefill_workspace_bounds_the_prompts_prefilled_at_once():
    """Prompts being prefilled share the workspace of max_model_len + max_prefill_tokens tokens (what the
    budget charges): a prompt that does not fit beside the ones in progress waits, first come first served."""
    model = tiny_model("nosa", seed=9)
    llm = make_llm(model, prefill_chunk=2, max_prefill_tokens=2)
    assert llm.scheduler.workspace_tokens == 48 + 2
    ids = [llm.add_request(p, greedy(2)) for p in make_prompts((30, 21, 3))]
    llm.step()
    assert llm.num_prefilling == 1 and llm.num_waiting == 2  # 30 + 21 > 50: the second waits, the third behind it
    assert llm.scheduler.workspace_free == 50 - 30
    while llm.has_unfinished():
        llm.step()
        assert 0 <= llm.scheduler.workspace_free <= 50
    assert [llm.output(i).finish_reason for i in ids] == ["length"] * 3


def test_bad_prefill_options_are_refused():
    model = tiny_model("nosa")
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        make_llm(model, max_prefill_tokens=0)
    with pytest.raises(ValueError, match="prefill_chunk"):
        make_llm(model, prefill_chunk=1.5)
