"""Continuous batching: requests wait until a device row and their host pages are free, run, and give both
back when they finish, so waiting requests are admitted while others are still decoding."""

from __future__ import annotations

import time
from collections import deque

from nosa.engine.host_store import HostStore
from nosa.engine.sequence import Sequence


class Scheduler:
    def __init__(self, rows: int, store: HostStore, block_size: int, max_model_len: int):
        self.free_rows = list(range(rows - 1, -1, -1))
        self.store = store
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}

    def pages_needed(self, seq: Sequence) -> int:
        # Pages are reserved for the whole request up front, so a running request never waits for memory.
        return -(-seq.max_cached_tokens // self.block_size)

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
        """Move the first waiting request (first come, first served) to a free row if its pages fit now."""
        if not (self.waiting and self.free_rows and self.pages_needed(self.waiting[0]) <= self.store.free_pages):
            return None
        seq = self.waiting.popleft()
        seq.row = self.free_rows.pop()
        seq.pages = self.store.allocate(self.pages_needed(seq))
        seq.admitted_at = time.perf_counter()
        self.running[seq.row] = seq
        return seq

    def admit(self) -> list[Sequence]:
        """Admit waiting requests while rows and pages allow."""
        admitted = []
        while (seq := self.admit_next()) is not None:
            admitted.append(seq)
        return admitted

    def finish(self, seq: Sequence) -> None:
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
