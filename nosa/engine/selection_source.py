"""Selection sources: where a decode step's block selection comes from when it is not the model's scores.

The engine normally selects with `ops.select_rows` (spec sec. 4). A `SelectionSource` set with
`LLM.set_selection_source` replaces that choice at every decode step for the rows it names: the model's
scores are still computed (so a step costs what it costs), then the source's blocks take their place, and
everything after the selection (slot-table diff, host->device loads, gather, attention, statistics) runs
exactly as in normal decoding. The trace-driven benchmark replays recorded selections of trained models
this way (`ReplaySelections`); prefill, and the selection a prefill install loads, stay the model's own.

A source may instead keep its selections on the device (`on_device`, as `ReplaySelections` does by default):
it gives the engine one table of selections `[N, L, H_kv, topk_blocks]` and, per step, for each running row
the offset `base` such that the row's selection at position p is `table[base + p]`. The engine stages the
offsets in a static buffer only when the rows change, and the decode step (inside its CUDA graph) picks the
rows' selections from the table by their positions: no host copy of the selections and no sync per step.

A selection the engine is given must be one the engine could have computed (`check_selection`): per
(layer, row, KV head) `topk_blocks` entries, block ids in [0, own block] or -1, each at most once, the
query's own block included (the engine appends the token to it, spec sec. 6).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowStep:
    """One running row at a decode step: its device row, its request id and the query's position."""

    row: int
    request_id: int
    position: int


class SelectionSource(ABC):
    """Decides the blocks selected at decode for the rows it is asked about. The engine checks every
    selection it is given (`check_selection`, on the host, before the step) unless the source sets
    `prechecked` because it checked everything it can return up front (`ReplaySelections` does)."""

    prechecked = False
    on_device = False  # True: the engine uses `table` and `row_bases` instead of `selections`

    @abstractmethod
    def selections(self, rows: list[RowStep]) -> torch.Tensor | None:
        """The selection of every layer for `rows`: int `[L, len(rows), H_kv, topk_blocks]` (-1 unused), or
        None to leave this step to the model's scores. Called once per decode step, before it runs."""

    def table(self, device: torch.device) -> torch.Tensor:
        """(`on_device` sources) every selection the source can give, int32 `[N, L, H_kv, topk_blocks]` on
        `device`; the same tensor while the source is unchanged (a captured decode graph reads its address)."""
        raise NotImplementedError

    def row_bases(self, request_ids: list[int], positions: list[int]) -> list[int] | None:
        """(`on_device` sources) per running request, `base` such that its selection at the query position
        positions[i] is `table(...)[base + positions[i]]`; None to leave this step to the model's scores.
        Raises ValueError where the source has no selection for that position."""
        raise NotImplementedError


def check_selection(selection: torch.Tensor, positions: torch.Tensor, block_size: int, topk_blocks: int,
                    what: str = "selection") -> None:
    """Raise ValueError unless `selection` (int `[..., N, H, topk_blocks]`, query n at positions[n]) is a
    valid engine selection: ids in [-1, own block], no block twice, the own block of each query present."""
    if selection.shape[-1] != topk_blocks or selection.dim() < 3 or selection.shape[-3] != positions.numel():
        raise ValueError(f"{what}: expected [..., {positions.numel()} queries, kv heads, topk_blocks={topk_blocks}], "
                         f"got shape {tuple(selection.shape)}")
    sel = selection.long()
    own = torch.div(positions.long(), block_size, rounding_mode="floor").view(-1, 1, 1)  # [N, 1, 1]
    bad = (sel < -1) | (sel > own)
    if bool(bad.any()):
        n = int(bad.nonzero()[0][-3])
        raise ValueError(f"{what}: block id {int(sel[bad][0])} at query position {int(positions[n])} is outside "
                         f"[0, own block {int(own[n, 0, 0])}] (ids are blocks of {block_size} tokens, -1 unused)")
    ordered = torch.sort(sel, dim=-1).values
    twice = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
    if bool(twice.any()):
        raise ValueError(f"{what}: a block is selected twice by one (query, kv head); each block at most once")
    missing = ~(sel == own).any(-1)
    if bool(missing.any()):
        n = int(missing.nonzero()[0][-2])
        raise ValueError(f"{what}: the query at position {int(positions[n])} does not select its own block "
                         f"{int(own[n, 0, 0])}; the engine appends the token there, so it must be selected")


