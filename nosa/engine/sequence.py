"""One request's life in the engine, and what the engine returns for it: a `StepOutput` per step that
produced tokens (`LLM.step`), a `RequestOutput` when it is finished (`LLM.generate`, `LLM.output`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from nosa.engine.sampling import SamplingParams, token_logprobs
from nosa.tokenizer import IncrementalDecoder, decode_text


@dataclass
class RequestOutput:
    """request_id: index in the `generate` call (the engine's id for `LLM.output`); token_ids: generated
    tokens; text: their decoding (None without a tokenizer), cut before a stop string; finish_reason:
    'length', 'eos', 'stop' or 'error'; error: the message when the request was rejected or failed (the other
    requests still ran); stats: prompt_tokens, generated_tokens, prefill_s, decode_s, tokens_per_s; logits:
    [generated_tokens, V] float32 when asked; logprobs: one dict per token when `SamplingParams.logprobs`
    is set (see `StepOutput`); selections: with `record_selections`, the blocks each decode step's query
    selected, int16 [num_layers, decode_steps, H_kv, topk_blocks] (-1 unused; None in dense mode), entry s
    being the query at position selection_first_position + s = len(prompt_token_ids) + s."""

    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str | None = None
    error: str | None = None
    stats: dict = field(default_factory=dict)
    logits: torch.Tensor | None = None
    logprobs: list[dict] | None = None
    selections: torch.Tensor | None = None
    selection_first_position: int | None = None


@dataclass
class StepOutput:
    """What one `LLM.step` produced for one request. token_ids: the tokens new in this step; finished /
    finish_reason: "stop" (end-of-sequence token, stop token or stop string), "length", or "error";
    logprobs: per new token {"token_id", "logprob", "top": [(token_id, logprob), ...]} when asked."""

    request_id: int
    token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    logprobs: list[dict] | None = None


def parse_prompt(label, prompt, tokenizer, vocab_size: int) -> tuple[str | None, list[int]]:
    """A request's prompt (str with a tokenizer, list of token ids, or a 1-D tensor of them) -> (text or
    None, token ids); ValueError naming request `label` and the problem otherwise."""
    text = None
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError(f"request {label}: text prompts need a tokenizer (pass tokenizer= or token ids)")
        text, prompt = prompt, tokenizer.encode(prompt)
    if isinstance(prompt, torch.Tensor):
        prompt = prompt.tolist()
    if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise ValueError(f"request {label}: a prompt must be a str or a list of token ids, got {type(prompt).__name__}")
    if len(prompt) == 0:
        raise ValueError(f"request {label}: the prompt is empty; give at least one token")
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"request {label}: token ids {bad[:5]} lie outside [0, vocab_size={vocab_size})")
    return text, list(prompt)


class Sequence:
    def __init__(self, request_id: int, prompt: str | None, token_ids: list[int], params: SamplingParams,
                 device: torch.device, keep_logits: bool, selection_shape: tuple[int, int, int] | None = None):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = token_ids
        self.params = params
        self.output_token_ids: list[int] = []
        self.row: int | None = None
        self.pages: list[int] = []
        self.prefill = None  # the engine's PrefillState while the prompt is being prefilled
        self.finish_reason: str | None = None
        self.text: str | None = None  # set when the request finishes (see `append`)
        self._tokenizer = None  # the one `append` was given
        self._decoder: IncrementalDecoder | None = None  # with stop strings: the text as tokens arrive
        self._cut_by_stop_string = False
        self.error: str | None = None
        self.logits: list[torch.Tensor] | None = [] if keep_logits else None
        self.logprobs: list[dict] | None = [] if params.logprobs is not None else None
        # Recording selections (sparse modes): one [L, H, K] int16 selection per decode step.
        self.selection_shape = selection_shape
        self.selections: list[torch.Tensor] | None = [] if selection_shape is not None else None
        self.stop_token_ids = frozenset(params.stop_token_ids or ())
        self.generator = None
        if params.seed is not None and not params.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)
        self.admitted_at = self.first_token_at = self.finished_at = None

    @property
    def cached_tokens(self) -> int:
        """Tokens whose K/V are in the cache: the prompt and every generated token but the newest."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) - 1

    @property
    def max_cached_tokens(self) -> int:
        return len(self.prompt_token_ids) + self.params.max_tokens - 1

    @property
    def wants_logits(self) -> bool:
        """Whether `append` reads the step's logits (kept, or for logprobs); otherwise it may be given None."""
        return self.logits is not None or self.logprobs is not None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token: int, logits: torch.Tensor, eos_ids: set[int], tokenizer) -> StepOutput:
        """Record a generated token, decide whether the request is finished, and say so."""
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        self.output_token_ids.append(token)
        if self.logits is not None:
            self.logits.append(logits.detach().float().cpu())
        logprobs = None
        if self.logprobs is not None:
            logprobs = [token_logprobs(logits, token, self.params.logprobs)]
            self.logprobs.extend(logprobs)
        p = self.params
        self._tokenizer = tokenizer
        if tokenizer is not None and p.stop_strings:
            # Stop strings are looked for in the text after every token, decoded incrementally (the new
            # tokens only) and searched only where a new match can end. Without them the text is decoded
            # once, when the request finishes.
            if self._decoder is None:
                self._decoder = IncrementalDecoder(tokenizer)
            self._cut_at_stop([token])
        if self.finish_reason is None:
            if token in self.stop_token_ids:
                self.finish_reason = "stop"
            elif not p.ignore_eos and token in eos_ids:
                self.finish_reason = "eos"
            elif len(self.output_token_ids) >= p.max_tokens:
                self.finish_reason = "length"
        if self.finish_reason is not None:
            self.finished_at = now
            if tokenizer is not None and not p.stop_strings:
                self.text = decode_text(tokenizer, self.output_token_ids)
            elif self._decoder is not None and not self._cut_by_stop_string:
                self._cut_at_stop([], final=True)  # the text of an unfinished character (U+FFFD) at the end
                if not self._cut_by_stop_string:  # else the cut text is set and the request ended by "stop"
                    self.text = self._decoder.text
        # The step API speaks OpenAI's vocabulary: an end-of-sequence token is a "stop".
        reason = "stop" if self.finish_reason == "eos" else self.finish_reason
        return StepOutput(self.request_id, [token], self.finished, reason, logprobs)

    def _cut_at_stop(self, new_ids: list[int], final: bool = False) -> None:
        """Pushes the new ids into the text and ends the request at the first stop string to complete (in the
        settled text or the pending one, so a stop string is seen in the token that completes it)."""
        self._decoder.push(new_ids, final)
        cut = self._decoder.find_stop(self.params.stop_strings)
        if cut >= 0:
            self.text = (self._decoder.text + self._decoder.pending)[:cut]
            self.finish_reason = "stop"
            self._cut_by_stop_string = True

    def fail(self, message: str) -> None:
        """The request was dropped by an error of the engine (its row and pages are given back)."""
        self.finish_reason, self.error = "error", message
        self.finished_at = time.perf_counter()
        if self._tokenizer is None or self._cut_by_stop_string:
            return
        try:  # the text so far, an unfinished character included; the error already says why it ended
            if self._decoder is not None:
                self._cut_at_stop([], final=True)
                if not self._cut_by_stop_string:
                    self.text = self._decoder.text
            else:
                self.text = decode_text(self._tokenizer, self.output_token_ids)
        except Exception:  # noqa: BLE001 - a token the tokenizer refuses may be why it failed
            pass
        self.finish_reason = "error"  # a stop string found in the held tail does not hide the error

    def output(self) -> RequestOutput:
        prefill_s = (self.first_token_at - self.admitted_at) if self.first_token_at else 0.0
        decode_s = (self.finished_at - self.first_token_at) if self.finished_at and self.first_token_at else 0.0
        decoded = max(0, len(self.output_token_ids) - 1)
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt, prompt_token_ids=self.prompt_token_ids,
            token_ids=list(self.output_token_ids), text=self.text, finish_reason=self.finish_reason,
            stats={
                "prompt_tokens": len(self.prompt_token_ids), "generated_tokens": len(self.output_token_ids),
                "prefill_s": prefill_s, "decode_s": decode_s,
                "tokens_per_s": decoded / decode_s if decode_s > 0 else None,
            },
            logits=torch.stack(self.logits) if self.logits else None,
            error=self.error,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            selections=self._stacked_selections(),
            selection_first_position=len(self.prompt_token_ids) if self.selections is not None else None,
        )

    def _stacked_selections(self) -> torch.Tensor | None:
        if self.selections is None:  # not recorded, or dense mode
            return None
        if not self.selections:
            layers, heads, slots = self.selection_shape
            return torch.empty((layers, 0, heads, slots), dtype=torch.int16)
        return torch.stack(self.selections, dim=1)  # [L, steps, H, K]
