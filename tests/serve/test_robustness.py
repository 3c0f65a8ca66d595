"""Defects a review of the serving stack found, each with the case that showed it: a /metrics scrape that
times out must not kill the engine thread; OpenAI's nullable fields accept null; a chat template that
refuses the messages is the client's error; a stop string whose last character is multi-byte is never
streamed in part; generated text leaves out special tokens; a request of several prompts is checked
against max_queue as a whole."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from nosa.serve.text import IncrementalText
from nosa.tokenizer import ByteTokenizer
from tests.serve.conftest import MODEL_NAME, RunningServer, start_server, wait_until

TOK = ByteTokenizer()


def _post(server, path, body, timeout=30):
    return httpx.post(server.url + path, json=body, timeout=timeout)


def test_a_metrics_scrape_that_times_out_leaves_the_engine_running(model_dir):
    """Before: the timed-out snapshot's future was cancelled, the engine thread answered it anyway
    (InvalidStateError), died, and every request from then on got 503."""
    with start_server(model_dir) as running:
        running.service.snapshot_timeout_s = 0.2
        runner = running.llm.runner
        original = runner.decode_step
        slow_steps = {"left": 1}

        def slow(*args, **kwargs):
            if slow_steps["left"]:
                slow_steps["left"] -= 1
                time.sleep(1.0)
            return original(*args, **kwargs)

        runner.decode_step = slow
        result = {}
        request = threading.Thread(target=lambda: result.setdefault("r", _post(running, "/v1/completions", {
            "model": MODEL_NAME, "prompt": "x", "max_tokens": 4, "temperature": 0})))
        request.start()
        assert wait_until(lambda: slow_steps["left"] == 0)
        metrics = httpx.get(running.url + "/metrics", timeout=10)  # answered without the engine's gauges
        assert metrics.status_code == 200 and "nosa_engine_num_running" not in metrics.text
        request.join(30)
        runner.decode_step = original
        assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] == 4
        time.sleep(0.1)  # the engine thread has met the cancelled snapshot by now
        assert running.service.fatal is None and running.service.alive
        assert httpx.get(running.url + "/health", timeout=10).status_code == 200
        assert _post(running, "/v1/completions", {"model": MODEL_NAME, "prompt": "y", "max_tokens": 2}).status_code == 200
        assert "nosa_engine_num_running" in httpx.get(running.url + "/metrics", timeout=10).text


@pytest.fixture(scope="module")
def served(model_dir):
    with start_server(model_dir) as running:
        yield running


def test_null_fields_mean_their_defaults(served):
    """The official client sends null for every argument given as None; OpenAI's schema allows it."""
    nulls = {"temperature": None, "top_p": None, "n": None, "stream": None, "presence_penalty": None,
             "frequency_penalty": None, "seed": None, "stop": None}
    response = _post(served, "/v1/completions", {"model": MODEL_NAME, "prompt": "ab", "max_tokens": None,
                                                 "echo": None, **nulls})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] <= 16  # max_tokens' default
    chat = _post(served, "/v1/chat/completions", {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}],
                                                  "max_tokens": 3, "logprobs": None, **nulls})
    assert chat.status_code == 200, chat.text
    # null is the default, not a way around the checks: a bad value is still refused.
    bad = _post(served, "/v1/completions", {"model": MODEL_NAME, "prompt": "ab", "temperature": -1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature"


def test_a_tiny_temperature_is_greedy_and_harms_no_other_request(served):
    """1e-46 is 0 in float32: dividing by it gave NaN probabilities, and the batched sampling of the step
    failed every request sampled with it."""
    body = {"model": MODEL_NAME, "prompt": "The quick", "max_tokens": 5}
    greedy = _post(served, "/v1/completions", {**body, "temperature": 0}).json()
    tiny = _post(served, "/v1/completions", {**body, "temperature": 1e-46})
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["text"] == greedy["choices"][0]["text"]


def test_a_request_of_several_prompts_is_checked_against_max_queue_as_a_whole(model_dir):
    """Three prompts under max_queue=2 can never fit: always 400, as n=3 choices of one prompt are (before,
    the prompts were queued one by one and the answer was 429 or 200 by timing)."""
    with start_server(model_dir, max_queue=2, queue_full="reject") as running:
        for _ in range(3):
            response = _post(running, "/v1/completions", {"model": MODEL_NAME, "prompt": ["a", "b", "c"], "max_tokens": 2})
            assert response.status_code == 400 and "can never fit a queue of max_queue=2" in response.json()["error"]["message"]
        two = _post(running, "/v1/completions", {"model": MODEL_NAME, "prompt": ["a", "b"], "max_tokens": 2})
        assert two.status_code == 200 and [c["index"] for c in two.json()["choices"]] == [0, 1]


def _hf_tokenizer(chat_template=None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "foo": 5}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = chat_template
    return tokenizer


def test_generated_text_leaves_out_special_tokens():
    """transformers' decode keeps special tokens by default: the end-of-sequence token's text '</s>' was
    in responses."""
    hf = _hf_tokenizer()
    text = IncrementalText(hf, [])
    assert text.push([3, 4]) + text.push([2], final=True) == "hello world"


def test_a_chat_template_that_refuses_the_messages_is_a_400(model_dir):
    from nosa.engine import LLM
    from nosa.serve.app import create_app
    from nosa.serve.engine_service import EngineService

    template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                "{% endif %}{{ m['content'] }} {% endfor %}")
    hf = _hf_tokenizer(template)
    service = EngineService(LLM(model_dir, device="cpu", max_model_len=64, max_num_seqs=2, tokenizer=hf))
    with RunningServer(create_app(service, hf, MODEL_NAME), service) as running:
        refused = _post(running, "/v1/chat/completions", {"model": MODEL_NAME, "max_tokens": 2, "messages": [
            {"role": "system", "content": "hello"}, {"role": "user", "content": "world"}]})
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert error["param"] == "messages" and "System role not supported" in error["message"]
        fine = _post(running, "/v1/chat/completions", {"model": MODEL_NAME, "max_tokens": 2,
                                                       "messages": [{"role": "user", "content": "hello"}]})
        assert fine.status_code == 200


@pytest.mark.parametrize("stop", ["café", "\x1aח"])
def test_a_stop_string_ending_in_a_multibyte_character_is_never_streamed_in_part(stop):
    """While the character's bytes arrive the text ends in U+FFFD, which hid the stop string's start from
    the hold-back: 'xxcaf' was streamed although the final text is 'xx'."""
    text = IncrementalText(TOK, [stop])
    streamed = "".join(text.push([byte]) for byte in ("xx" + stop + "tail").encode())
    streamed += text.push([], final=True)
    assert text.stopped and text.text == "xx" and streamed == "xx"
    # A prefix that never becomes the stop string is released once it cannot.
    other = IncrementalText(TOK, [stop])
    streamed = "".join(other.push([byte]) for byte in ("xx" + stop[:-1] + "ü!").encode())
    assert not other.stopped and streamed + other.push([], final=True) == "xx" + stop[:-1] + "ü!"
