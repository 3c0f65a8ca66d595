"""The user API: sampling, stopping, continuous batching under budgets, errors, text prompts, the CLI."""

import json

import pytest
import torch

from tests.helpers import engine_model as tiny_model
from nosa import LLM, SamplingParams
from nosa.tokenizer import ByteTokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def prompts(lengths=(7, 12, 4)):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def model():
    return tiny_model("nosa", seed=6)


def make_llm(model, **kw):
    kw.setdefault("max_model_len", 64)
    return LLM(model, device="cpu", **kw)


def test_sampling_is_seeded_per_request_and_independent_of_the_batch(model):
    llm = make_llm(model)
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=123, max_tokens=10, ignore_eos=True)
    batch = llm.generate(prompts(), params, use_tqdm=False)
    alone = llm.generate([prompts()[1]], params, use_tqdm=False)
    assert batch[1].token_ids == alone[0].token_ids
    other_seed = llm.generate([prompts()[1]], SamplingParams(temperature=1.0, seed=7, max_tokens=10, ignore_eos=True), use_tqdm=False)
    assert other_seed[0].token_ids != alone[0].token_ids


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    llm = make_llm(model)
    greedy = [o.token_ids for o in llm.generate(prompts(), GREEDY, use_tqdm=False)]
    for params in (SamplingParams(temperature=0.8, top_k=1, seed=1, max_tokens=12, ignore_eos=True),
                   SamplingParams(temperature=0.8, top_p=1e-6, seed=1, max_tokens=12, ignore_eos=True)):
        assert [o.token_ids for o in llm.generate(prompts(), params, use_tqdm=False)] == greedy