class ReplaySelections(SelectionSource):
    """Replays per-request selection traces: request r at position first_position + s selects
    trace[:, s]. Requests without a trace are left to the model's scores. on_device (default): the traces
    are copied to the device once (`table`) and each step picks its selections there; False: each step
    stacks them on the host (`selections`) and the engine copies them over, as for any other source."""

    prechecked = True

    def __init__(self, block_size: int, topk_blocks: int, on_device: bool = True):
        self.block_size, self.topk_blocks = block_size, topk_blocks
        self.on_device = bool(on_device)
        self._traces: dict[int, tuple[torch.Tensor, int]] = {}
        self._table: torch.Tensor | None = None  # the device table, dropped when a trace is added
        self._table_device: torch.device | None = None
        self._offsets: dict[int, int] = {}  # request id -> its trace's first row in the table
        self._bases = None  # the last row_bases answer: (request ids, bases, latest first, earliest last position)

    def add(self, request_id: int, trace: torch.Tensor, first_position: int) -> None:
        """trace: int `[L, S, H, topk_blocks]`, step s the query at position first_position + s; checked
        whole here (`check_selection`), so a replayed step is never invalid."""
        trace = torch.as_tensor(trace)
        if trace.dim() != 4:
            raise ValueError(f"request {request_id}: a trace is [layers, steps, kv heads, topk], got shape {tuple(trace.shape)}")
        positions = torch.arange(first_position, first_position + trace.shape[1])
        check_selection(trace, positions, self.block_size, self.topk_blocks, f"trace of request {request_id}")
        self._traces[request_id] = (trace.to(torch.int32), first_position)
        self._table = self._bases = None
        offset = 0
        for rid, (t, _) in self._traces.items():  # the table's rows, in the order `table` stacks them
            self._offsets[rid] = offset
            offset += t.shape[1]

    def steps(self, request_id: int) -> int:
        return self._traces[request_id][0].shape[1]

    def _step_of(self, request_id: int, position: int) -> int:
        """The trace step of `request_id` at `position`; ValueError outside its trace."""
        trace, first = self._traces[request_id]
        s = position - first
        if not 0 <= s < trace.shape[1]:
            raise ValueError(f"request {request_id} is at position {position}, outside its trace "
                             f"(positions {first} .. {first + trace.shape[1] - 1}); record or map a longer trace")
        return s

    def _known(self, request_ids) -> bool:
        """Whether the requests replay (all have a trace) or not (none has); ValueError when mixed."""
        known = [rid in self._traces for rid in request_ids]
        if not any(known):
            return False
        if not all(known):
            raise ValueError("some running requests have a trace to replay and some do not; replay all or none")
        return True

    def selections(self, rows: list[RowStep]) -> torch.Tensor | None:
        if not self._known([step.request_id for step in rows]):
            return None
        picked = [self._traces[step.request_id][0][:, self._step_of(step.request_id, step.position)] for step in rows]
        return torch.stack(picked, dim=1)

    def table(self, device: torch.device) -> torch.Tensor:
        if not self._traces:
            raise ValueError("a ReplaySelections source holds no trace yet: add one before decoding")
        device = torch.device(device)
        if self._table is None or self._table_device != device:
            # [S, L, H, K] per trace: step-major, so a step's selection of every layer is one table row.
            self._table = torch.cat([trace.transpose(0, 1) for trace, _ in self._traces.values()]).to(device).contiguous()
            self._table_device = device
        return self._table

    def row_bases(self, request_ids: list[int], positions: list[int]) -> list[int] | None:
        key = tuple(request_ids)
        if self._bases is not None and self._bases[0] == key and positions:
            # The same requests as last time (every step while the batch stays): their offsets stand, and
            # positions inside [the latest first position, the earliest last one] are inside every trace.
            _, bases, latest_first, earliest_last = self._bases
            if latest_first <= min(positions) and max(positions) <= earliest_last:
                return bases
        if not self._known(request_ids):
            return None
        bases = []
        for request_id, position in zip(request_ids, positions):
            first = self._traces[request_id][1]
            self._step_of(request_id, position)
            bases.append(self._offsets[request_id] - first)
        if request_ids:
            spans = [(self._traces[r][1], self._traces[r][1] + self._traces[r][0].shape[1] - 1) for r in request_ids]
            self._bases = (key, bases, max(a for a, _ in spans), min(b for _, b in spans))
        return bases
