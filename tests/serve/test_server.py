"""The OpenAI-compatible server with the official `openai` client against a real server on a loopback
port: completions, chat, streaming, stop strings, usage, n and seeds, logprobs; the server's tokens equal
`LLM.generate`'s; 32+ concurrent streams; disconnects free the engine; every bad input gets a clear error."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from nosa.engine import LLM, SamplingParams
from nosa.tokenizer import ByteTokenizer
from tests.serve.conftest import MODEL_NAME, start_server, wait_until

TOK = ByteTokenizer()
PROMPTS = ["The quick brown fox", "hi", "Sparse attention offloads the KV cache", "a b c d e f g", "0123456789" * 3]


@pytest.fixture(scope="module")
def reference(model_dir):
    """LLM.generate over the same saved model: what the server must return."""
    llm = LLM(model_dir, device="cpu", max_model_len=128, max_num_seqs=8, tokenizer=TOK)

    def run(prompts, params):
        return llm.generate(prompts, params, use_tqdm=False)

    return run


def greedy(max_tokens, **kw):
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


def engine_counters(server) -> dict:
    """The engine's public accounting, read through /metrics (the engine thread answers between steps)."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line.startswith("nosa_") and "{" not in line:
            name, value = line.split()
            values[name] = float(value)
    return values


def engine_idle(server) -> bool:
    c = engine_counters(server)
    llm = server.llm
    return (c["nosa_engine_num_running"] == 0 and c["nosa_engine_num_waiting"] == 0
            and c["nosa_engine_free_rows"] == llm.max_num_seqs and c["nosa_engine_free_pages"] == c["nosa_engine_num_pages"]
            and c["nosa_queued_choices"] == 0)


# ------------------------------------------------------------------------------------------ happy paths
def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    metrics = httpx.get(server.url + "/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in ("nosa_requests_total", "nosa_time_to_first_token_seconds_bucket", "nosa_generation_tokens_total",
                 "nosa_engine_hit_rate", "nosa_engine_bytes_host_to_device_total", "nosa_engine_decode_tokens_per_second"):
        assert name in metrics.text
    # What a slow start is checked for: host store growths (the engine's own count) and decode graph work (none
    # on the CPU, where the step runs without CUDA graphs)
    counters = engine_counters(server)
    assert counters["nosa_engine_host_store_growths_total"] == server.llm.store.version
    assert counters["nosa_engine_graph_captures_total"] == counters["nosa_engine_graph_eager_warmups_total"] == 0
    assert counters["nosa_engine_graph_dropped_by_store_growth_total"] == 0


def test_completions_equal_llm_generate_with_usage(client, reference):
    want = reference(PROMPTS, greedy(24))
    for prompt, expected in zip(PROMPTS, want):
        got = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=24, temperature=0)
        choice = got.choices[0]
        assert choice.text == expected.text
        assert choice.finish_reason == ("length" if expected.finish_reason == "length" else "stop")
        assert got.usage.prompt_tokens == len(TOK.encode(prompt))
        assert got.usage.completion_tokens == len(expected.token_ids)
        assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_token_id_prompts_and_several_prompts_in_one_request(client, reference):
    ids = [TOK.encode(p) for p in PROMPTS[:3]]
    want = reference(ids, greedy(10))
    got = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=10, temperature=0)
    assert [c.index for c in got.choices] == [0, 1, 2]
    assert [c.text for c in got.choices] == [w.text for w in want]
    assert got.usage.prompt_tokens == sum(len(i) for i in ids)
    assert got.usage.completion_tokens == sum(len(w.token_ids) for w in want)


def test_chat_tokens_equal_llm_generate_through_logprob_bytes(client, reference):
    from nosa.serve.text import fallback_chat_prompt

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    prompt = fallback_chat_prompt([(m["role"], m["content"]) for m in messages])
    expected = reference([prompt], greedy(20, logprobs=2))[0]
    got = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=20, temperature=0,
                                         logprobs=True, top_logprobs=2)
    choice = got.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    # The byte tokenizer's tokens are bytes: `bytes` of each logprob entry is the token id itself.
    assert [e.bytes[0] for e in choice.logprobs.content if e.bytes] == [t for t in expected.token_ids if t < 256]
    assert len(choice.logprobs.content) == len(expected.token_ids) == got.usage.completion_tokens
    for entry in choice.logprobs.content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy: the top token
    assert got.usage.prompt_tokens == len(TOK.encode(prompt))


