"""Sampling parameters (vLLM-like) and the sampler: greedy, temperature, top-k, top-p, per-request seed."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Temperatures below this sample greedily (as vLLM does): dividing float32 logits by a smaller one underflows
# the divisor to 0 (NaN scores) or leaves a one-hot distribution anyway.
MIN_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    """How one request is decoded.

    temperature: 0 (or below MIN_TEMPERATURE, 1e-5) means greedy (argmax); otherwise samples from
    softmax(logits / temperature).
    top_k: keep the k most likely tokens (-1 or 0: all). top_p: keep the smallest set whose probability
    reaches top_p (1.0: all). seed: a per-request generator, so a request's samples do not depend on the
    other requests of the batch. max_tokens: tokens to generate at most. stop: strings that end the
    generation (the returned text stops before the string). stop_token_ids: extra stop tokens.
    ignore_eos: keep going past the end-of-sequence token. logprobs: None, or k >= 0 to report each new
    token's log-probability and the k most likely tokens (log_softmax of the raw logits, before temperature).
    """

    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    stop_strings: tuple[str, ...] = field(init=False, repr=False, default=())

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise ValueError(f"SamplingParams.temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k must be an integer >= 1, or -1/0 for no limit, got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not (0 < self.top_p <= 1):
            raise ValueError(f"SamplingParams.top_p must lie in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"SamplingParams.seed must be an integer or None, got {self.seed!r}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ValueError(f"SamplingParams.stop must hold non-empty strings, got {s!r}")
        self.stop_strings = tuple(stops)
        for t in self.stop_token_ids or []:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise ValueError(f"SamplingParams.stop_token_ids must hold token ids >= 0, got {t!r}")

        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int) or self.logprobs < 0):
            raise ValueError(f"SamplingParams.logprobs must be None or an integer >= 0, got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits: [V] of one request -> the next token id."""
    if params.greedy:
        return int(torch.argmax(logits))
    # Shifted so the largest score is 0 before dividing: a tiny temperature then sends the others to -inf
    # (a one-hot softmax) instead of overflowing every score to inf.
    scores = (logits.float() - logits.float().max()) / params.temperature
    if params.top_k > 0 and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # Drop a token when the tokens before it already reach top_p (the most likely token always stays).
        before = torch.cumsum(probs, dim=-1) - probs
        drop = before >= params.top_p
        scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> list[int]:
    """logits: [B, V] -> B token ids. Greedy rows share one argmax (one device sync for the batch)."""
    tokens = sample_rows(logits, params, generators)
    for token in tokens:
        if isinstance(token, Exception):
            raise token
    return tokens


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> list[int | Exception]:
    """As `sample`, but a row whose sampling raises (non-finite logits, say) gets its exception in place of a
    token, so the engine fails that request alone and the rest of the batch goes on."""
    tokens: list = torch.argmax(logits, dim=-1).tolist()
    for row, p in enumerate(params):
        if not p.greedy:
            try:
                tokens[row] = sample_row(logits[row], p, generators[row])
            except Exception as err:  # noqa: BLE001 - handed to the caller, which fails this request alone
                tokens[row] = err
    return tokens


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> dict:
    """logits: [V] raw -> {"token_id", "logprob", "top": [(token_id, logprob)] * top} (log_softmax, no
    temperature: the distribution the model gives, whatever the sampler then does)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(logprobs, min(top, logprobs.numel())) if top > 0 else None
    pairs = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
    return {"token_id": token, "logprob": float(logprobs[token]), "top": pairs}
