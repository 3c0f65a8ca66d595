"""The step-level API (add_request / step / abort / output) and selection traces: generate is a loop over
it, aborts give everything back, an error inside a step leaves the engine usable, and the recorded
selections are the model's own."""

import pytest
import torch

from tests.helpers import engine_model as tiny_model
from nosa.engine import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def prompts(lengths=(7, 12, 4, 9)):
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def model():
    return tiny_model("nosa", seed=8)


def make_llm(model, **kw):
    kw.setdefault("max_model_len", 64)
    kw.setdefault("max_num_seqs", 2)
    return LLM(model, device="cpu", **kw)


def idle(llm) -> bool:
    return (not llm.has_unfinished() and llm.num_waiting == 0 and llm.num_running == 0
            and llm.free_rows == llm.max_num_seqs and llm.free_pages == llm.num_pages)


def mixed_params():
    return [GREEDY, SamplingParams(temperature=0.9, top_k=40, seed=5, max_tokens=7, ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
            SamplingParams(temperature=1.2, top_p=0.8, seed=9, max_tokens=12, ignore_eos=True)]


def test_generate_equals_the_step_loop_token_for_token(model):
    expected = make_llm(model).generate(prompts(), mixed_params(), use_tqdm=False)
    llm = make_llm(model)
    ids = [llm.add_request(p, sp) for p, sp in zip(prompts(), mixed_params())]
    assert len(set(ids)) == 4 and llm.num_waiting == 4 and llm.has_unfinished()
    streamed = {i: [] for i in ids}
    finished = {}
    while llm.has_unfinished():
        for out in llm.step():
            assert len(out.token_ids) == 1 and out.request_id not in finished
            streamed[out.request_id] += out.token_ids
            if out.finished:
                finished[out.request_id] = out.finish_reason
        assert llm.num_running <= 2
    for rid, want in zip(ids, expected):
        got = llm.output(rid)
        assert got.token_ids == streamed[rid] == want.token_ids
        assert finished[rid] == "length" == got.finish_reason
    assert idle(llm)
    with pytest.raises(KeyError):
        llm.output(ids[0])  # collected: forgotten


def test_abort_gives_back_rows_and_pages_of_waiting_and_running_requests(model):
    llm = make_llm(model)
    ids = [llm.add_request(p, GREEDY) for p in prompts()]
    llm.step()  # two admitted (prefill + one decode), two waiting
    assert llm.num_running == 2 and llm.num_waiting == 2
    assert llm.free_rows == 0 and llm.free_pages < llm.num_pages
    running = [r for r in ids if r in (ids[0], ids[1])]
    assert llm.abort(ids[3]) and llm.num_waiting == 1  # waiting
    assert llm.abort(running[0]) and llm.num_running == 1 and llm.free_rows == 1  # running
    assert not llm.abort(running[0]) and not llm.abort(12345)
    while llm.has_unfinished():
        llm.step()
    assert not llm.abort(ids[1])  # already finished
    # The survivors are unchanged by the aborts.
    alone = make_llm(model).generate([prompts()[1], prompts()[2]], GREEDY, use_tqdm=False)
    assert [llm.output(ids[1]).token_ids, llm.output(ids[2]).token_ids] == [o.token_ids for o in alone]
    assert idle(llm)


def test_an_error_inside_step_frees_the_failing_requests_and_the_engine_goes_on(model, monkeypatch):
    llm = make_llm(model)
    expected = [o.token_ids for o in make_llm(model).generate(prompts(), GREEDY, use_tqdm=False)]
    ids = [llm.add_request(p, GREEDY) for p in prompts()]
    llm.step()
    real_step = llm.runner.decode_step

    def failing_step(*args, **kwargs):
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(llm.runner, "decode_step", failing_step)
    with pytest.raises(RuntimeError, match="simulated device failure"):
        llm.step()
    monkeypatch.setattr(llm.runner, "decode_step", real_step)
    failed = llm.output(ids[0])
    assert failed.finish_reason == "error" and "simulated device failure" in failed.error
    assert llm.output(ids[1]).finish_reason == "error"
    assert llm.num_running == 0 and llm.num_waiting == 2 and llm.free_rows == 2 and llm.free_pages == llm.num_pages
    while llm.has_unfinished():
        llm.step()
    assert [llm.output(i).token_ids for i in ids[2:]] == expected[2:]
    assert idle(llm)


def test_add_request_validates_at_once(model):
    llm = make_llm(model)
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.add_request([])
    with pytest.raises(ValueError, match="max_model_len=64"):
        llm.add_request(list(range(60)), GREEDY)
    with pytest.raises(ValueError, match="text prompts need a tokenizer"):
        llm.add_request("hello")
    rid = llm.add_request(prompts()[0], GREEDY, request_id=41)
    assert rid == 41
    with pytest.raises(ValueError, match="already in use"):
        llm.add_request(prompts()[1], GREEDY, request_id=41)
    with pytest.raises(ValueError, match="not finished"):
        llm.output(41)
    assert llm.num_waiting == 1 and llm.abort(41) and idle(llm)


def test_logprobs_are_the_log_softmax_of_the_raw_logits(model):
    llm = make_llm(model)
    params = SamplingParams(temperature=0.7, seed=2, max_tokens=5, ignore_eos=True, logprobs=3)
    out = llm.generate(prompts()[:2], params, use_tqdm=False, return_logits=True)
    rid = llm.add_request(prompts()[0], params)
    steps = []
    while llm.has_unfinished():
        steps += [o for o in llm.step() if o.request_id == rid]
    assert [o.logprobs[0]["token_id"] for o in steps] == out[0].token_ids
    for o in out:
        assert len(o.logprobs) == len(o.token_ids)
        for token, entry, logits in zip(o.token_ids, o.logprobs, o.logits):
            want = torch.log_softmax(logits, dim=-1)
            assert entry["token_id"] == token and entry["logprob"] == pytest.approx(float(want[token]), abs=1e-5)
            top = torch.topk(want, 3)
            assert [t for t, _ in entry["top"]] == top.indices.tolist()
            assert [lp for _, lp in entry["top"]] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert llm.generate(prompts()[0], GREEDY, use_tqdm=False)[0].logprobs is None
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=-1)


