"""Continuous batching: requests wait until a device row, their host pages and room in the prefill workspace
are free, prefill (chunk by chunk, beside the decode steps of the others), decode, and give everything back
when they finish, so waiting requests are admitted while others are still decoding.

Per step the prompt tokens to prefill are planned by `plan_prefill`: the prefilling requests in admission
order, each at most `chunk` tokens, all together at most `budget` tokens. The per-request cap is what lets
short prompts that arrive behind a long one start in the next step instead of after the whole long prompt."""

from __future__ import annotations

import time
from collections import deque

from nosa import ops
from nosa.engine.host_store import HostMemoryError, HostStore
from nosa.engine.sequence import Sequence


class AdmissionRefused(Exception):
    """The first waiting request can never be admitted: the host store cannot grow to its pages and no
    running request is left whose finishing would free pages. `admitted`: the requests admitted before it
    in the same call (they run); `seq` and `error`: the refused one, still waiting, and why."""

    def __init__(self, admitted: list[Sequence], seq: Sequence, error: HostMemoryError):
        super().__init__(str(error))
        self.admitted, self.seq, self.error = admitted, seq, error


class Scheduler:
    def __init__(self, rows: int, store: HostStore, block_size: int, max_model_len: int, workspace_tokens: int):
        self.free_rows = list(range(rows - 1, -1, -1))
        # Prompt tokens whose prefill K/V the device workspace holds at once (budget.device_bytes charges
        # it): a request reserves its prompt's length at admission and gives it back at its install.
        self.workspace_tokens = workspace_tokens
        self.workspace_free = workspace_tokens
        self.prefilling: list[Sequence] = []  # admitted, prompt not fully prefilled yet (admission order)
        self.store = store
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}

    def pages_needed(self, seq: Sequence) -> int:
        # Pages are reserved for the whole request up front, so a running request never waits for memory.
        return ops.num_blocks(seq.max_cached_tokens, self.block_size)

    def check(self, seq: Sequence, label=None) -> None:
        """Raise ValueError if this request can never run under this engine's limits (messages name the
        request by `label`, its id by default)."""
        label = seq.request_id if label is None else label
        if seq.max_cached_tokens > self.max_model_len:
            raise ValueError(
                f"request {label}: prompt of {len(seq.prompt_token_ids)} tokens + max_tokens="
                f"{seq.params.max_tokens} needs {seq.max_cached_tokens} cached tokens, more than max_model_len="
                f"{self.max_model_len}; shorten the prompt, lower max_tokens or raise max_model_len"
            )
        needed = self.pages_needed(seq)
        if needed > self.store.num_pages:
            raise ValueError(
                f"request {label} needs {needed} host pages ({seq.max_cached_tokens} tokens) but the "
                f"host memory budget holds {self.store.num_pages}; raise host_memory_budget or lower max_tokens"
            )

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit_next(self) -> Sequence | None:
        """Move the first waiting request (first come, first served) to a free row if its pages and its
        prompt's prefill workspace fit now; it is then prefilling."""
        if not (self.waiting and self.free_rows and self.pages_needed(self.waiting[0]) <= self.store.free_pages
                and len(self.waiting[0].prompt_token_ids) <= self.workspace_free):
            return None
        # Pages first: if the store cannot grow to them (HostMemoryError), the request is still waiting.
        pages = self.store.allocate(self.pages_needed(self.waiting[0]))
        seq = self.waiting.popleft()
        seq.row = self.free_rows.pop()
        seq.pages = pages
        seq.admitted_at = time.perf_counter()
        self.running[seq.row] = seq
        self.workspace_free -= len(seq.prompt_token_ids)
        self.prefilling.append(seq)
        return seq

    def prefill_done(self, seq: Sequence) -> None:
        """The request's prompt is installed (or it left): its workspace is free again; it decodes now."""
        if seq in self.prefilling:
            self.prefilling.remove(seq)
            self.workspace_free += len(seq.prompt_token_ids)
        seq.prefill = None

    def plan_prefill(self, budget: int, chunk: int) -> list[tuple[Sequence, int, int]]:
        """This step's prefill work: (request, start, end) prompt ranges, in admission order, each at most
        `chunk` tokens, at most `budget` in all."""
        plan = []
        for seq in self.prefilling:
            if budget <= 0:
                break
            start = seq.prefill.done
            end = min(len(seq.prompt_token_ids), start + chunk, start + budget)
            plan.append((seq, start, end))
            budget -= end - start
        return plan

    @property
    def decoding(self) -> list[Sequence]:
        """Running requests whose prompt is installed, in admission order."""
        return [s for s in self.running.values() if s not in self.prefilling]

    def admit(self) -> list[Sequence]:
        """Admit waiting requests while rows and pages allow. When the host store cannot grow to the next
        request's pages (the machine lacks the memory), it keeps waiting, first in line, while others run:
        their pages come back to the store when they finish, and reusing them needs no growth. With nothing
        running it could wait forever: AdmissionRefused."""
        admitted = []
        while True:
            try:
                seq = self.admit_next()
            except HostMemoryError as err:
                if self.running:
                    return admitted
                raise AdmissionRefused(admitted, self.waiting[0], err) from err
            if seq is None:
                return admitted
            admitted.append(seq)

    def finish(self, seq: Sequence) -> None:
        self.prefill_done(seq)
        del self.running[seq.row]
        self.store.release(seq.pages)
        self.free_rows.append(seq.row)
        seq.pages = []

    def abort(self, seq: Sequence) -> None:
        """Drop a request wherever it is (waiting or running), giving back its row and pages."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq.row is not None and self.running.get(seq.row) is seq:
            self.finish(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
