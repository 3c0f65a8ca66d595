"""One tokenizer interface for the data pipeline: the built-in byte tokenizer or a local transformers one.

The corpus builder, the synthetic tasks and eval only need: encode text without special tokens, decode,
and the bos / eos / pad ids. A model converted from a dense Llama checkpoint keeps that checkpoint's
tokenizer (loaded from a local directory; nothing is downloaded).
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from nosa.tokenizer import ByteTokenizer


class TextTokenizer:
    """Adapter with a uniform interface. `name` says where the tokenizer came from (for people);
    `fingerprint` says what it is (corpus metadata records it to catch mismatches)."""

    def __init__(self, inner, name: str):
        self.inner = inner
        self.name = name
        if isinstance(inner, ByteTokenizer):
            self.bos_id, self.eos_id, self.pad_id = inner.bos_token_id, inner.eos_token_id, inner.pad_token_id
            self.vocab_size = inner.vocab_size
        else:
            self.bos_id = inner.bos_token_id
            self.eos_id = inner.eos_token_id
            if self.eos_id is None:
                raise ValueError(f"tokenizer {name!r} has no eos token: documents could not be separated")
            # Padding positions always carry label -100 and are never attended by real tokens, so any
            # valid id works as the pad id when the tokenizer has none.
            self.pad_id = inner.pad_token_id if inner.pad_token_id is not None else self.eos_id
            self.vocab_size = len(inner)

    @property
    def fingerprint(self) -> str:
        """sha256 of what decides the token ids: the vocabulary (added tokens included), the special ids,
        and the ids of a probe text (which also covers merges and normalisation). The path is not part of
        it: the same tokenizer saved into a checkpoint has the same fingerprint, a different one saved at
        the same path does not."""
        if getattr(self, "_fingerprint", None) is None:
            if self.is_bytes:
                vocab = {"<bytes>": 256}
            else:
                vocab = self.inner.get_vocab()
            probe = "Fingerprint probe: The pass key is 48213.\n\tdef f(x):  return x ** 2  # émigré 東京 🙂"
            payload = json.dumps({"vocab": sorted(vocab.items()), "vocab_size": self.vocab_size,
                                  "special": [self.bos_id, self.eos_id, self.pad_id], "probe": self.encode(probe)})
            self._fingerprint = hashlib.sha256(payload.encode("utf-8")).hexdigest()
        return self._fingerprint

    @property
    def is_bytes(self) -> bool:
        return isinstance(self.inner, ByteTokenizer)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens."""
        if self.is_bytes:
            return list(text.encode("utf-8"))
        return list(self.inner.encode(text, add_special_tokens=False))

    def encode_array(self, text: str) -> np.ndarray:
        if self.is_bytes:
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        return np.asarray(self.encode(text), dtype=np.int64)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.is_bytes:
            return self.inner.decode(ids, skip_special_tokens=True)
        return self.inner.decode(ids, skip_special_tokens=True)

    def document(self, text: str) -> np.ndarray:
        """A training document: [bos] + text + [eos] (bos only when the tokenizer has one)."""
        body = self.encode_array(text)
        head = [self.bos_id] if self.bos_id is not None else []
        return np.concatenate([np.asarray(head, dtype=np.int64), body, np.asarray([self.eos_id], dtype=np.int64)])


def load_tokenizer(spec: str | None) -> TextTokenizer:
    """'byte' (default) for the built-in byte tokenizer, or a local directory holding a transformers tokenizer."""
    if spec in (None, "", "byte"):
        return TextTokenizer(ByteTokenizer(), "byte")
    if not os.path.isdir(spec):
        raise ValueError(
            f"tokenizer must be 'byte' or a local directory with a transformers tokenizer; {spec!r} is neither"
        )
    if os.path.exists(os.path.join(spec, "nosa_tokenizer.json")):
        return TextTokenizer(ByteTokenizer.from_pretrained(spec), "byte")
    from transformers import AutoTokenizer

    return TextTokenizer(AutoTokenizer.from_pretrained(spec), os.path.abspath(spec))