def model_selections(model, prompt, generated):
    """The model's own selection_log for its full forward on prompt + generated[:-1]: [L, T, H, K]."""
    layers = [layer.self_attn for layer in model.model.layers]
    for attn in layers:
        attn.selection_log = []
    try:
        with torch.no_grad():
            model(torch.tensor(prompt + generated[:-1])[None])
        return torch.stack([attn.selection_log[0][0] for attn in layers])
    finally:
        for attn in layers:
            attn.selection_log = None


@pytest.mark.parametrize("mode", ["nosa", "infllmv2", "dma"])
@pytest.mark.parametrize("lengths", [(9, 14, 3), (10,)])  # rows at different positions, and one row
def test_recorded_selections_are_the_models_own(mode, lengths):
    model = tiny_model(mode, seed=3)
    llm = LLM(model, device="cpu", max_model_len=64, max_num_seqs=3)
    steps = 14
    outs = llm.generate(prompts(lengths), SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True),
                        use_tqdm=False, record_selections=True)
    cfg = model.config
    for prompt, out in zip(prompts(lengths), outs):
        sel = out.selections
        assert sel.dtype == torch.int16 and sel.device.type == "cpu"
        assert tuple(sel.shape) == (cfg.num_hidden_layers, steps - 1, cfg.num_key_value_heads, cfg.topk_blocks)
        assert out.selection_first_position == len(prompt)
        want = model_selections(model, prompt, out.token_ids)[:, len(prompt):]
        assert torch.equal(sel.long(), want.long())
    # Not recording leaves the fast path alone and returns no trace.
    assert llm.generate(prompts(lengths), GREEDY, use_tqdm=False)[0].selections is None


def test_dense_mode_records_no_selections():
    llm = LLM(tiny_model("dense"), device="cpu", max_model_len=64)
    out = llm.generate(prompts()[0], GREEDY, use_tqdm=False, record_selections=True)[0]
    assert out.selections is None and out.selection_first_position is None


def test_a_request_whose_sampling_fails_fails_alone_in_prefill_and_in_decode(model, monkeypatch):
    """Before, the batched sampling of a step raised for all of its rows at once: one request's bad sample
    (non-finite probabilities) failed every request prefilled or decoded beside it."""
    from nosa.engine import sampling

    poisoned = SamplingParams(temperature=0.7, seed=1, max_tokens=10, ignore_eos=True)
    real_sample_row = sampling.sample_row
    calls = {"n": 0}

    def fail_for_poisoned(logits, params, generator):
        if params is poisoned:
            calls["n"] += 1
            if calls["n"] == when["call"]:
                raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real_sample_row(logits, params, generator)

    monkeypatch.setattr(sampling, "sample_row", fail_for_poisoned)
    expected = [o.token_ids for o in make_llm(model).generate(prompts()[:2], GREEDY, use_tqdm=False)]
    for when in ({"call": 1}, {"call": 3}):  # at the first token (prefill), at a later decode step
        calls["n"] = 0
        llm = make_llm(model, max_num_seqs=3)
        outs = llm.generate(prompts()[:2] + [prompts()[2]], [GREEDY, GREEDY, poisoned], use_tqdm=False,
                            raise_on_error=False)
        assert [o.token_ids for o in outs[:2]] == expected
        assert outs[2].finish_reason == "error" and "inf, nan" in outs[2].error
        assert len(outs[2].token_ids) == when["call"] - 1
        assert idle(llm)


def test_a_temperature_too_small_for_float32_samples_greedily():
    """1e-46 underflows to 0 in float32 (NaN scores before); below MIN_TEMPERATURE sampling is greedy."""
    from nosa.engine.sampling import MIN_TEMPERATURE, sample

    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=t) for t in (1e-46, MIN_TEMPERATURE / 2, 0)]
    assert sample(logits, params, [None] * 3) == logits.argmax(-1).tolist()
    assert not SamplingParams(temperature=MIN_TEMPERATURE).greedy
