"""The user API: `LLM(model_or_path, ...)` and `llm.generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

import torch

from nosa.engine.block_cache import BlockCache
from nosa.engine.cuda_graph import GraphedDecode
from nosa.engine.host_store import HostStore
from nosa.engine.model_runner import ModelRunner
from nosa.engine.sampling import SamplingParams, sample
from nosa.engine.scheduler import Scheduler
from nosa.engine.sequence import RequestOutput, Sequence, StepOutput


@dataclass
class EngineStats:
    """Since the engine was built. hit_rate_per_layer: share of selected blocks that needed no host->device
    load at decode (1 - loads / selected; a tail block that starts at the step has nothing to load and so
    counts as a hit);
    blocks_loaded_per_step: host->device block loads (per KV head) per decode step, all layers and rows;
    bytes_host_to_device: KV bytes gathered at decode and prefill install."""

    decode_steps: int
    decode_tokens: int
    decode_s: float
    prefill_tokens: int
    prefill_s: float
    hit_rate_per_layer: list[float]
    blocks_loaded_per_step: float
    bytes_host_to_device: int

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


def _load_model(model_or_path, device, dtype):
    from nosa.models import NosaForCausalLM

    tokenizer = None
    if isinstance(model_or_path, (str, os.PathLike)):
        if not os.path.isdir(model_or_path):
            raise ValueError(f"model path {model_or_path!r} is not a directory saved with save_pretrained")
        model = NosaForCausalLM.from_pretrained(model_or_path, dtype=dtype or torch.float32)
        from nosa.tokenizer import TOKENIZER_FILE, ByteTokenizer

        if os.path.exists(os.path.join(model_or_path, TOKENIZER_FILE)):
            tokenizer = ByteTokenizer.from_pretrained(model_or_path)
    elif isinstance(model_or_path, NosaForCausalLM):
        model = model_or_path
    else:
        raise ValueError(f"LLM takes a NosaForCausalLM or a directory path, got {type(model_or_path).__name__}")
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval(), tokenizer


class LLM:
    """An offloading NOSA engine.

    model_or_path: a NosaForCausalLM or a save_pretrained directory (a ByteTokenizer beside it enables text
    prompts). offload: keep the KV store in host memory (pinned on CUDA) and only the selected blocks on the
    device; False keeps everything on the device (the on-GPU baseline, same code). gpu_memory_budget: bytes
    of device memory for KV state (rows, tables, selection state, prefill workspace, and the store when
    offload is off); None: room for max_num_seqs rows. host_memory_budget: bytes of host KV store; None:
    room for every row at max_model_len. max_model_len: the longest prompt + generation. cuda_graphs:
    capture the decode step (CUDA only); False runs it eagerly.
    """

    def __init__(self, model_or_path, device=None, offload: bool = True, gpu_memory_budget: int | None = None,
                 host_memory_budget: int | None = None, max_model_len: int | None = None, max_num_seqs: int = 16,
                 prefill_chunk: int = 512, dtype: torch.dtype | None = None, tokenizer=None,
                 cuda_graphs: bool = True):
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, loaded_tokenizer = _load_model(model_or_path, device, dtype)
        self.tokenizer = tokenizer or loaded_tokenizer
        config = self.model.config
        self.config, self.device, self.offload = config, device, offload
        for name, value, low in (("max_num_seqs", max_num_seqs, 1), ("prefill_chunk", prefill_chunk, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        max_model_len = config.max_position_embeddings if max_model_len is None else max_model_len
        if isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or not 1 <= max_model_len <= config.max_position_embeddings:
            raise ValueError(f"max_model_len must be an integer in [1, max_position_embeddings={config.max_position_embeddings}], got {max_model_len!r}")
        self.max_model_len = max_model_len
        cfg, L = config.sparse, config.num_hidden_layers
        H, D, dtype = config.num_key_value_heads, config.head_dim, self.model.dtype
        page_bytes = HostStore.page_bytes(L, H, cfg.block_size, D, dtype)
        max_blocks = -(-max_model_len // cfg.block_size)
        row_bytes, workspace = self.device_bytes(config, dtype, offload, max_model_len)
        rows = max_num_seqs
        if gpu_memory_budget is not None:
            if isinstance(gpu_memory_budget, bool) or not isinstance(gpu_memory_budget, int) or gpu_memory_budget <= 0:
                raise ValueError(f"gpu_memory_budget must be a positive number of bytes, got {gpu_memory_budget!r}")
            rows = min(rows, (gpu_memory_budget - workspace) // row_bytes)
            if rows < 1:
                raise ValueError(
                    f"gpu_memory_budget={gpu_memory_budget} bytes is too small: one sequence of max_model_len="
                    f"{max_model_len} tokens needs {row_bytes} bytes of device state plus {workspace} bytes of "
                    f"prefill workspace ({row_bytes + workspace} in all); raise the budget or lower max_model_len"
                )
        if offload:
            pages = rows * max_blocks
            if host_memory_budget is not None:
                if isinstance(host_memory_budget, bool) or not isinstance(host_memory_budget, int) or host_memory_budget <= 0:
                    raise ValueError(f"host_memory_budget must be a positive number of bytes, got {host_memory_budget!r}")
                pages = host_memory_budget // page_bytes
                if pages < 1:
                    raise ValueError(
                        f"host_memory_budget={host_memory_budget} bytes is too small: one block of {cfg.block_size} "
                        f"tokens needs {page_bytes} bytes (K and V of {L} layers)"
                    )
        else:
            pages = rows * max_blocks
        self.store = HostStore(L, pages, H, cfg.block_size, D, dtype, device, offload)
        self.cache = BlockCache(L, rows, H, D, dtype, device, cfg, max_model_len)
        self.runner = ModelRunner(self.model, self.cache, self.store, prefill_chunk)
        self.graphed = GraphedDecode(self.runner) if (cuda_graphs and device.type == "cuda") else None
        self._graphs_enabled = True
        self.scheduler = Scheduler(rows, self.store, cfg.block_size, max_model_len)
        self._requests: dict[int, Sequence] = {}  # unfinished (waiting or running), by request id
        self._finished: dict[int, Sequence] = {}  # finished, until `output` collects them
        self._next_id = 0
        self.last_step_tokens_per_s = 0.0
        self._steps = self._decode_tokens = self._prefill_tokens = 0
        self._decode_s = self._prefill_s = 0.0

    @staticmethod
    def device_bytes(config, dtype: torch.dtype, offload: bool, max_model_len: int) -> tuple[int, int]:
        """(bytes per row, fixed workspace bytes) that `gpu_memory_budget` is charged: the engine admits
        min(max_num_seqs, (budget - workspace) // row) rows. Benchmarks that give several configurations the
        same budget read it from here, so they use the engine's own accounting."""
        cfg, L = config.sparse, config.num_hidden_layers
        H, D = config.num_key_value_heads, config.head_dim
        elem = torch.empty((), dtype=dtype).element_size()
        row_bytes = BlockCache.row_bytes(L, H, D, dtype, cfg, max_model_len)["total"]
        if not offload:
            # The store lives on the device: a full sequence per row.
            row_bytes += -(-max_model_len // cfg.block_size) * HostStore.page_bytes(L, H, cfg.block_size, D, dtype)
        # Prefill keeps one prompt's K/V (and eviction scores) of every layer on the device at a time.
        workspace = L * max_model_len * H * (2 * D * elem + 4)
        return row_bytes, workspace

    @property
    def max_num_seqs(self) -> int:
        return self.cache.rows

    # ----------------------------------------------------------------------------------- accounting
    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

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
        text = None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"request {label}: text prompts need a tokenizer (pass tokenizer= or token ids)")
            text, prompt = prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValueError(f"request {label}: a prompt must be a str or a list of token ids, got {type(prompt).__name__}")
        if len(prompt) == 0:
            raise ValueError(f"request {label}: the prompt is empty; give at least one token")
        bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"request {label}: token ids {bad[:5]} lie outside [0, vocab_size={self.config.vocab_size})")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"request {label}: sampling params must be a SamplingParams, got {type(params).__name__}")
        shape = None
        if record_selections and self.config.sparse.is_sparse:
            shape = (self.config.num_hidden_layers, self.config.num_key_value_heads, self.cache.slots)
        seq = Sequence(request_id, text, list(prompt), params, self.device, keep_logits, shape)
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
            raise ValueError("no free row or host pages for a prefilled request now")
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

    def decode_counters(self) -> dict[str, torch.Tensor]:
        """Blocks loaded host->device and blocks selected at decode since the engine was built, per layer
        ([L] int64 CPU tensors, active rows; one device sync). Differences of two readings count the steps
        in between."""
        return {"loaded": self.runner.loaded.cpu(), "selected": self.runner.selected.cpu()}

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
        """One scheduler iteration: admit the waiting requests that fit now and prefill them (each yields its
        first token), then one batched decode step for the running ones. Returns one StepOutput per request
        that produced a token. On an exception, the requests of the failing prefill or decode step are
        dropped (finished with reason 'error', their rows and pages given back) and the exception re-raised;
        the engine stays usable."""
        eos = self._eos_ids()
        outputs: list[StepOutput] = []
        # Admitted one at a time, so a failing prefill leaves the requests behind it waiting, untouched.
        while (seq := self.scheduler.admit_next()) is not None:
            try:
                start = time.perf_counter()
                logits = self.runner.prefill(seq.row, seq.prompt_token_ids, seq.pages)
                token = sample(logits[None], [seq.params], [seq.generator])[0]
                self._prefill_s += time.perf_counter() - start
                self._prefill_tokens += len(seq.prompt_token_ids)
            except BaseException as err:
                self._fail([seq], err)
                raise
            outputs.append(seq.append(token, logits, eos, self.tokenizer))
            self._retire_if_done(seq)
        running = list(self.scheduler.running.values())
        if not running:
            return outputs
        try:
            start = time.perf_counter()
            logits = self._decode(running, self.cache.rows)
            tokens = sample(logits[[s.row for s in running]], [s.params for s in running], [s.generator for s in running])
            elapsed = time.perf_counter() - start
        except BaseException as err:
            # A step that failed part-way has left some layers' state updated: none of these rows can go on.
            self._fail(running, err)
            raise
        self._decode_s += elapsed
        self._steps += 1
        self._decode_tokens += len(running)
        self.last_step_tokens_per_s = len(running) / elapsed if elapsed > 0 else 0.0
        selections = self.runner.step_selections.to("cpu", torch.int16) if self._recording(running) else None
        for seq, token in zip(running, tokens):
            if selections is not None and seq.selections is not None:
                seq.selections.append(selections[:, seq.row].clone())
            outputs.append(seq.append(token, logits[seq.row], eos, self.tokenizer))
            self._retire_if_done(seq)
        return outputs

    def _recording(self, sequences: list[Sequence]) -> bool:
        return any(s.selections is not None for s in sequences)

    def _fail(self, sequences: list[Sequence], err: BaseException) -> None:
        for seq in sequences:
            if self._requests.get(seq.request_id) is seq:
                self._release(seq)
                seq.fail(f"{type(err).__name__}: {err}")
                del self._requests[seq.request_id]
                self._finished[seq.request_id] = seq

    def _decode(self, running: list[Sequence], rows: int) -> torch.Tensor:
        # Built as Python lists and moved in one copy: per-element tensor writes cost microseconds each,
        # which at 64 rows added up to a visible share of a ~ms decode step.
        tokens, positions, active = [0] * rows, [0] * rows, [0] * rows
        for seq in running:
            tokens[seq.row] = seq.output_token_ids[-1]
            positions[seq.row] = seq.cached_tokens
            active[seq.row] = 1
        uniform = len({s.cached_tokens for s in running}) == 1
        if uniform:
            # Free rows take the common position so one selection call serves every row; they have no
            # host pages, so nothing of theirs is loaded or written back.
            positions = [running[0].cached_tokens] * rows
        packed = torch.tensor([tokens, positions, active], dtype=torch.long).to(self.device)
        tokens, positions, active = packed[0], packed[1], packed[2].bool()
        record = self._recording(running)
        self.runner.record_selections = record
        if self.graphed is not None and self._graphs_enabled and self.runner.load_log is None and not record:
            return self.graphed(tokens, positions, active, uniform)
        return self.runner.decode_step(tokens, positions, active, uniform)

    def _retire_if_done(self, seq: Sequence) -> None:
        if seq.finish_reason is not None:
            self.cache.release_row(seq.row)
            self.scheduler.finish(seq)
            del self._requests[seq.request_id]
            self._finished[seq.request_id] = seq

    # ----------------------------------------------------------------------------------- generate
    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True, return_logits: bool = False,
                 raise_on_error: bool = True, record_selections: bool = False) -> list[RequestOutput]:
        """prompts: a str, a list of token ids, or a list of either; sampling_params: one SamplingParams or
        one per prompt. Returns one RequestOutput per prompt, in order (request_id = index in this call). A
        request that is invalid or can never fit raises ValueError before anything runs (raise_on_error=True)
        or comes back with `error` set while the others run unchanged (False). return_logits: keep each
        step's logits [V] (tests). record_selections: each output carries its decode steps' selections.
        Built on `add_request` / `step`: requests queued before this call by `add_request` run too (their
        results stay for `output`)."""
        from tqdm.auto import tqdm

        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("generate needs at least one prompt")
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        outputs: list[RequestOutput | None] = [None] * len(prompts)
        mine: dict[int, int] = {}  # engine request id -> index in this call
        sequences = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            try:
                request_id = self._new_request_id(None)
                sequences.append(self._make_sequence(i, request_id, prompt, p, return_logits, record_selections))
                mine[request_id] = i
            except ValueError as err:
                if raise_on_error:
                    raise
                ids = prompt if isinstance(prompt, list) else []
                outputs[i] = RequestOutput(i, prompt if isinstance(prompt, str) else None, ids, finish_reason="error", error=str(err))
        for seq in sequences:
            self._queue(seq)
        bar = tqdm(total=len(sequences), desc="generate", unit="req", disable=not use_tqdm)
        try:
            while any(rid in self._requests for rid in mine):
                for out in self.step():
                    if out.finished and out.request_id in mine:
                        bar.update(1)
                bar.set_postfix(tok_s=f"{self.last_step_tokens_per_s:.1f}", running=self.num_running)
        except BaseException:
            # An error (or Ctrl-C) mid-call must not leave this call's requests holding rows and pages (the
            # failing step gave back its own; the others of this call are dropped too), then re-raise.
            for rid in mine:
                if self.abort(rid) is False:
                    self._finished.pop(rid, None)
            raise
        finally:
            bar.close()
        for rid, i in mine.items():
            outputs[i] = dataclasses.replace(self.output(rid), request_id=i)
        return outputs

    def stats(self) -> EngineStats:
        loaded = self.runner.loaded.cpu()
        selected = self.runner.selected.cpu()
        cfg = self.config
        block_bytes = 2 * cfg.sparse.block_size * cfg.head_dim * torch.empty((), dtype=self.model.dtype).element_size()
        total_loaded = int(loaded.sum()) + int(self.runner.install_loaded.sum())
        return EngineStats(
            decode_steps=self._steps, decode_tokens=self._decode_tokens, decode_s=self._decode_s,
            prefill_tokens=self._prefill_tokens, prefill_s=self._prefill_s,
            hit_rate_per_layer=[1.0 - float(l) / float(s) if s > 0 else 1.0 for l, s in zip(loaded, selected)],
            blocks_loaded_per_step=float(loaded.sum()) / self._steps if self._steps else 0.0,
            bytes_host_to_device=total_loaded * block_bytes,
        )
