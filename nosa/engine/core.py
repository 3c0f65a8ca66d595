"""The engine core and its step-level API (continuous batching, as vLLM's LLMEngine): requests are added,
`step()` admits what fits and runs one batched decode step, finished requests are collected with `output`.
`LLM` (llm.py) adds model loading and `generate` on top.
"""

from __future__ import annotations

import time

import torch

from nosa.engine.block_cache import BlockCache
from nosa.engine.budget import DEFAULT_MAX_PREFILL_TOKENS, device_bytes, plan_memory, resolve_device_cache_blocks
from nosa.engine.cuda_graph import GraphedDecode, new_graph_events
from nosa.engine.host_store import HostStore
from nosa.engine.model_runner import ModelRunner, PrefillChunk
from nosa.engine.sampling import SamplingParams, sample_rows
from nosa.engine.scheduler import AdmissionRefused, Scheduler
from nosa.engine.selection_source import RowStep, SelectionSource, check_selection
from nosa.engine.sequence import RequestOutput, Sequence, StepOutput, parse_prompt
from nosa.engine.stats import EngineStats, StepClock


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


class EngineCore:
    """The offloading engine over a loaded model (see `LLM` for the arguments)."""

    def __init__(self, model, tokenizer, device: torch.device, offload: bool, gpu_memory_budget: int | None,
                 host_memory_budget: int | None, max_model_len: int | None, max_num_seqs: int, prefill_chunk: int,
                 cuda_graphs: bool, device_cache_blocks: int | str | None = None,
                 max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS, micro_batches: int = 1):
        self.model, self.tokenizer = model, tokenizer
        config = model.config
        # Models often pad the vocabulary beyond the tokenizer's (to a multiple of 64, say): those ids are
        # no text, so sampling never picks them and logits, logprobs and tokens cover the tokenizer's ids.
        self.sample_vocab = min(config.vocab_size, len(tokenizer)) if tokenizer is not None else config.vocab_size
        self.config, self.device, self.offload = config, device, offload
        _check_int("max_num_seqs", max_num_seqs, 1)
        _check_int("prefill_chunk", prefill_chunk, 1)
        _check_int("max_prefill_tokens", max_prefill_tokens, 1)
        self.prefill_chunk, self.max_prefill_tokens = prefill_chunk, max_prefill_tokens
        max_model_len = config.max_position_embeddings if max_model_len is None else max_model_len
        if isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or not 1 <= max_model_len <= config.max_position_embeddings:
            raise ValueError(f"max_model_len must be an integer in [1, max_position_embeddings={config.max_position_embeddings}], got {max_model_len!r}")
        self.max_model_len = max_model_len
        cfg, L = config.sparse, config.num_hidden_layers
        H, D, dtype = config.num_key_value_heads, config.head_dim, model.dtype
        # "auto" becomes a size here, once: everything below (budget, cache, statistics) sees a number or None.
        device_cache_blocks = resolve_device_cache_blocks(config, dtype, offload, max_model_len, max_num_seqs,
                                                          gpu_memory_budget, device_cache_blocks, max_prefill_tokens)
        self.device_cache_blocks = device_cache_blocks
        self.memory = plan_memory(config, dtype, offload, max_model_len, max_num_seqs, gpu_memory_budget, host_memory_budget,
                                  device_cache_blocks, max_prefill_tokens)
        self.store = HostStore(L, self.memory.host_pages, H, cfg.block_size, D, dtype, device, offload)
        # Offload off: the store is on the device and attention reads it in place (one copy of the KV).
        self.cache = BlockCache(L, self.memory.rows, H, D, dtype, device, cfg, max_model_len, device_cache_blocks,
                                in_place=not offload)
        self.runner = ModelRunner(model, self.cache, self.store)
        self.runner.set_micro_batches(micro_batches)  # validated there, against the rows the budget admitted
        self.graph_events = new_graph_events()
        self.graphed = GraphedDecode(self.runner, self.graph_events) if (cuda_graphs and device.type == "cuda") else None
        self._graphs_enabled = True
        self.scheduler = Scheduler(self.memory.rows, self.store, cfg.block_size, max_model_len, self.memory.workspace_tokens)
        self._requests: dict[int, Sequence] = {}  # unfinished (waiting or running), by request id
        self._finished: dict[int, Sequence] = {}  # finished, until `output` collects them
        self._next_id = 0
        self.clock = StepClock()
        self.selection_source: SelectionSource | None = None
        self._staged_rows = None  # (rows, bases) last written to the runner, for a device-side source

    @staticmethod
    def device_bytes(config, dtype: torch.dtype, offload: bool, max_model_len: int,
                     device_cache_blocks: int | None = None,
                     max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS) -> tuple[int, int]:
        """(bytes per row, fixed workspace bytes) that `gpu_memory_budget` is charged (`budget.device_bytes`)."""
        return device_bytes(config, dtype, offload, max_model_len, device_cache_blocks, max_prefill_tokens)

    @property
    def max_num_seqs(self) -> int:
        return self.cache.rows

    # ----------------------------------------------------------------------------------- accounting
    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        """Requests holding a row: prefilling or decoding."""
        return len(self.scheduler.running)

    @property
    def num_prefilling(self) -> int:
        """Running requests whose prompt is not fully prefilled yet."""
        return len(self.scheduler.prefilling)

    @property
    def free_rows(self) -> int:
        """Device rows not held by a running request (max_num_seqs when idle)."""
        return len(self.scheduler.free_rows)

    @property
    def free_pages(self) -> int:
        """Host-store pages not reserved by a running request (num_pages when idle)."""
        return self.store.free_pages

    @property
    def num_pages(self) -> int:
        return self.store.num_pages

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # ----------------------------------------------------------------------------------- requests
    def _eos_ids(self) -> set[int]:
        ids = {self.config.eos_token_id} if isinstance(self.config.eos_token_id, int) else set(self.config.eos_token_id or [])
        if self.tokenizer is not None and getattr(self.tokenizer, "eos_token_id", None) is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def _make_sequence(self, label, request_id: int, prompt, params: SamplingParams, keep_logits: bool,
                       record_selections: bool) -> Sequence:
        """Validate one request (messages name it by `label`) and build its Sequence."""
        text, token_ids = parse_prompt(label, prompt, self.tokenizer, self.config.vocab_size)
        if not isinstance(params, SamplingParams):
            raise ValueError(f"request {label}: sampling params must be a SamplingParams, got {type(params).__name__}")
        shape = None
        if record_selections and self.config.sparse.is_sparse:
            shape = (self.config.num_hidden_layers, self.config.num_key_value_heads, self.cache.slots)
        seq = Sequence(request_id, text, token_ids, params, self.device, keep_logits, shape)
        self.scheduler.check(seq, label)
        return seq

    def _new_request_id(self, request_id: int | None) -> int:
        if request_id is None:
            while self._next_id in self._requests or self._next_id in self._finished:
                self._next_id += 1
            request_id = self._next_id
            self._next_id += 1
            return request_id
        if isinstance(request_id, bool) or not isinstance(request_id, int):
            raise ValueError(f"request_id must be an integer or None, got {request_id!r}")
        if request_id in self._requests or request_id in self._finished:
            raise ValueError(f"request_id {request_id} is already in use in this engine")
        return request_id

    def add_request(self, prompt, params: SamplingParams | None = None, request_id: int | None = None, *,
                    return_logits: bool = False, record_selections: bool = False) -> int:
        """Queue one request (prompt: str with a tokenizer, or a list of token ids) and return its id.
        Raises ValueError naming the reason if it is malformed or can never fit this engine's limits.
        `step()` runs it; `output(id)` returns it once finished."""
        request_id = self._new_request_id(request_id)
        seq = self._make_sequence(request_id, request_id, prompt, params if params is not None else SamplingParams(),
                                  return_logits, record_selections)
        self._queue(seq)
        return request_id

    def add_prefilled_request(self, prompt_token_ids: list[int], params: SamplingParams, keys: torch.Tensor,
                              values: torch.Tensor, evictions: torch.Tensor | None, last_selection,
                              first_token: int) -> int:
        """Admit a request now with its prompt's cache already computed, skipping the prefill's compute
        (benchmarks install a synthetic prompt cache this way): keys, values [L, 1, T, H, D] with T =
        len(prompt_token_ids), evictions [L, 1, T, H] float32 (dma, nosa; else None), last_selection[l]
        the last prompt token's selection [H, K] (sparse modes; else None), first_token the token its
        prefill would have produced. It goes through the engine's own install path (host pages, row state,
        the selected blocks loaded). Raises ValueError if it is invalid or no row and pages are free now."""
        request_id = self._new_request_id(None)
        seq = self._make_sequence(request_id, request_id, prompt_token_ids, params, False, False)
        cfg = self.config
        want = (cfg.num_hidden_layers, 1, len(seq.prompt_token_ids), cfg.num_key_value_heads, cfg.head_dim)
        if tuple(keys.shape) != want or tuple(values.shape) != want:
            raise ValueError(f"keys and values must be {want} [layers, 1, prompt tokens, kv heads, head_dim], got "
                             f"{tuple(keys.shape)} and {tuple(values.shape)}")
        if params.logprobs is not None:
            raise ValueError("a prefilled request has no prefill logits to report logprobs of its first token from")
        if self.scheduler.waiting:
            raise ValueError("requests are waiting: a prefilled request would jump the queue")
        self.scheduler.add(seq)
        if self.scheduler.admit_next() is not seq:
            self.scheduler.abort(seq)
            raise ValueError("no free row, host pages or prefill workspace for a prefilled request now")
        self.scheduler.prefill_done(seq)  # nothing to prefill: it needs no workspace
        self._requests[request_id] = seq
        try:
            self.runner.install(seq.row, seq.pages, keys, values, evictions, last_selection)
        except BaseException as err:
            self._fail([seq], err)
            raise
        seq.append(first_token, None, self._eos_ids(), self.tokenizer)
        self._retire_if_done(seq)
        return request_id

    @property
    def uses_cuda_graphs(self) -> bool:
        """Whether decode steps replay captured CUDA graphs (CUDA device, cuda_graphs=True, not disabled
        with `use_cuda_graphs(False)`, and no tracing asked)."""
        return self.graphed is not None and self._graphs_enabled

    def use_cuda_graphs(self, enabled: bool) -> None:
        """Switch graph replay off (eager steps, e.g. to profile kernels) or back on; graphs already
        captured are kept."""
        self._graphs_enabled = bool(enabled)

    def set_selection_source(self, source: SelectionSource | None) -> None:
        """Let `source` choose the blocks of every decode step instead of the model's scores (None: back to
        the scores) from the next decode step on; see `nosa.engine.selection_source`. Sparse modes only.
        It changes what a captured decode graph reads, so captured graphs are dropped."""
        if source is not None and not isinstance(source, SelectionSource):
            raise ValueError(f"a selection source must be a SelectionSource, got {type(source).__name__}")
        if source is not None and not self.config.sparse.is_sparse:
            raise ValueError("attn_mode='dense' attends to every block: there is no selection to replace")
        self.selection_source = source
        self.runner.use_selection_source(source is not None, source is not None and source.on_device)
        self._staged_rows = None
        if self.graphed is not None:
            self.graphed = GraphedDecode(self.runner, self.graph_events)

    def _fill_selection_source(self, running: list[Sequence], cached: list[int]) -> None:
        """Ask the selection source for this step's blocks (cached[i]: running[i]'s position) and stage them
        in the runner's static buffers."""
        if self.selection_source.on_device:
            self._stage_device_source(running, cached)
            return
        runner, cfg = self.runner, self.config
        steps = [RowStep(s.row, s.request_id, position) for s, position in zip(running, cached)]
        blocks = self.selection_source.selections(steps)
        replace = [False] * self.cache.rows
        if blocks is not None:
            want = (cfg.num_hidden_layers, len(running), cfg.num_key_value_heads, cfg.sparse.topk_blocks)
            if tuple(blocks.shape) != want:
                raise ValueError(f"the selection source returned shape {tuple(blocks.shape)}, expected {want} "
                                 f"[layers, running rows, kv heads, topk_blocks]")
            if not self.selection_source.prechecked:
                check_selection(blocks.cpu(), torch.tensor([s.position for s in steps]),
                                cfg.sparse.block_size, cfg.sparse.topk_blocks, "the selection source's blocks")
            rows = torch.tensor([s.row for s in running], device=self.device)
            runner.source_selection[:, rows] = blocks.to(self.device, torch.int32)
            for s in running:
                replace[s.row] = True
        runner.replace_selection.copy_(torch.tensor(replace))

    def _stage_device_source(self, running: list[Sequence], cached: list[int]) -> None:
        """A device-side source: the step picks each row's selection from the source's table by its position
        (`DecodeAttention.begin`); the host only checks the positions and writes the rows' offsets into the
        table when the running rows change (no copy, no sync while they stay)."""
        source, runner = self.selection_source, self.runner
        bases = source.row_bases([s.request_id for s in running], cached)
        if bases is not None:
            table = source.table(self.device)
            if table is not runner.source_table:
                runner.source_table = table
                if self.graphed is not None:  # captured graphs read the old table's address (or none)
                    self.graphed = GraphedDecode(runner, self.graph_events)
        rows = tuple(s.row for s in running)
        staged = (rows, tuple(bases) if bases is not None else None)
        if staged == self._staged_rows:
            return
        base, replace = [0] * self.cache.rows, [False] * self.cache.rows
        if bases is not None:
            for row, b in zip(rows, bases):
                base[row], replace[row] = b, True
        runner.source_base.copy_(torch.tensor(base, dtype=torch.long))
        runner.replace_selection.copy_(torch.tensor(replace))
        self._staged_rows = staged

    def decode_counters(self) -> dict[str, torch.Tensor]:
        """Blocks loaded host->device, blocks selected, and blocks served from the device cache beyond the
        selection ('spill_hits', copied on the device instead of loaded) at decode since the engine was built,
        per layer ([L] int64 CPU tensors, active rows; one device sync). Differences of two readings count
        the steps in between."""
        runner = self.runner
        return {"loaded": runner.loaded.cpu(), "selected": runner.selected.cpu(), "spill_hits": runner.spill_hits.cpu()}

    def _queue(self, seq: Sequence) -> None:
        self.scheduler.add(seq)
        self._requests[seq.request_id] = seq

    def abort(self, request_id: int) -> bool:
        """Drop a waiting or running request now, giving back its row and pages; it is then forgotten.
        False if the id is unknown or the request already finished."""
        seq = self._requests.pop(request_id, None)
        if seq is None:
            return False
        self._release(seq)
        return True

    def _release(self, seq: Sequence) -> None:
        """Give back whatever the request holds (a running one: its row and pages; a waiting one: its place)."""
        if seq.row is not None and self.scheduler.running.get(seq.row) is seq:
            self.cache.release_row(seq.row)
        self.scheduler.abort(seq)

    def tokens_so_far(self, request_id: int) -> list[int] | None:
        """Tokens an unfinished request has generated so far ([] while it waits or prefills), or None when the
        engine holds no such unfinished request. A server uses it to recover what a failed step produced."""
        seq = self._requests.get(request_id)
        return None if seq is None else list(seq.output_token_ids)

    def output(self, request_id: int) -> RequestOutput:
        """The result of a finished request; the engine forgets it afterwards."""
        if request_id in self._requests:
            raise ValueError(f"request {request_id} is not finished yet")
        seq = self._finished.pop(request_id, None)
        if seq is None:
            raise KeyError(f"no finished request with id {request_id} (unknown, aborted, or already collected)")
        return seq.output()

    # ----------------------------------------------------------------------------------- stepping
    def step(self) -> list[StepOutput]:
        """One scheduler iteration: admit the waiting requests that fit now, run one packed prefill forward
        of at most `max_prefill_tokens` prompt tokens (at most `prefill_chunk` of each prefilling request,
        first come first served; a request whose prompt completes is installed and yields its first token),
        then one batched decode step for the requests whose prompt is installed. So a long prompt is
        prefilled over several steps and never stalls decoding for more than one budget of prompt tokens.
        Returns one StepOutput per request that produced a token or failed.

        A prefill that fails finishes only its own request (reason 'error', row and pages given back, the
        error in its RequestOutput; the others of the packed forward are retried one by one) and the step
        goes on. A failing decode step drops all its rows (finished with reason 'error') and re-raises; the
        engine stays usable."""
        eos = self._eos_ids()
        outputs: list[StepOutput] = []
        try:
            admitted = self.scheduler.admit()
        except AdmissionRefused as refused:  # only the request the host store can never hold fails
            admitted = refused.admitted
            self._fail_one(refused.seq, refused.error, outputs)
        for seq in admitted:
            try:
                seq.prefill = self.runner.begin_prefill(seq.prompt_token_ids)
            except Exception as err:  # its workspace could not be allocated: only this request fails
                self._fail_one(seq, err, outputs)
        plan = self.scheduler.plan_prefill(self.max_prefill_tokens, self.prefill_chunk)
        if plan:
            self._prefill(plan, eos, outputs)
        running = self.scheduler.decoding
        if not running:
            return outputs
        try:
            start = time.perf_counter()
            record = self._recording(running)
            logits = self._decode(running, self.cache.rows, record)[:, : self.sample_vocab]
            rows = [s.row for s in running]
            # Rows 0..n-1 in order (the usual case) are a view; others one gather (an index copy, no sync).
            picked = logits[: len(rows)] if rows == list(range(len(rows))) else \
                logits[torch.tensor(rows).to(self.device, non_blocking=True)]
            tokens = sample_rows(picked, [s.params for s in running], [s.generator for s in running])
            elapsed = time.perf_counter() - start
        except BaseException as err:
            # A step that failed part-way has left some layers' state updated: none of these rows can go on.
            self._fail(running, err)
            raise
        self.clock.decoded(len(running), elapsed)
        selections = self.runner.step_selections.to("cpu", torch.int16) if record else None
        for seq, token in zip(running, tokens):
            if isinstance(token, Exception):  # this row's sampling failed: it alone finishes with 'error'
                self._fail_one(seq, token, outputs)
                continue
            if selections is not None and seq.selections is not None:
                seq.selections.append(selections[:, seq.row].clone())
            self._append(seq, token, logits[seq.row] if seq.wants_logits else None, eos, outputs)
        return outputs

    def _prefill(self, plan: list[tuple[Sequence, int, int]], eos: set[int], outputs: list[StepOutput]) -> None:
        """Run this step's prefill chunks in one packed forward; where it raises, run each chunk alone, so
        the request whose own prefill fails is the only one that fails. Completed prompts are installed
        and sampled."""
        start = time.perf_counter()
        chunks = [PrefillChunk(seq.prefill, begin, end) for seq, begin, end in plan]
        try:
            results = list(zip(plan, self.runner.prefill(chunks)))
        except Exception as err:
            if len(plan) == 1:
                self._fail_one(plan[0][0], err, outputs)
                return
            results = []
            for item, chunk in zip(plan, chunks):
                try:
                    results.append((item, self.runner.prefill([chunk])[0]))
                except Exception as own:
                    self._fail_one(item[0], own, outputs)
        except BaseException as err:  # interrupted: these prompts are half-written
            self._fail([seq for seq, _, _ in plan], err)
            raise
        done = []
        for (seq, _, end), logits in results:
            seq.prefill.done = end
            if logits is None:
                continue
            try:
                self.runner.finish_prefill(seq.row, seq.pages, seq.prefill)
            except Exception as err:
                self._fail_one(seq, err, outputs)
                continue
            self.scheduler.prefill_done(seq)
            done.append((seq, logits[: self.sample_vocab]))
        tokens = []
        if done:
            tokens = sample_rows(torch.stack([logits for _, logits in done]), [s.params for s, _ in done],
                                 [s.generator for s, _ in done])
        self.clock.prefilled(sum(end - begin for (_, begin, end), _ in results), time.perf_counter() - start)
        for (seq, logits), token in zip(done, tokens):
            if isinstance(token, Exception):  # installed but without a first token: it cannot decode
                self._fail_one(seq, token, outputs)
                continue
            self._append(seq, token, logits, eos, outputs)

    def _fail_one(self, seq: Sequence, err: Exception, outputs: list[StepOutput]) -> None:
        """Finish one request with reason 'error' and say so in this step's outputs; the others go on."""
        self._fail([seq], err)
        outputs.append(StepOutput(seq.request_id, [], True, "error"))

    def _append(self, seq: Sequence, token: int, logits: torch.Tensor, eos: set[int], outputs: list[StepOutput]) -> None:
        """Record a sampled token; a request whose bookkeeping fails (its text cannot be decoded, say) is
        finished with reason 'error' alone, and the others of the step go on."""
        try:
            out = seq.append(token, logits, eos, self.tokenizer)
        except Exception as err:
            self._fail_one(seq, err, outputs)
            return
        outputs.append(out)
        self._retire_if_done(seq)

    def _recording(self, sequences: list[Sequence]) -> bool:
        return any(s.selections is not None for s in sequences)

    def _fail(self, sequences: list[Sequence], err: BaseException) -> None:
        for seq in sequences:
            if self._requests.get(seq.request_id) is seq:
                self._release(seq)
                seq.fail(f"{type(err).__name__}: {err}")
                del self._requests[seq.request_id]
                self._finished[seq.request_id] = seq

    def _decode(self, running: list[Sequence], rows: int, record: bool) -> torch.Tensor:
        # Built as Python lists and staged in one go (`stage_inputs`, no sync): per-element tensor writes
        # cost microseconds each, which at 64 rows added up to a visible share of a ~ms decode step.
        tokens, positions, active = [0] * rows, [0] * rows, [False] * rows
        cached = [seq.cached_tokens for seq in running]
        for seq, position in zip(running, cached):
            tokens[seq.row] = seq.output_token_ids[-1]
            positions[seq.row] = position
            active[seq.row] = True
        tokens, positions, active = self.runner.stage_inputs(tokens, positions, active)
        self.runner.record_selections = record
        if self.selection_source is not None:
            self._fill_selection_source(running, cached)
        if self.graphed is not None and self._graphs_enabled and self.runner.load_log is None and not record:
            return self.graphed(tokens, positions, active)
        return self.runner.decode_step(tokens, positions, active)

    def _retire_if_done(self, seq: Sequence) -> None:
        if seq.finish_reason is not None:
            self.cache.release_row(seq.row)
            self.scheduler.finish(seq)
            del self._requests[seq.request_id]
            self._finished[seq.request_id] = seq

    def stats(self) -> EngineStats:
        return self.clock.stats(self.runner, self.config, self.model.dtype)
