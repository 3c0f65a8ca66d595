"""A token corpus built once from local text and memory-mapped: no downloads.

Sources (`build_corpus(source=...)`):
  'stdlib'          the Python standard library's .py sources of the running interpreter (default;
                    site-packages and dist-packages are excluded: they are not the standard library)
  a directory       every file under it whose suffix is in `suffixes` (default .txt .md .py .rst)
  a .jsonl file     one JSON object per line, its `text_field` (default "text") is one document

On disk, `<out>/<split>/` for split in train, val:
  tokens.bin   all documents back to back, each [bos] + text + [eos], dtype uint16 or uint32
  docs.npy     int64 [num_docs + 1] document start offsets into tokens.bin (last = total)
  meta.json    tokenizer name and fingerprint, dtype, counts, sources, what was skipped and why, the
               names of the first 1000 documents (documents_list_truncated says when there are more)
Documents are assigned to val by a seeded shuffle of the document list (`val_fraction` of them, at least
one), so the split is reproducible and never splits a document.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig

import numpy as np

from nosa.data.tokenization import TextTokenizer, load_tokenizer

DEFAULT_SUFFIXES = (".txt", ".md", ".py", ".rst")
META_FILE = "meta.json"
MAX_LISTED = 1000


def source_path(source: str) -> str:
    """'stdlib' as it is, a file or folder as an absolute path (so a relative source names one place)."""
    return source if source == "stdlib" else os.path.abspath(source)


def stdlib_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True))
    return [f for f in files if not any(part in f.split(os.sep) for part in ("site-packages", "dist-packages"))]


def iter_source_texts(source: str, suffixes=DEFAULT_SUFFIXES, text_field: str = "text"):
    """Yield (name, text) for every document of `source`; see the module docstring."""
    if source == "stdlib":
        paths = stdlib_files()
        if not paths:
            raise ValueError("found no standard-library .py files for this interpreter; pass a folder or a JSONL file")
    elif os.path.isdir(source):
        paths = sorted(
            p for p in glob.glob(os.path.join(source, "**", "*"), recursive=True)
            if os.path.isfile(p) and p.endswith(tuple(suffixes))
        )
        if not paths:
            raise ValueError(f"no files ending in {tuple(suffixes)} under {source!r}")
    elif os.path.isfile(source) and source.endswith(".jsonl"):
        with open(source, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{source}:{line_no} is not valid JSON: {err}") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise ValueError(f"{source}:{line_no} has no string field {text_field!r}")
                yield f"{source}:{line_no}", record[text_field]
        return
    else:
        raise ValueError(f"corpus source must be 'stdlib', a directory or a .jsonl file; got {source!r}")
    for path in paths:
        with open(path, "rb") as f:
            raw = f.read()
        # Files that are not UTF-8 are decoded with replacement characters rather than dropped.
        yield path, raw.decode("utf-8", errors="replace")


def build_corpus(
    out_dir: str,
    source: str = "stdlib",
    tokenizer: str | TextTokenizer = "byte",
    val_fraction: float = 0.02,
    max_documents: int | None = None,
    max_tokens: int | None = None,
    seed: int = 0,
    suffixes=DEFAULT_SUFFIXES,
    text_field: str = "text",
) -> dict:
    """Tokenize `source` once into `out_dir/{train,val}`; returns the metadata written.

    `max_documents` / `max_tokens` stop reading after that many documents / tokens (recorded in the
    metadata as `stopped_early`); whole documents only.
    """
    if not (0.0 < val_fraction < 1.0):
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    tok = tokenizer if isinstance(tokenizer, TextTokenizer) else load_tokenizer(tokenizer)
    docs, names, empty, total = [], [], 0, 0
    stopped_early = False
    for name, text in iter_source_texts(source, suffixes, text_field):
        if max_documents is not None and len(docs) >= max_documents:
            stopped_early = True
            break
        if not text.strip():
            empty += 1  # nothing to learn from; counted in the metadata
            continue
        ids = tok.document(text)
        if max_tokens is not None and total + len(ids) > max_tokens and docs:
            stopped_early = True
            break
        docs.append(ids)
        names.append(name)
        total += len(ids)
    if len(docs) < 2:
        raise ValueError(f"{source!r} gave {len(docs)} non-empty documents; need at least 2 (one for val)")
    order = np.random.default_rng(seed).permutation(len(docs))
    num_val = max(1, int(round(val_fraction * len(docs))))
    splits = {"val": np.sort(order[:num_val]), "train": np.sort(order[num_val:])}
    dtype = np.uint16 if tok.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    metas = {}
    for split, indices in splits.items():
        directory = os.path.join(out_dir, split)
        os.makedirs(directory, exist_ok=True)
        lengths = np.asarray([len(docs[i]) for i in indices], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        with open(os.path.join(directory, "tokens.bin"), "wb") as f:
            for i in indices:
                f.write(docs[i].astype(dtype).tobytes())
        np.save(os.path.join(directory, "docs.npy"), offsets)
        meta = {
            "split": split,
            "source": source,
            "source_path": source_path(source),
            "tokenizer": tok.name,
            "tokenizer_fingerprint": tok.fingerprint,
            "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "pad_id": tok.pad_id,
            "dtype": np.dtype(dtype).name,
            "num_documents": int(len(indices)),
            "num_tokens": int(offsets[-1]),
            "skipped_empty_documents": empty,
            "stopped_early": stopped_early,
            "max_documents": max_documents,
            "max_tokens": max_tokens,
            "seed": seed,
            # The names of the first MAX_LISTED documents only (a big corpus would make meta.json huge).
            "documents": [names[i] for i in indices][:MAX_LISTED],
            "documents_listed": min(len(indices), MAX_LISTED),
            "documents_list_truncated": len(indices) > MAX_LISTED,
        }
        with open(os.path.join(directory, META_FILE), "w") as f:
            json.dump(meta, f, indent=1)
        metas[split] = meta
    return metas


class TokenCorpus:
    """A memory-mapped split written by `build_corpus`: `tokens` (np.memmap) and `offsets` [num_docs + 1]."""

    def __init__(self, directory: str):
        meta_path = os.path.join(directory, META_FILE)
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"no {META_FILE} in {directory!r}: build it with `nosa train --build-corpus` first")
        with open(meta_path) as f:
            self.meta = json.load(f)
        self.directory = directory
        self.tokens = np.memmap(os.path.join(directory, "tokens.bin"), dtype=self.meta["dtype"], mode="r")
        self.offsets = np.load(os.path.join(directory, "docs.npy"))
        if int(self.offsets[-1]) != len(self.tokens):
            raise ValueError(f"{directory}: docs.npy ends at {int(self.offsets[-1])} but tokens.bin holds {len(self.tokens)} tokens")

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    def check_tokenizer(self, tok: TextTokenizer) -> None:
        """Refuse a tokenizer other than the one that built the corpus. Compared by content (see
        TextTokenizer.fingerprint); a corpus written before fingerprints were recorded falls back to the
        name."""
        recorded = self.meta.get("tokenizer_fingerprint")
        same = recorded == tok.fingerprint if recorded is not None else self.meta["tokenizer"] == tok.name
        if not same:
            raise ValueError(
                f"corpus {self.directory!r} was tokenized with {self.meta['tokenizer']!r} but training uses "
                f"{tok.name!r}, a tokenizer with different ids (vocabulary, special ids or encoding); rebuild "
                "the corpus with this tokenizer (`nosa train --build-corpus`) or point corpus_dir elsewhere"
            )
