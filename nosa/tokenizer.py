"""A byte-level tokenizer that needs no download: 256 byte ids plus pad, bos and eos.

It is deliberately simple: any text round-trips, every machine has it, and a model trained here with it
can be reloaded anywhere. It is saved beside the model as `nosa_tokenizer.json`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable, Sequence

import torch

TOKENIZER_FILE = "nosa_tokenizer.json"


class ByteTokenizer:
    kind = "byte"
    num_bytes = 256
    # The text of ids after any context is what they add to it (bytes, decoded as UTF-8 with replacement):
    # IncrementalDecoder needs no decode of everything at the end.
    decodes_by_window = True

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


def _rewrites_across_tokens(tokenizer) -> bool:
    """Whether the tokenizer's decode changes text on both sides of a token boundary, so that the text of
    the new ids after a short context is not what they add to the whole: transformers' clean-up of
    tokenization spaces (BERT style: "it ' s" -> "it's", a space removed before text already settled).
    transformers 5 skips the clean-up for BPE models unless forced (the flag is then inert)."""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    force = getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", None)
    if force is None:  # a transformers without the BPE exception cleans up for every model
        return True
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return bool(force) or type(getattr(backend, "model", None)).__name__ != "BPE"


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# How far back the context may reach to start outside a run of byte tokens, or to render as some text.
_MAX_CONTEXT_WALK = 64
_MAX_EMPTY_CONTEXT_WALK = 8
# Clean-up patterns (" n't", " 've", " ' ") start at most this many characters before the text's end that a
# later token completes them at: a stream holds them back (`stable_length`).
_CLEANUP_REACH = 4


class IncrementalDecoder:
    """The text of generated ids as they arrive, at a cost per token that does not grow with the output:
    each `push` decodes only the ids since the last text it settled, with the ids before that as context
    (a tokenizer may render a token differently at the start of a text, e.g. SentencePiece's leading space),
    and takes what that context's own text does not already hold. Decoding all ids again at every token
    cost O(n^2) over a long generation.

    - `text`: the settled text. `pending`: what the unsettled ids show so far, an unfinished character's
      U+FFFD left out; it may still change. Settling waits while the new text ends in U+FFFD (usually a
      character whose remaining bytes are in the next tokens) or is empty (special ids, a partial piece), for
      at most `max_unsettled` ids; after that, or when `final`, the text is taken as it is.
    - The context starts outside any run of byte ids (`<0xHH>` tokens, which a byte-fallback decoder renders
      as a unit), at most 64 ids back, and renders as some text. Where the context's text is still not a
      prefix of the window's (an invalid byte run turning valid bytes before it into U+FFFD, or any decode
      that rewrites across the boundary), everything is decoded again once the window no longer ends in an
      unfinished character, and the settled text becomes that whole decode. Tokenizers whose decode is known to rewrite text
      across tokens (`clean_up_tokenization_spaces`) are decoded whole at every push: correct, and O(n^2).
      A rewrite may change text already settled: `rewritten` is then set, and `push` returns only what
      extends the common prefix. Once `final`, `text` is the decode of all ids at once.
    - `searched`: the length of `text + pending` that the last push left unchanged, which a stop string
      search after every push has already covered; `find_stop` searches only where a new match can end."""

    def __init__(self, tokenizer, max_unsettled: int = 64):
        self.tokenizer = tokenizer
        self.max_unsettled = max_unsettled
        self.whole = _rewrites_across_tokens(tokenizer)
        self.ids: list[int] = []
        self.pending = ""
        self.searched = 0
        self.rewritten = False
        self.rewritten_by_last_push = False
        self._pieces: list[str] = []  # the settled text in pieces, joined when asked for
        self._length = 0
        self._byte_tokens: dict[int, bool] = {}
        self._context = 0  # ids[_context:_settled] is the context of the next decode
        self._settled = 0  # ids before this are in `text`
        self._context_text = ""

    @property
    def text(self) -> str:
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    @property
    def settled_length(self) -> int:
        return self._length

    @property
    def stable_length(self) -> int:
        """How much of `text` no later push is expected to rewrite: all of it, except where the decode is
        whole (`clean_up_tokenization_spaces`), whose clean-up can still change the last few characters
        (" '" followed by "s" becomes "'s", "do n '" followed by "t" "don't"). A stream sends no further than
        this until the end."""
        return max(0, self._length - _CLEANUP_REACH) if self.whole else self._length

    def tail(self, start: int) -> str:
        """text[start:], at the cost of the tail's pieces."""
        out, length = [], self._length
        for piece in reversed(self._pieces):
            if length <= start:
                break
            out.append(piece)
            length -= len(piece)
        return "".join(reversed(out))[max(0, start - length):]

    def push(self, new_ids, final: bool = False) -> str:
        """Adds ids; returns the text they settled (possibly none yet)."""
        self.ids.extend(new_ids)
        self.rewritten_by_last_push = False
        old_length, old_pending = self._length, self.pending
        if len(self.ids) == self._settled:
            added = ""
            self.pending = ""
        else:
            added = self._advance(final)
        if final and not self.whole and not getattr(self.tokenizer, "decodes_by_window", False):
            # One decode of everything, once: a byte-fallback decoder renders a run of byte ids as a unit, and
            # a run of invalid ones can reach back past any window.
            added += self._rewrite_to(decode_text(self.tokenizer, self.ids))
        if self.rewritten_by_last_push:
            return added
        # Unchanged by this push: the settled text before it, and as much of its pending text as still stands.
        new_tail = added + self.pending
        same = len(os.path.commonprefix([old_pending, new_tail]))
        self.searched = old_length + same
        return added

    def find_stop(self, stops) -> int:
        """Where in `text + pending` the first stop string to complete begins (`first_stop`), or -1,
        looking only where a match can end past `searched`."""
        longest = max((len(s) for s in stops if s), default=0)
        if not longest:
            return -1
        # The search runs over the settled tail and the pending text after it: it cannot start past the
        # settled text's end (pending text that the last push left alone may be longer than any stop).
        start = min(max(0, self.searched - longest + 1), self._length)
        found = first_stop(self.tail(start) + self.pending, stops, self.searched - start)
        return found + start if found >= 0 else -1

    def _advance(self, final: bool) -> str:
        window = decode_text(self.tokenizer, self.ids[self._context:])
        extends = window.startswith(self._context_text)
        if not extends and self._waits(window, final):
            # An unfinished character (a byte-fallback decoder shows the whole byte run as U+FFFD meanwhile):
            # wait for it before asking the whole decode what changed.
            self.pending = ""
            return ""
        if not extends:
            return self._decode_whole(final, window if self._context == 0 else None)
        new = window[len(self._context_text):]
        if self._waits(new, final):
            self.pending = new.rstrip(REPLACEMENT_CHAR)
            return ""
        self._settle(new)
        return new

    def _waits(self, new: str, final: bool) -> bool:
        unfinished = not new or new.endswith(REPLACEMENT_CHAR)
        return unfinished and not final and len(self.ids) - self._settled < self.max_unsettled

    def _decode_whole(self, final: bool, whole: str | None = None) -> str:
        if whole is None:
            whole = decode_text(self.tokenizer, self.ids)
        settled = self.text
        extends = whole.startswith(settled)
        if self._waits(whole[len(settled):] if extends else whole, final):
            # e.g. a byte-fallback decoder shows a valid byte before an unfinished character as U+FFFD too
            # until the character completes: wait for it before deciding what changed.
            self.pending = whole[len(settled):].rstrip(REPLACEMENT_CHAR) if extends else ""
            return ""
        return self._rewrite_to(whole)

    def _rewrite_to(self, whole: str) -> str:
        """Makes `whole` the settled text of every id so far; returns what it adds when it extends the settled
        text, else "" (`rewritten` says so)."""
        settled = self.text
        if whole == settled:
            if self._settled < len(self.ids):
                self._settle("")  # ids that add no text
            return ""
        if whole.startswith(settled):
            new = whole[len(settled):]
            self._settle(new)
            return new
        same = len(os.path.commonprefix([settled, whole]))
        self._pieces, self._length = [whole[:same]], same
        self._settle(whole[same:])
        self.rewritten = self.rewritten_by_last_push = True
        self.searched = same
        return ""

    def _settle(self, new: str) -> None:
        self._pieces.append(new)
        self._length += len(new)
        previous, self._settled = self._settled, len(self.ids)
        if self.whole:
            self._context, self._context_text = 0, self.text
        else:
            self._context, self._context_text = self._context_start(previous)
        self.pending = ""

    def _context_start(self, start: int) -> tuple[int, str]:
        """Where the next window starts: at the last settled piece, moved back (a) out of a run of byte ids,
        which a byte-fallback decoder renders as a unit (a valid byte before an invalid one becomes U+FFFD
        too), so the window holds the whole run as the whole decode does, and (b) until the context renders
        as some text (an empty context, e.g. a space the decoder strips at a text's start, proves nothing)."""
        start = min(start, max(0, self._settled - 1))  # a rewrite at the end may settle no new id
        if getattr(self.tokenizer, "decodes_by_window", False):
            return start, decode_text(self.tokenizer, self.ids[start:self._settled])
        floor = max(0, start - _MAX_CONTEXT_WALK)
        while start > floor and self._is_byte_token(self.ids[start]):
            start -= 1
        text = decode_text(self.tokenizer, self.ids[start:self._settled])
        floor = max(0, start - _MAX_EMPTY_CONTEXT_WALK)  # ids that render as nothing (padding) stay cheap
        while start > floor and not text:
            start -= 1
            text = decode_text(self.tokenizer, self.ids[start:self._settled])
        return start, text

    def _is_byte_token(self, token: int) -> bool:
        known = self._byte_tokens.get(token)
        if known is None:
            convert = getattr(self.tokenizer, "convert_ids_to_tokens", None)
            piece = convert(token) if convert is not None else None
            known = self._byte_tokens[token] = isinstance(piece, str) and bool(_BYTE_TOKEN.fullmatch(piece))
        return known


def first_stop(text: str, stops, searched: int = 0) -> int:
    """Where the first of `stops` to complete begins in `text`, or -1: the match that ends first, the longest
    of those ending together (as if the text arrived one character at a time, so the answer does not depend
    on how the text was split into tokens). `searched`: a length of `text` already searched without a match,
    so only matches that end past it are looked for (a tail, not the whole text)."""
    best = None
    for stop in stops:
        if not stop:
            continue
        at = text.find(stop, max(0, searched - len(stop) + 1))
        if at >= 0 and (best is None or (at + len(stop), at) < (best[0] + best[1], best[0])):
            best = (at, len(stop))
    return best[0] if best else -1