def test_completion_logprobs_shape(client):
    got = client.completions.create(model=MODEL_NAME, prompt="abc", max_tokens=6, temperature=0, logprobs=3)
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == got.usage.completion_tokens
    assert all(v <= 0 for v in lp.token_logprobs) and all(1 <= len(t) <= 3 for t in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset)


def test_streaming_equals_non_streaming_and_reports_usage(client):
    for chat in (False, True):
        kw = dict(model=MODEL_NAME, max_tokens=30, temperature=0)
        if chat:
            full = client.chat.completions.create(messages=[{"role": "user", "content": "stream"}], **kw)
            stream = client.chat.completions.create(messages=[{"role": "user", "content": "stream"}], stream=True,
                                                    stream_options={"include_usage": True}, **kw)
        else:
            full = client.completions.create(prompt="stream me", **kw)
            stream = client.completions.create(prompt="stream me", stream=True, stream_options={"include_usage": True}, **kw)
        chunks = list(stream)
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
        assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
        assert all(c.usage is None for c in chunks[:-1])
        pieces = [(c.choices[0].delta.content or "") if chat else c.choices[0].text for c in chunks[:-1]]
        text = full.choices[0].message.content if chat else full.choices[0].text
        assert "".join(pieces) == text
        assert chunks[-2].choices[0].finish_reason == full.choices[0].finish_reason
        if chat:
            assert chunks[0].choices[0].delta.role == "assistant"
        assert len(chunks) > 3  # tokens arrive as produced, not in one piece


def _stop_candidate(text: str) -> str:
    """A two-character printable piece of `text` away from its start, to use as a stop string."""
    for i in range(3, len(text) - 2):
        piece = text[i : i + 2]
        if piece.isprintable() and "\ufffd" not in piece and text.find(piece) == i:
            return piece
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_strings_are_cut_like_openai_streaming_or_not(client):
    free = client.completions.create(model=MODEL_NAME, prompt="stop here", max_tokens=40, temperature=0).choices[0].text
    stop = _stop_candidate(free)
    want = free[: free.find(stop)]
    got = client.completions.create(model=MODEL_NAME, prompt="stop here", max_tokens=40, temperature=0, stop=[stop, "never appears"])
    assert got.choices[0].text == want and got.choices[0].finish_reason == "stop"
    assert got.usage.completion_tokens < 40
    stream = client.completions.create(model=MODEL_NAME, prompt="stop here", max_tokens=40, temperature=0, stop=stop, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_n_choices_with_seed_are_seed_plus_index(client):
    kw = dict(model=MODEL_NAME, prompt="sample", max_tokens=12, temperature=1.0, top_p=0.9)
    both = client.completions.create(n=2, seed=40, **kw)
    assert [c.index for c in both.choices] == [0, 1]
    first, second = client.completions.create(seed=40, **kw), client.completions.create(seed=41, **kw)
    assert [c.text for c in both.choices] == [first.choices[0].text, second.choices[0].text]
    assert both.usage.completion_tokens == first.usage.completion_tokens + second.usage.completion_tokens
    assert both.usage.prompt_tokens == len(TOK.encode("sample"))  # the prompt counts once, as with OpenAI


def test_32_concurrent_streams_of_mixed_lengths_all_finish_with_the_right_tokens(server, reference):
    prompts = [("p%d " % i) * (1 + i % 7) for i in range(36)]
    lengths = [3 + (i * 7) % 29 for i in range(36)]
    want = reference(prompts, [greedy(n) for n in lengths])

    async def one(client, prompt, n):
        stream = await client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=n, temperature=0, stream=True,
                                                 stream_options={"include_usage": True})
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
            usage = chunk.usage or usage
        return text, usage.completion_tokens

    async def all_of_them():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
            return await asyncio.gather(*(one(client, p, n) for p, n in zip(prompts, lengths)))

    results = asyncio.run(all_of_them())
    assert [r[0] for r in results] == [w.text for w in want]
    assert [r[1] for r in results] == [len(w.token_ids) for w in want]
    assert wait_until(lambda: engine_idle(server))


