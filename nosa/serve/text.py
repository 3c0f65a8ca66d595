"""Text around the engine: loading a model directory's tokenizer, the chat prompt, and incremental
detokenisation with stop strings for streaming.

The chat prompt uses the tokenizer's own chat template when it has one (a transformers tokenizer saved
with `chat_template`). Otherwise it is the plain fallback below, documented so clients can reproduce it:

    <role>: <content>\n      (one line per message, in order; role is system/user/assistant/...)
    assistant:              (the generation prompt, no trailing space)

The fallback carries no special tokens beyond what `tokenizer.encode` adds (the byte tokenizer's <bos>).
"""

from __future__ import annotations

import os

from nosa.tokenizer import TOKENIZER_FILE, ByteTokenizer, IncrementalDecoder

def load_tokenizer(model_dir: str):
    """The tokenizer saved beside the model: nosa's ByteTokenizer, else a local transformers tokenizer
    (no download), else None (the server then takes token-id prompts only)."""
    if os.path.exists(os.path.join(model_dir, TOKENIZER_FILE)):
        return ByteTokenizer.from_pretrained(model_dir)
    if any(os.path.exists(os.path.join(model_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return None


def fallback_chat_prompt(messages: list[tuple[str, str]]) -> str:
    return "".join(f"{role}: {content}\n" for role, content in messages) + "assistant:"


def chat_prompt_ids(tokenizer, messages: list[tuple[str, str]]) -> list[int]:
    """messages: (role, content) pairs -> the prompt's token ids (template, or the documented fallback)."""
    if getattr(tokenizer, "chat_template", None):
        conversation = [{"role": role, "content": content} for role, content in messages]
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # newer transformers return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer.encode(fallback_chat_prompt(messages)))


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text))


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def token_bytes(tokenizer, token_id: int) -> list[int]:
    """The bytes a token stands for (logprobs' `bytes`): exact for the byte tokenizer, else its text's UTF-8."""
    if isinstance(tokenizer, ByteTokenizer):
        return [token_id] if token_id < tokenizer.num_bytes else []
    return list(token_text(tokenizer, token_id).encode("utf-8"))


class IncrementalText:
    """The text of one choice as its tokens arrive: `push(new_ids)` returns the text that is now safe to
    send. Held back: an unfinished UTF-8 character (nosa.tokenizer.IncrementalDecoder waits for its last
    byte) and a tail that could still become a stop string. When a stop string appears the text ends before
    it and `stopped` is set (the stop string itself is never sent, as with OpenAI); the stop string is the
    first one to complete as the text grows (`first_stop`), looked for in the pending text too, so a stop
    string is seen in the token that completes it even when that token also starts an unfinished character.
    Each push costs what its new tokens cost, not what the whole text does. `text` is the whole text (for a
    response that is not streamed); with a tokenizer whose decode rewrites earlier text (the decoder's
    `rewritten`), the streamed pieces are what was known when each was sent and may differ from it."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.decoder = IncrementalDecoder(tokenizer) if tokenizer is not None else None
        self.sent = 0  # characters of the text already returned
        self.stopped = False
        self._cut = -1

    @property
    def text(self) -> str:
        if self.decoder is None:
            return ""
        text = self.decoder.text + (self.decoder.pending if self.stopped else "")
        return text[:self._cut] if self.stopped else text

    def push(self, new_ids: list[int], final: bool = False) -> str:
        if self.stopped or self.decoder is None:
            return ""
        decoder = self.decoder
        decoder.push(new_ids, final)
        end = decoder.settled_length if final else decoder.stable_length
        cut = decoder.find_stop(self.stop)
        if cut >= 0:
            self.stopped, self._cut, final, end = True, cut, True, cut
        safe = end
        if not final:
            # The longest tail of the text so far (pending included) that is a proper prefix of some stop
            # string is held back: the next tokens may complete the stop string.
            longest = max((len(stop) for stop in self.stop), default=0)
            visible_end = decoder.settled_length + len(decoder.pending)
            start = max(0, visible_end - longest)
            tail = decoder.tail(start) + decoder.pending
            for stop in self.stop:
                for length in range(min(len(stop) - 1, len(tail)), 0, -1):
                    if tail.endswith(stop[:length]):
                        safe = min(safe, visible_end - length)
                        break
        safe = max(safe, self.sent)
        visible = decoder.tail(self.sent) + (decoder.pending if self.stopped else "")
        delta, self.sent = visible[:safe - self.sent], safe
        return delta
