"""CUDA graphs for the decode step: the step is captured once over static input buffers (the runner's,
which `ModelRunner.stage_inputs` writes) updated in place before each replay; the rows' positions are read
on the device, so one graph serves rows at any lengths. The first call runs eagerly on the same buffers
(warm-up: Triton compilation, cuBLAS handles), the second captures, and every later call replays. A graph
holds the host store's addresses, so when the store grows (`HostStore.version`) it is dropped and captured
again."""

from __future__ import annotations

import torch

from nosa.engine.model_runner import ModelRunner


def new_graph_events() -> dict:
    return {"eager_warmups": 0, "captures": 0, "dropped_by_store_growth": 0}


class GraphedDecode:
    def __init__(self, runner: ModelRunner, events: dict):
        self.runner = runner
        # The engine's counts (`new_graph_events`), kept across the GraphedDecode objects it replaces when a
        # selection source changes: eager warm-up steps, captures, and the times a grown host store dropped
        # every graph. Warm-ups and captures are slow: what a server's first requests are checked for.
        self.events = events
        # The runner's static step inputs (`ModelRunner.stage_inputs` writes them): staged inputs need no copy.
        self.tokens, self.positions, self.active = runner.step_inputs[0], runner.step_inputs[1], runner.step_active
        self.graph: tuple[torch.cuda.CUDAGraph, torch.Tensor] | None = None
        self.warm = False
        self.pool = None
        self.store_version = runner.store.version
        # None, or a list that each replay appends a (start, end) CUDA event pair to: the device time of the
        # step itself, which `nosa bench decode` sets against the whole step to show the host's share.
        self.timed_replays: list | None = None

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        for static, given in ((self.tokens, tokens), (self.positions, positions), (self.active, active)):
            if given.data_ptr() != static.data_ptr():
                static.copy_(given)
        if self.runner.store.version != self.store_version:
            self.events["dropped_by_store_growth"] += bool(self.graph is not None or self.warm)
            self.graph = None
            # The dropped graphs were the pool's only users: PyTorch frees a private pool with its last
            # graph, and capturing into a freed pool's id fails an internal assert (seen on the H200 when
            # the server's host store grew). The next capture starts a new pool.
            self.pool = None
            self.warm = False
            self.store_version = self.runner.store.version
        if self.graph is not None:
            graph, logits = self.graph
            self._replay(graph)
            return logits
        if not self.warm:
            self.warm = True
            self.events["eager_warmups"] += 1
            return self.runner.decode_step(self.tokens, self.positions, self.active)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        # Capture records without executing; the replay right after performs this step.
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.runner.decode_step(self.tokens, self.positions, self.active)
        self.pool = graph.pool()
        self.graph = (graph, logits)
        self.events["captures"] += 1
        self._replay(graph)
        return logits

    def _replay(self, graph: torch.cuda.CUDAGraph) -> None:
        if self.timed_replays is None:
            graph.replay()
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        self.timed_replays.append((start, end))