def test_a_client_that_disconnects_mid_stream_frees_its_row_and_pages(server):
    assert wait_until(lambda: engine_idle(server))
    steps_before = engine_counters(server)["nosa_engine_decode_steps_total"]
    body = {"model": MODEL_NAME, "prompt": "long one", "max_tokens": 110, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            received = [next(lines) for _ in range(6)]  # a few chunks (and their blank separators)
            assert any(line.startswith("data: {") for line in received)
            during = engine_counters(server)
            assert during["nosa_engine_num_running"] == 1 and during["nosa_engine_free_rows"] == server.llm.max_num_seqs - 1
        # Leaving the block closes the connection mid-stream.
    assert wait_until(lambda: engine_idle(server), timeout=5)
    steps = engine_counters(server)["nosa_engine_decode_steps_total"] - steps_before
    assert steps < 100, f"the aborted request kept decoding ({steps} steps)"


def test_a_non_streaming_client_that_disconnects_is_aborted_too(server):
    assert wait_until(lambda: engine_idle(server))
    body = {"model": MODEL_NAME, "prompt": "x", "max_tokens": 120, "temperature": 0, "ignore_eos": True}
    # Slow the engine down so the request is still running when the client gives up.
    runner = server.llm.runner
    original = runner.decode_step

    def slow(*args, **kwargs):
        time.sleep(0.02)
        return original(*args, **kwargs)

    runner.decode_step = slow
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json=body, timeout=0.3)
        # 120 tokens take >= 2.4 s here: idle within 1.5 s means the request was aborted, not finished.
        assert wait_until(lambda: engine_idle(server), timeout=1.5)
    finally:
        runner.decode_step = original


# ------------------------------------------------------------------------------------------ bad input
def _post(server, path, body, raw=False):
    content = body if raw else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"}, timeout=30)


BAD_COMPLETIONS = [
    ({"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "seed": 1.5}, "seed"),
    ({"prompt": "x", "logprobs": 9}, "logprobs"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": "x", "logit_bias": {"1": 2}}, "logit_bias"),
    ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[1, 2], []]}, "prompt"),
    ({"prompt": {"text": "x"}}, "prompt"),
]


@pytest.mark.parametrize("body,param", BAD_COMPLETIONS)
def test_bad_completion_fields_get_400_naming_the_field(server, body, param):
    response = _post(server, "/v1/completions", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"].split(".")[0] == param
    assert param in error["message"]


BAD_CHATS = [
    ({"messages": []}, "messages"),
    ({}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1}, "max_completion_tokens"),
]


@pytest.mark.parametrize("body,param", BAD_CHATS)
def test_bad_chat_fields_get_400_naming_the_field(server, body, param):
    response = _post(server, "/v1/chat/completions", body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].split(".")[0] == param


def test_malformed_json_unknown_model_and_impossible_requests(server, client):
    for raw in (b"{not json", b"", b"\xff\xfe", b"[1, 2]", b'"text"'):
        response = _post(server, "/v1/completions", raw, raw=True)
        assert response.status_code == 400, raw
        assert response.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert "gpt-4" in str(err.value)
    # Can never fit: max_model_len is 128.
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=500)
    assert "max_model_len" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL_NAME, prompt="y" * 200, max_tokens=2)
    assert "max_model_len" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL_NAME, prompt=[5, 999], max_tokens=2)
    assert "vocab_size" in str(err.value)
    # None of that hurt the server or leaked engine state.
    assert httpx.get(server.url + "/health").status_code == 200
    assert client.completions.create(model=MODEL_NAME, prompt="still here", max_tokens=3, temperature=0).usage.completion_tokens >= 1
    assert wait_until(lambda: engine_idle(server))


