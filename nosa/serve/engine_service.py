"""The engine as a service: one thread owns the `LLM` and runs its step loop; asyncio code talks to it.

Why a thread: `LLM.step()` is blocking GPU/CPU work (a prefill or a decode step over the whole batch); run
on the event loop it would stall every connection for its duration. The thread is the only code that
touches the LLM, so the engine needs no locks: the event loop sends it commands (add, abort, stats) through
a queue and it answers through futures and `call_soon_threadsafe`.

Continuous batching comes from the engine: the thread applies every pending command between two steps, so
a request that arrives while others decode is queued at once and admitted into the running batch by the
next `step()`; each step's new tokens are pushed to their choices' asyncio queues as soon as it returns.

Queue bound: `max_queue` counts choices accepted but not yet started (no first token yet). When a request
would exceed it, `queue_full="reject"` raises `QueueFull` (HTTP 429) and `"wait"` waits for room.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from nosa.engine import LLM, SamplingParams

log = logging.getLogger("nosa.serve")

QUEUE_FULL_POLICIES = ("reject", "wait")
# How long the idle engine thread sleeps between checks of its stop flag.
IDLE_POLL_S = 0.05
# Engine finish reasons in OpenAI's terms (the end-of-sequence token and a stop string are both "stop").
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


class QueueFull(Exception):
    """The request would exceed max_queue and the policy is 'reject'."""


class ServiceStopped(Exception):
    """The service is shutting down or its engine thread has died."""


@dataclass
class Event:
    """What a choice receives: new tokens (with their logprobs when asked), then one final event."""

    token_ids: list[int]
    logprobs: list[dict] | None = None
    finished: bool = False
    finish_reason: str | None = None  # OpenAI's: "stop" or "length"; None with `error`
    error: str | None = None


@dataclass
class Choice:
    """One engine request (one of a request's n choices), seen from the event loop."""

    request_id: int
    prompt_tokens: int
    index: int = 0  # the choice's index in the response
    # Receives (choice, event) pairs; the choices of one HTTP request share one queue.
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float | None = None
    tokens: int = 0
    done: bool = False


@dataclass
class _Tracked:
    """The engine thread's record of one request it runs for the service."""

    choice: Choice
    delivered: int = 0  # tokens already pushed to the choice


class EngineService:
    def __init__(self, llm: LLM, max_queue: int | None = None, queue_full: str = "reject", metrics=None):
        if queue_full not in QUEUE_FULL_POLICIES:
            raise ValueError(f"queue_full must be one of {QUEUE_FULL_POLICIES}, got {queue_full!r}")
        if max_queue is not None and (isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1):
            raise ValueError(f"max_queue must be an integer >= 1 or None (no bound), got {max_queue!r}")
        self.llm = llm
        self.max_queue = max_queue
        self.queue_full = queue_full
        self.metrics = metrics
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._tracked: dict[int, _Tracked] = {}  # engine thread only: request id -> record, in submission order
        self._queued = 0  # event loop only: choices without a first token
        self.queue_full_waits = 0  # requests that found the queue full and waited (policy 'wait')
        self._room: asyncio.Condition | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.fatal: BaseException | None = None
        self.snapshot_timeout_s = 5.0  # how long /metrics waits for the engine's figures

    # ------------------------------------------------------------------------------------ lifecycle
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._room = asyncio.Condition()
        self._thread = threading.Thread(target=self._run, name="nosa-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._commands.put(("wake",))
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()

    # ------------------------------------------------------------------------------------ event loop side
    async def submit(self, prompts: list[list[int]], params: list[SamplingParams], events: asyncio.Queue) -> list[Choice]:
        """Queue a request's choices: for each prompt, one engine request per entry of `params` (OpenAI's n),
        indexed prompt by prompt; their events go to `events`. All or none: raises ValueError with the
        engine's reason if one can never run, QueueFull if they do not fit the queue under 'reject' (the
        whole request is checked against max_queue at once, as n choices of one prompt are)."""
        if not self.alive:
            raise ServiceStopped("the engine is not running")
        n = len(prompts) * len(params)
        await self._wait_for_room(n)
        choices = [Choice(-1, len(prompt), i * len(params) + j, events)
                   for i, prompt in enumerate(prompts) for j in range(len(params))]
        self._queued += n
        future: Future = Future()
        self._commands.put(("add", prompts, params, choices, future))
        try:
            ids = await asyncio.wrap_future(future)
        except BaseException:
            self._queued -= n
            # Cancelled (the client left) after the engine thread took the command: whatever it added
            # has nobody to deliver to, so it is aborted as soon as it exists.
            future.add_done_callback(self._abort_orphans)
            await self._notify_room()
            raise
        for choice, request_id in zip(choices, ids):
            choice.request_id = request_id
        return choices

    def _abort_orphans(self, future: Future) -> None:
        if not future.cancelled() and future.exception() is None:
            self._commands.put(("abort", list(future.result())))

    async def _wait_for_room(self, n: int) -> None:
        if self.max_queue is None:
            return
        if n > self.max_queue:
            raise ValueError(f"{n} choices (prompts x n) can never fit a queue of max_queue={self.max_queue}")
        if self._queued + n <= self.max_queue:
            return
        if self.queue_full == "reject":
            raise QueueFull(f"the request queue is full ({self._queued} waiting, max_queue={self.max_queue}); retry later")
        self.queue_full_waits += 1
        async with self._room:
            await self._room.wait_for(lambda: self._queued + n <= self.max_queue)

    async def _notify_room(self) -> None:
        if self._room is not None:
            async with self._room:
                self._room.notify_all()

    @property
    def queued(self) -> int:
        """Choices accepted that have no first token yet (what max_queue bounds)."""
        return self._queued

    def abort(self, choices: list[Choice]) -> None:
        """Cancel these choices (a client went away): the engine gives back their rows and pages at once."""
        pending = [c for c in choices if not c.done]
        for c in pending:
            c.done = True
            if c.first_token_at is None:
                self._queued -= 1
        if pending:
            self._commands.put(("abort", [c.request_id for c in pending]))
            self._loop.create_task(self._notify_room())

    async def engine_snapshot(self, timeout: float | None = None) -> dict:
        """Accounting and statistics read by the engine thread between two steps (never concurrently);
        asyncio.TimeoutError after `timeout` (default `snapshot_timeout_s`) when a long step (a first
        compile, a graph capture) holds the thread, with the engine unharmed."""
        timeout = self.snapshot_timeout_s if timeout is None else timeout
        future: Future = Future()
        self._commands.put(("snapshot", future))
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout)

    def _deliver(self, batch: list[tuple[Choice, Event]]) -> None:
        """Runs on the event loop: hand each choice its events, count them, free queue room."""
        freed = False
        now = time.perf_counter()
        for choice, event in batch:
            if choice.done and not event.finished:
                continue
            if event.token_ids:
                if choice.first_token_at is None:
                    choice.first_token_at = now
                    if not choice.done:
                        self._queued -= 1
                        freed = True
                    if self.metrics is not None:
                        self.metrics.first_token(now - choice.submitted_at)
                elif self.metrics is not None and choice.last_token_at is not None:
                    self.metrics.inter_token(now - choice.last_token_at, len(event.token_ids))
                choice.last_token_at = now
                choice.tokens += len(event.token_ids)
                if self.metrics is not None:
                    self.metrics.tokens(len(event.token_ids))
            if event.finished and not choice.done:
                choice.done = True
                if choice.first_token_at is None:
                    self._queued -= 1
                    freed = True
            choice.events.put_nowait((choice, event))
        if freed:
            self._loop.create_task(self._notify_room())

    # ------------------------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        llm = self.llm
        try:
            while not self._stopping.is_set():
                self._apply_commands(block=not llm.has_unfinished())
                if self._stopping.is_set() or not llm.has_unfinished():
                    continue
                try:
                    outputs = llm.step()
                except Exception as err:  # one failing step must not take the server down
                    log.exception("engine step failed")
                    self._recover(err)
                    continue
                self._publish(outputs)
            self._fail_all("the server is shutting down")
        except BaseException as err:  # a bug in this loop: fail everything rather than hang clients
            self.fatal = err
            log.exception("engine thread died")
            self._fail_all(f"engine thread died: {type(err).__name__}: {err}")
            raise

    def _apply_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=IDLE_POLL_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, command) -> None:
        kind = command[0]
        if kind == "add":
            _, prompts, params, choices, future = command
            # False if the caller gave up (cancelled) before this command ran: then nothing is added.
            # Answering a cancelled future raises InvalidStateError, which would kill this thread.
            if not future.set_running_or_notify_cancel():
                return
            ids = []
            try:
                for prompt_ids in prompts:
                    for p in params:
                        ids.append(self.llm.add_request(prompt_ids, p))
            except Exception as err:
                for request_id in ids:  # all of a request's choices or none
                    self.llm.abort(request_id)
                future.set_exception(err)
                return
            for request_id, choice in zip(ids, choices):
                self._tracked[request_id] = _Tracked(choice)
            future.set_result(ids)
        elif kind == "abort":
            for request_id in command[1]:
                if self._tracked.pop(request_id, None) is not None:
                    self.llm.abort(request_id)
        elif kind == "snapshot":
            future = command[1]
            if not future.set_running_or_notify_cancel():  # the scrape timed out and left
                return
            try:
                future.set_result(self._snapshot())
            except Exception as err:
                future.set_exception(err)

    def _snapshot(self) -> dict:
        llm = self.llm
        stats = llm.stats()
        hit = stats.hit_rate_per_layer
        return {
            "num_waiting": llm.num_waiting, "num_running": llm.num_running,
            "free_rows": llm.free_rows, "max_num_seqs": llm.max_num_seqs,
            "free_pages": llm.free_pages, "num_pages": llm.num_pages,
            "decode_steps": stats.decode_steps, "decode_tokens": stats.decode_tokens,
            "decode_tokens_per_s": stats.decode_tokens_per_s, "prefill_tokens": stats.prefill_tokens,
            "hit_rate": sum(hit) / len(hit) if hit else 1.0,
            "bytes_host_to_device": stats.bytes_host_to_device,
            "host_store_growths": llm.store.version,
            **{f"graph_{key}": n for key, n in llm.graph_events.items()},
        }

    def _publish(self, outputs) -> None:
        batch = []
        for out in outputs:
            tracked = self._tracked.get(out.request_id)
            if tracked is None:
                continue  # aborted after this step began
            tracked.delivered += len(out.token_ids)
            event = Event(list(out.token_ids), out.logprobs)
            if out.finished:
                self._tracked.pop(out.request_id)
                result = self.llm.output(out.request_id)  # collected, so the engine forgets it
                event.finished = True
                if out.finish_reason == "error":
                    event.error = result.error or "the engine dropped this request"
                event.finish_reason = FINISH_REASONS.get(out.finish_reason, out.finish_reason)
            batch.append((tracked.choice, event))
        if batch:
            self._loop.call_soon_threadsafe(self._deliver, batch)

    def _recover(self, err: Exception) -> None:
        """After a failed step: fail only the requests it affected, keep the rest running.

        The engine finished the failing step's requests with reason 'error' (rows and pages given back);
        they are found through `output`. The step's StepOutputs are lost with the exception, so the tokens
        a request produced in it are recovered from the engine: from its RequestOutput where it finished,
        from `tokens_so_far` where it is still running (a prompt whose prefill completed in the step keeps
        its first token and goes on decoding; one still waiting or prefilling has none to lose)."""
        message = f"engine step failed: {type(err).__name__}: {err}"
        batch = []
        for request_id, tracked in list(self._tracked.items()):
            try:
                result = self.llm.output(request_id)
            except ValueError:  # not finished: still waiting, prefilling or decoding
                produced = self.llm.tokens_so_far(request_id) or []
                if len(produced) > tracked.delivered:
                    batch.append((tracked.choice, Event(produced[tracked.delivered:], finished=False)))
                    tracked.delivered = len(produced)
                continue
            except KeyError:
                result = None
            self._tracked.pop(request_id)
            if result is None or result.finish_reason == "error":
                batch.append((tracked.choice, Event([], finished=True, error=result.error if result and result.error else message)))
                continue
            missing = list(result.token_ids[tracked.delivered:])
            reason = FINISH_REASONS.get(result.finish_reason, result.finish_reason)
            batch.append((tracked.choice, Event(missing, finished=True, finish_reason=reason)))
        if batch:
            self._loop.call_soon_threadsafe(self._deliver, batch)

    def _fail_all(self, message: str) -> None:
        batch = [(t.choice, Event([], finished=True, error=message)) for t in self._tracked.values()]
        self._tracked.clear()
        if batch and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, batch)
