"""The OpenAI-compatible HTTP API over an `EngineService` (FastAPI on uvicorn).

Endpoints: POST /v1/completions, POST /v1/chat/completions (stream: server-sent events `data: {...}` then
`data: [DONE]`), GET /v1/models, GET /health, GET /metrics (Prometheus text).

Errors use OpenAI's JSON shape {"error": {"message", "type", "param", "code"}}: 400 for malformed JSON, a
bad or unsupported field (param names it) and requests that can never fit the engine (message gives the
reason); 404 for an unknown model; 429 when the queue is full under --queue-full reject; 500 when the
engine failed on this request (the others go on); 503 while the engine is not running. A client that
disconnects has its choices aborted, which gives their rows and pages back at once.

Sampling: temperature 0 is greedy; choice i of a request with `seed` uses seed + i (so n > 1 choices
differ but are reproducible); logprobs are log_softmax of the raw logits (before temperature).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError

from nosa.engine import SamplingParams
from nosa.serve.engine_service import EngineService, QueueFull, ServiceStopped
from nosa.serve.metrics import CONTENT_TYPE, ServerMetrics
from nosa.serve.protocol import ChatCompletionRequest, CompletionRequest, error_body
from nosa.serve.responses import ChoiceState, final_response, new_id, now, stream_chunk, usage_chunk
from nosa.serve.text import chat_prompt_ids, encode

log = logging.getLogger("nosa.serve")

class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.kind, self.param), status_code=self.status)


def _validation_error(err: ValidationError) -> ApiError:
    first = err.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    message = first["msg"].removeprefix("Value error, ")
    return ApiError(400, f"{param}: {message}" if param else message, param)


async def _parse(request: Request, model_class):
    body = await request.body()
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model_class.model_validate(data)
    except ValidationError as err:
        raise _validation_error(err) from None


def create_app(service: EngineService, tokenizer, model_name: str) -> FastAPI:
    """The app serving `service`'s engine as `model_name`; the lifespan starts and stops the service."""
    if tokenizer is None:
        raise ValueError("the server needs a tokenizer (text prompts, chat, stop strings): save one beside the model")
    llm = service.llm
    metrics = service.metrics if service.metrics is not None else ServerMetrics()
    service.metrics = metrics

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(title="nosa", lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(ApiError)
    async def _api_error(request, err: ApiError):
        metrics.request(request.url.path, err.status)
        return err.response()

    @app.exception_handler(Exception)
    async def _unexpected(request, err: Exception):  # one bad request never takes the server down
        log.exception("unhandled error on %s", request.url.path)
        metrics.request(request.url.path, 500)
        return JSONResponse(error_body(f"internal error: {type(err).__name__}: {err}", "server_error"), status_code=500)

    @app.get("/health")
    async def health():
        if not service.alive:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "nosa",
                                            "max_model_len": llm.max_model_len}]}

    @app.get("/metrics")
    async def metrics_endpoint():
        engine = None
        if service.alive:
            with contextlib.suppress(asyncio.TimeoutError):
                engine = await service.engine_snapshot()
        return PlainTextResponse(metrics.render(engine, service.queued, service.queue_full_waits), media_type=CONTENT_TYPE)

    def check_model(req) -> None:
        if req.model is not None and req.model != model_name:
            raise ApiError(404, f"the model {req.model!r} does not exist; this server serves {model_name!r}", "model",
                           kind="not_found_error")

    def sampling(req, max_tokens: int, logprobs: int | None) -> list[SamplingParams]:
        extra = {} if logprobs is None else {"logprobs": logprobs}
        try:
            return [SamplingParams(temperature=req.temperature, top_p=req.top_p,
                                   seed=None if req.seed is None else req.seed + i, max_tokens=max_tokens,
                                   stop=req.stop or None, ignore_eos=req.ignore_eos, **extra) for i in range(req.n)]
        except ValueError as err:
            raise ApiError(400, str(err)) from None

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await _parse(request, CompletionRequest)
        check_model(req)
        prompts = []
        for i, p in enumerate(req.prompts()):
            prompts.append(encode(tokenizer, p) if isinstance(p, str) else p)
            if not prompts[-1]:
                raise ApiError(400, f"prompt {i} is empty", "prompt")
        params = sampling(req, req.max_tokens, req.logprobs)
        return await run(request, req, prompts, params, chat=False, want_logprobs=req.logprobs is not None)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await _parse(request, ChatCompletionRequest)
        check_model(req)
        try:
            prompt = chat_prompt_ids(tokenizer, [(m.role, m.text()) for m in req.messages])
        except Exception as err:  # noqa: BLE001 - the template refused these messages (jinja2 TemplateError, ...)
            raise ApiError(400, f"the model's chat template rejected the messages: {err}", "messages") from err
        # Without a limit, a chat reply may use the rest of the context (what OpenAI does).
        max_tokens = req.token_budget(default=max(1, llm.max_model_len - len(prompt)))
        k = (req.top_logprobs or 0) if req.logprobs else None
        params = sampling(req, max_tokens, k)
        return await run(request, req, [prompt], params, chat=True, want_logprobs=req.logprobs)

    async def run(request: Request, req, prompts: list[list[int]], params: list[SamplingParams], chat: bool,
                  want_logprobs: bool):
        endpoint = request.url.path
        events: asyncio.Queue = asyncio.Queue()
        try:
            choices = await service.submit(prompts, params, events)
        except BaseException as err:
            if isinstance(err, ValueError):  # the engine's reason: too long, over the budgets, bad token ids
                raise ApiError(400, str(err)) from None
            if isinstance(err, QueueFull):
                raise ApiError(429, str(err), kind="rate_limit_error") from None
            if isinstance(err, ServiceStopped):
                raise ApiError(503, str(err), kind="server_error") from None
            raise
        prompt_tokens = sum(len(p) for p in prompts)
        metrics.prompt(prompt_tokens)
        states = {c.index: ChoiceState(c.index, tokenizer, req.stop, chat, want_logprobs) for c in choices}
        response_id, created = new_id("chatcmpl" if chat else "cmpl"), now()
        if req.stream:
            stream = sse(choices, states, events, chat, response_id, created, prompt_tokens, req.include_usage, endpoint)
            return StreamingResponse(stream, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        metrics.in_progress += 1
        try:
            connected = await collect(request, choices, states, events)
        finally:
            metrics.in_progress -= 1
            service.abort(choices)  # nothing if all finished; otherwise frees what is left
        if not connected:
            metrics.request(endpoint, 499)
            return Response(status_code=499)  # nobody reads it: the client has gone
        failed = [s.error for s in states.values() if s.error]
        if failed:
            raise ApiError(500, failed[0], kind="server_error")
        metrics.request(endpoint, 200)
        ordered = [states[i] for i in sorted(states)]
        return final_response(chat, response_id, model_name, created, ordered, prompt_tokens)

    def apply(choice, event, states) -> tuple[ChoiceState, str, list[dict], bool]:
        """One event into its choice's state -> (state, text delta, logprob entries, finished)."""
        state = states[choice.index]
        if event.error is not None:
            state.error = event.error
            return state, "", [], True
        delta, entries = state.push(event.token_ids, event.logprobs, event.finished)
        finished = event.finished
        if state.text.stopped and not finished:
            # The stop text showed up here first (the engine checks after each token too): end it now.
            service.abort([choice])
            finished = True
        if finished:
            state.finish_reason = "stop" if state.text.stopped else event.finish_reason
        return state, delta, entries, finished

    async def collect(request: Request, choices, states, events) -> bool:
        """Wait for every choice to finish; False (and the choices aborted) if the client disconnects.

        The disconnect is noticed by a task that waits on the ASGI receive channel: once the body has been
        read, the next message there is `http.disconnect` (polling `request.is_disconnected()` misses it
        under uvicorn while the connection is not being read)."""
        gone = object()

        async def watch():
            while (await request.receive())["type"] != "http.disconnect":
                pass
            events.put_nowait((gone, None))

        watcher = asyncio.create_task(watch())
        try:
            remaining = len(choices)
            while remaining:
                choice, event = await events.get()
                if choice is gone:
                    service.abort(choices)
                    return False
                remaining -= apply(choice, event, states)[3]
            return True
        finally:
            watcher.cancel()

    async def sse(choices, states, events, chat, response_id, created, prompt_tokens, include_usage, endpoint):
        def line(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        metrics.in_progress += 1
        remaining, status = len(choices), 200
        try:
            if chat:  # OpenAI opens each chat choice with the role and empty content
                for index in sorted(states):
                    yield line(stream_chunk(True, response_id, model_name, created, states[index], "", [], None, include_usage))
            while remaining:
                choice, event = await events.get()
                state, delta, entries, finished = apply(choice, event, states)
                remaining -= finished
                if state.error is not None:
                    status = 500
                    yield line(error_body(state.error, "server_error"))
                    continue
                if delta or entries:
                    yield line(stream_chunk(chat, response_id, model_name, created, state, delta, entries, None, include_usage))
                if finished:
                    yield line(stream_chunk(chat, response_id, model_name, created, state, "", [], state.finish_reason, include_usage))
            if include_usage:
                completion = sum(s.tokens for s in states.values())
                yield line(usage_chunk(chat, response_id, model_name, created, prompt_tokens, completion))
            yield "data: [DONE]\n\n"
        except BaseException:
            status = 499  # the client went away (the stream was cancelled) or sending failed
            raise
        finally:
            metrics.in_progress -= 1
            service.abort(choices)  # frees whatever has not finished: rows and pages back at once
            metrics.request(endpoint, status)

    return app