def test_an_engine_failure_fails_only_its_request(server, client, reference):
    """A prefill that raises (here: for one marked prompt) fails that request with a 500; requests running
    beside it finish with the right tokens, and the engine keeps serving."""
    runner = server.llm.runner
    original = runner.prefill
    marker = TOK.encode("POISON", add_bos=False)

    def failing_prefill(chunks):
        # A packed forward holding the marked prompt fails; the engine then retries its chunks one by one.
        if any(c.state.token_ids[-len(marker):].tolist() == marker for c in chunks):
            raise RuntimeError("injected prefill failure")
        return original(chunks)

    runner.prefill = failing_prefill
    try:
        want = reference(["healthy request"], greedy(40))[0]

        async def both():
            async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
                healthy = asyncio.create_task(c.completions.create(model=MODEL_NAME, prompt="healthy request", max_tokens=40, temperature=0))
                await asyncio.sleep(0.05)
                poisoned = c.completions.create(model=MODEL_NAME, prompt="POISON", max_tokens=5, temperature=0)
                return await asyncio.gather(healthy, poisoned, return_exceptions=True)

        healthy, poisoned = asyncio.run(both())
        assert isinstance(poisoned, openai.InternalServerError) and "injected prefill failure" in str(poisoned)
        assert healthy.choices[0].text == want.text
        stream = client.completions.create(model=MODEL_NAME, prompt="POISON", max_tokens=5, temperature=0, stream=True)
        with pytest.raises(openai.APIError) as err:
            list(stream)
        assert "injected prefill failure" in str(err.value)
    finally:
        runner.prefill = original
    assert wait_until(lambda: engine_idle(server))
    assert client.completions.create(model=MODEL_NAME, prompt="POISON", max_tokens=3, temperature=0).usage.completion_tokens >= 1


# ------------------------------------------------------------------------------------------ queue bound
def _hold_a_row_and_queue_one(running):
    """With one row and max_queue=1: a streaming request takes the row, a second waits (fills the queue).
    Returns the open streams (close them to finish)."""
    http = httpx.Client(timeout=30)
    first = http.stream("POST", running.url + "/v1/completions",
                        json={"model": MODEL_NAME, "prompt": "holder", "max_tokens": 100, "temperature": 0, "stream": True,
                              "ignore_eos": True})
    response = first.__enter__()
    lines = response.iter_lines()  # kept alive: a collected iterator would close the stream
    next(lines)  # the first token arrived: it holds the row
    second = httpx.Client(timeout=30)
    pending = second.stream("POST", running.url + "/v1/completions",
                            json={"model": MODEL_NAME, "prompt": "waiter", "max_tokens": 2, "temperature": 0, "stream": True})
    return http, (first, lines), second, pending


def test_a_full_queue_gets_429_under_reject(model_dir):
    with start_server(model_dir, max_queue=1, queue_full="reject", max_num_seqs=1) as running:
        runner = running.llm.runner
        original = runner.decode_step

        def slow(*args, **kwargs):
            time.sleep(0.01)
            return original(*args, **kwargs)

        runner.decode_step = slow
        http, (first, _lines), second, pending = _hold_a_row_and_queue_one(running)
        waiter_result = {}
        thread = threading.Thread(target=lambda: waiter_result.setdefault("r", pending.__enter__().read()))
        thread.start()
        try:
            assert wait_until(lambda: engine_counters(running)["nosa_queued_choices"] == 1)
            response = _post(running, "/v1/completions", {"model": MODEL_NAME, "prompt": "third", "max_tokens": 2})
            assert response.status_code == 429
            assert response.json()["error"]["type"] == "rate_limit_error" and "max_queue=1" in response.json()["error"]["message"]
        finally:
            first.__exit__(None, None, None)
            http.close()
        thread.join(30)
        assert b"[DONE]" in waiter_result["r"]
        second.close()
        runner.decode_step = original
        assert wait_until(lambda: engine_idle(running))


def test_a_full_queue_waits_under_wait(model_dir):
    with start_server(model_dir, max_queue=1, queue_full="wait", max_num_seqs=1) as running:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=60)

        async def three():
            async with openai.AsyncOpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
                calls = [c.completions.create(model=MODEL_NAME, prompt=f"q{i}", max_tokens=20, temperature=0) for i in range(3)]
                return await asyncio.gather(*calls)

        results = asyncio.run(three())
        assert [r.usage.completion_tokens >= 1 for r in results] == [True] * 3
        assert engine_counters(running)["nosa_queue_full_waits_total"] >= 1  # one of them did wait for room
        assert client.models.list().data[0].id == MODEL_NAME
        assert wait_until(lambda: engine_idle(running))
