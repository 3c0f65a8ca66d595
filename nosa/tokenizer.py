"""A byte-level tokenizer that needs no download: 256 byte ids plus pad, bos and eos.

It is deliberately simple: any text round-trips, every machine has it, and a model trained here with it
can be reloaded anywhere. It is saved beside the model as `nosa_tokenizer.json`.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import torch

TOKENIZER_FILE = "nosa_tokenizer.json"


class ByteTokenizer:
    kind = "byte"
    num_bytes = 256

    def __init__(self):
        self.pad_token_id = 256
        self.bos_token_id = 257
        self.eos_token_id = 258
        self.special_tokens = {"<pad>": self.pad_token_id, "<bos>": self.bos_token_id, "<eos>": self.eos_token_id}

    @property
    def vocab_size(self) -> int:
        return self.num_bytes + len(self.special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode takes a str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        return ([self.bos_token_id] if add_bos else []) + ids + ([self.eos_token_id] if add_eos else [])

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = bytearray()
        for token in ids:
            if isinstance(token, bool) or not float(token).is_integer():
                raise ValueError(f"token ids must be integers, got {token!r}")
            token = int(token)
            if token < 0 or token >= self.vocab_size:
                raise ValueError(f"token id {token} is outside this tokenizer's vocabulary [0, {self.vocab_size})")
            if token < self.num_bytes:
                out.append(token)
            elif not skip_special_tokens:
                name = next(k for k, v in self.special_tokens.items() if v == token)
                out.extend(name.encode())
        return out.decode("utf-8", errors="replace")

    def batch_decode(self, batch, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def __call__(self, texts: str | Sequence[str], padding_side: str = "left", add_bos: bool = True):
        """Batch-encode to {'input_ids': [B, T] int64, 'attention_mask': [B, T] int64}, padded on `padding_side`."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        texts = [texts] if isinstance(texts, str) else list(texts)
        encoded = [self.encode(t, add_bos=add_bos) for t in texts]
        width = max((len(e) for e in encoded), default=0)
        ids = torch.full((len(encoded), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, seq in enumerate(encoded):
            span = slice(width - len(seq), width) if padding_side == "left" else slice(0, len(seq))
            ids[row, span] = torch.tensor(seq, dtype=torch.long)
            mask[row, span] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, TOKENIZER_FILE), "w") as f:
            json.dump({"kind": self.kind, "special_tokens": self.special_tokens}, f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "ByteTokenizer":
        path = os.path.join(directory, TOKENIZER_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in {directory}: this model was not saved with a nosa tokenizer")
        with open(path) as f:
            data = json.load(f)
        if data.get("kind") != cls.kind:
            raise ValueError(f"{path} describes a {data.get('kind')!r} tokenizer, expected {cls.kind!r}")
        return cls()


def decode_text(tokenizer, ids) -> str:
    """Generated token ids as text, special tokens (end of sequence, padding) left out: what a response
    carries. transformers' tokenizers keep them unless told (`skip_special_tokens` defaults to False there;
    ByteTokenizer drops them by default)."""
    return tokenizer.decode(ids, skip_special_tokens=True)


REPLACEMENT_CHAR = "\ufffd"


class IncrementalDecoder:
    """The text of generated ids as they arrive, at a cost per token that does not grow with the output:
    each `push` decodes only the ids since the last text it settled, with the ids before that as context
    (a tokenizer may render a token differently at the start of a text, e.g. SentencePiece's leading space),
    and takes what that context's own text does not already hold. A text that ends in U+FFFD waits for more
    ids: it is usually a character whose remaining bytes are in the next tokens (at the end it is kept as it
    is). Decoding all ids again at every token, as before, cost O(n^2) over a long generation.

    `text` is what has been settled; `push` returns what it added."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._context = 0  # ids[_context:_settled] is the context of the next decode
        self._settled = 0  # ids before this are in `text`
        self._context_text = ""

    def push(self, new_ids, final: bool = False) -> str:
        self.ids.extend(new_ids)
        if len(self.ids) == self._settled:
            return ""
        window = decode_text(self.tokenizer, self.ids[self._context:])
        if not final and (window.endswith(REPLACEMENT_CHAR) or len(window) <= len(self._context_text)):
            return ""  # an unfinished character, or ids that add no text yet (special tokens, a partial piece)
        # The context's own text is a prefix of the window's for the tokenizers we know; were it not, the
        # settled text stays as sent and the window's tail past that length is what is new.
        added = window[len(self._context_text):]
        self.text += added
        self._context, self._settled = self._settled, len(self.ids)
        self._context_text = decode_text(self.tokenizer, self.ids[self._context:self._settled])
        return added



def first_stop(text: str, stops, searched: int = 0) -> int:
    """Where the first of `stops` begins in `text`, or -1. `searched`: a length of `text` already searched
    without a match, so only matches that end past it are looked for (a tail, not the whole text)."""
    found = [text.find(stop, max(0, searched - len(stop) + 1)) for stop in stops if stop]
    return min((i for i in found if i >= 0), default=-1)
