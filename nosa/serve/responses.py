"""OpenAI's response and stream-chunk shapes for completions and chat completions, built from the
events of each choice. One `ChoiceState` per choice turns token events into text deltas (stop strings cut,
as OpenAI does: the stop text is never returned) and logprobs in the endpoint's format."""

from __future__ import annotations

import time
import uuid

from nosa.serve.text import IncrementalText, token_bytes, token_text


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class ChoiceState:
    def __init__(self, index: int, tokenizer, stop: list[str], chat: bool, want_logprobs: bool):
        self.index = index
        self.tokenizer = tokenizer
        self.text = IncrementalText(tokenizer, stop)
        self.chat = chat
        self.want_logprobs = want_logprobs
        self.tokens = 0
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.sent_role = False
        self.logprobs: list[dict] = []  # per token, in the endpoint's format
        self._offset = 0  # completions' text_offset of the next token

    def push(self, token_ids: list[int], logprobs: list[dict] | None, finished: bool) -> tuple[str, list[dict]]:
        """New tokens -> (text now safe to send, their logprob entries)."""
        self.tokens += len(token_ids)
        entries = []
        if self.want_logprobs and logprobs:
            entries = [self._entry(lp) for lp in logprobs]
            self.logprobs.extend(entries)
        return self.text.push(token_ids, final=finished), entries

    def _entry(self, lp: dict) -> dict:
        tok = self.tokenizer
        if self.chat:
            return {
                "token": token_text(tok, lp["token_id"]), "logprob": lp["logprob"], "bytes": token_bytes(tok, lp["token_id"]),
                "top_logprobs": [{"token": token_text(tok, t), "logprob": v, "bytes": token_bytes(tok, t)} for t, v in lp["top"]],
            }
        text = token_text(tok, lp["token_id"])
        entry = {"token": text, "logprob": lp["logprob"], "top": {token_text(tok, t): v for t, v in lp["top"]},
                 "offset": self._offset}
        self._offset += len(text)
        return entry

    def logprobs_field(self, entries: list[dict]):
        """The choice's `logprobs` member for these entries (None when not asked)."""
        if not self.want_logprobs:
            return None
        if self.chat:
            return {"content": entries, "refusal": None}
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [e["top"] for e in entries], "text_offset": [e["offset"] for e in entries]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def final_response(chat: bool, response_id: str, model: str, created: int, states: list[ChoiceState], prompt_tokens: int) -> dict:
    choices = []
    for s in states:
        lp = s.logprobs_field(s.logprobs)
        if chat:
            choices.append({"index": s.index, "message": {"role": "assistant", "content": s.text.text, "refusal": None},
                            "logprobs": lp, "finish_reason": s.finish_reason})
        else:
            choices.append({"index": s.index, "text": s.text.text, "logprobs": lp, "finish_reason": s.finish_reason})
    return {"id": response_id, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": choices, "usage": usage(prompt_tokens, sum(s.tokens for s in states))}


def stream_chunk(chat: bool, response_id: str, model: str, created: int, state: ChoiceState, delta: str,
                 entries: list[dict], finish_reason: str | None, include_usage: bool) -> dict:
    lp = state.logprobs_field(entries) if entries else None
    if chat:
        message = {}
        if not state.sent_role:
            message["role"], state.sent_role = "assistant", True
        if delta or (finish_reason is None):
            message["content"] = delta
        choice = {"index": state.index, "delta": message, "logprobs": lp, "finish_reason": finish_reason}
    else:
        choice = {"index": state.index, "text": delta, "logprobs": lp, "finish_reason": finish_reason}
    chunk = {"id": response_id, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
             "model": model, "choices": [choice]}
    if include_usage:
        chunk["usage"] = None  # OpenAI: null on every chunk but the last, which carries the totals
    return chunk


def usage_chunk(chat: bool, response_id: str, model: str, created: int, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": response_id, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def now() -> int:
    return int(time.time())
