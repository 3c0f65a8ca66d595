"""One request's life in the engine, and what `LLM.generate` returns for it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from nosa.engine.sampling import SamplingParams


@dataclass
class RequestOutput:
    """request_id: index in the `generate` call; token_ids: generated tokens; text: their decoding (None
    without a tokenizer), cut before a stop string; finish_reason: 'length', 'eos', 'stop' or 'error';
    error: the message when the request was rejected (the other requests still ran); stats: prompt_tokens,
    generated_tokens, prefill_s, decode_s, tokens_per_s; logits: [generated_tokens, V] float32 when asked."""

    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str | None = None
    error: str | None = None
    stats: dict = field(default_factory=dict)
    logits: torch.Tensor | None = None


class Sequence:
    def __init__(self, request_id: int, prompt: str | None, token_ids: list[int], params: SamplingParams,
                 device: torch.device, keep_logits: bool):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = token_ids
        self.params = params
        self.output_token_ids: list[int] = []
        self.row: int | None = None
        self.pages: list[int] = []
        self.finish_reason: str | None = None
        self.text: str | None = None
        self.logits: list[torch.Tensor] | None = [] if keep_logits else None
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

    def append(self, token: int, logits: torch.Tensor, eos_ids: set[int], tokenizer) -> None:
        """Record a generated token and decide whether the request is finished."""
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        self.output_token_ids.append(token)
        if self.logits is not None:
            self.logits.append(logits.detach().float().cpu())
        p = self.params
        if tokenizer is not None:
            self.text = tokenizer.decode(self.output_token_ids)
            for stop in p.stop_strings:
                cut = self.text.find(stop)
                if cut >= 0:
                    self.text = self.text[:cut]
                    self.finish_reason = "stop"
        if self.finish_reason is None:
            if token in set(p.stop_token_ids or ()):
                self.finish_reason = "stop"
            elif not p.ignore_eos and token in eos_ids:
                self.finish_reason = "eos"
            elif len(self.output_token_ids) >= p.max_tokens:
                self.finish_reason = "length"
        if self.finish_reason is not None:
            self.finished_at = now

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
        )