def test_stop_token_eos_and_max_tokens_finish_at_different_steps(model):
    llm = make_llm(model, max_num_seqs=2)
    reference = llm.generate(prompts(), GREEDY, use_tqdm=False)
    stop_token = reference[0].token_ids[4]
    first = reference[0].token_ids.index(stop_token)
    outs = llm.generate(prompts(), [SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_token]),
                                    SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                                    SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)], use_tqdm=False)
    assert outs[0].token_ids == reference[0].token_ids[: first + 1] and outs[0].finish_reason == "stop"
    assert outs[1].token_ids == reference[1].token_ids[:3] and outs[1].finish_reason == "length"
    assert outs[2].token_ids == reference[2].token_ids[:9]
    eos_model = tiny_model("nosa", seed=6, eos_token_id=reference[2].token_ids[5])
    out = make_llm(eos_model).generate([prompts()[2]], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    first_eos = reference[2].token_ids.index(reference[2].token_ids[5])
    assert out.finish_reason == "eos" and out.token_ids == reference[2].token_ids[: first_eos + 1]


def test_text_prompts_stop_strings_and_saved_model(model, tmp_path):
    model.save_pretrained(tmp_path)
    ByteTokenizer().save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), device="cpu", max_model_len=64)
    full = llm.generate("hello there", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0]
    assert full.text == ByteTokenizer().decode(full.token_ids)
    ascii_tokens = [t for t in full.token_ids if 33 <= t < 127]
    assert ascii_tokens, "the greedy continuation has no printable byte to stop on"
    stop = chr(ascii_tokens[0])
    cut = llm.generate("hello there", SamplingParams(temperature=0, max_tokens=20, stop=[stop], ignore_eos=True), use_tqdm=False)[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and full.text.startswith(cut.text)
    assert cut.stats["generated_tokens"] == len(cut.token_ids) <= 20


def test_host_budget_queues_requests_and_results_do_not_change(model):
    free = make_llm(model, max_num_seqs=3).generate(prompts(), GREEDY, use_tqdm=False)
    cfg = model.config
    page = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.block_size * cfg.head_dim * 4
    # 6 pages: one request (<= 23 tokens) at a time, so the others wait for its pages.
    tight = make_llm(model, max_num_seqs=3, host_memory_budget=6 * page)
    outs = tight.generate(prompts(), GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == [o.token_ids for o in free]
    stats = tight.stats()
    assert len(stats.hit_rate_per_layer) == cfg.num_hidden_layers and stats.decode_tokens_per_s > 0
    assert stats.bytes_host_to_device > 0


def test_invalid_requests_fail_clearly_and_leave_the_rest_intact(model):
    llm = make_llm(model)
    good = llm.generate(prompts(), GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="request 1: the prompt is empty"):
        llm.generate([prompts()[0], [], prompts()[2]], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len=64"):
        llm.generate([list(range(60))], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="outside"):
        llm.generate([[1, 2, 999]], GREEDY, use_tqdm=False)
    mixed = llm.generate([prompts()[0], [], list(range(70)), prompts()[1], prompts()[2]], GREEDY, use_tqdm=False, raise_on_error=False)
    assert mixed[1].finish_reason == "error" and "empty" in mixed[1].error
    assert "max_model_len" in mixed[2].error
    assert [mixed[i].token_ids for i in (0, 3, 4)] == [o.token_ids for o in good]
    # The engine is still usable after the failures.
    assert llm.generate(prompts(), GREEDY, use_tqdm=False)[0].token_ids == good[0].token_ids


@pytest.mark.parametrize("kwargs,field", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(max_tokens=0), "max_tokens"), (dict(seed="x"), "seed"), (dict(stop=[""]), "stop"),
])
def test_invalid_sampling_parameters(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_budgets_too_small(model):
    with pytest.raises(ValueError, match="gpu_memory_budget=1000 bytes is too small"):
        make_llm(model, gpu_memory_budget=1000)
    with pytest.raises(ValueError, match="host_memory_budget=10 bytes is too small"):
        make_llm(model, host_memory_budget=10)
    cfg = model.config
    page = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.block_size * cfg.head_dim * 4
    llm = make_llm(model, host_memory_budget=2 * page)
    with pytest.raises(ValueError, match="needs 5 host pages .* holds 2"):
        llm.generate([prompts()[0]], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)


def test_cli_generate(model, tmp_path, capsys):
    from nosa.cli import main

    model.save_pretrained(tmp_path)
    ByteTokenizer().save_pretrained(tmp_path)
    code = main(["generate", str(tmp_path), "abc", "--device", "cpu", "--max-model-len", "64", "--max-tokens", "5",
                 "--ignore-eos", "--json", "--quiet"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    request, stats = json.loads(lines[0]), json.loads(lines[-1])
    assert len(request["token_ids"]) == 5 and stats["decode_tokens"] == 4
    assert main(["generate", str(tmp_path), "abc", "--device", "cpu", "--max-model-len", "4", "--quiet"]) == 2
    assert "max_model_len" in capsys.readouterr().err


def test_tiny_temperature_samples_the_argmax_instead_of_overflowing(model):
    llm = make_llm(model)
    greedy = [o.token_ids for o in llm.generate(prompts(), GREEDY, use_tqdm=False)]
    tiny = SamplingParams(temperature=1e-45, seed=3, max_tokens=12, ignore_eos=True)
    assert [o.token_ids for o in llm.generate(prompts(), tiny, use_tqdm=False)] == greedy


def test_an_error_mid_generate_gives_back_rows_and_pages(model, monkeypatch):
    llm = make_llm(model, max_num_seqs=2)
    expected = [o.token_ids for o in llm.generate(prompts(), GREEDY, use_tqdm=False)]
    free_pages, free_rows = llm.store.free_pages, sorted(llm.scheduler.free_rows)
    calls = {"n": 0}
    real_step = llm.runner.decode_step

    def failing_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated device failure")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(llm.runner, "decode_step", failing_step)
    monkeypatch.setattr(llm, "graphed", None)
    with pytest.raises(RuntimeError, match="simulated device failure"):
        llm.generate(prompts(), GREEDY, use_tqdm=False)
    assert not llm.scheduler.running and not llm.scheduler.waiting
    assert llm.store.free_pages == free_pages and sorted(llm.scheduler.free_rows) == free_rows
    monkeypatch.setattr(llm.runner, "decode_step", real_step)
    assert [o.token_ids for o in llm.generate(prompts(), GREEDY, use_tqdm=False)] == expected
