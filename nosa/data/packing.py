"""Fixed-length training rows from a corpus, and the corpus + synthetic-task mixture.

Two ways to cut a corpus into rows of `seq_len` tokens (the model shifts labels itself, so a row of L
tokens carries L - 1 predictions; consecutive rows overlap by one token so every token after a row's
first is predicted exactly once):

* packed (isolate_documents=False): documents are concatenated ([bos] doc [eos] [bos] doc ...) and cut
  every L - 1 tokens. No padding; attention crosses document boundaries, as in most pretraining.
* isolated (isolate_documents=True): each row holds one piece of one document (documents longer than L
  are cut into pieces overlapping by one token), right-padded with the pad id and label -100. The model
  takes no document mask (its attention_mask allows one contiguous run per row), so isolation is by
  construction: a row never holds two documents. Right padding needs no attention mask at all: attention,
  block selection and the eviction scores of token t only read tokens <= t, so the real tokens compute
  exactly what the document alone computes (tests/train/test_packing.py checks this equality).

Every row is a pure function of its global index n, so the data position saved in a checkpoint is one
integer (rows consumed) and a resumed run sees the same rows as an uninterrupted one, under any number
of processes.
"""

from __future__ import annotations

import numpy as np
import torch

from nosa.data.corpus import TokenCorpus
from nosa.data.tasks import TASKS, generate_task
from nosa.data.tokenization import TextTokenizer


class CorpusRows:
    """Rows of `seq_len` tokens of a TokenCorpus: row(j) -> (input_ids int64 [L], labels int64 [L])."""

    def __init__(self, corpus: TokenCorpus, seq_len: int, isolate_documents: bool, pad_id: int):
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        self.corpus, self.seq_len, self.isolate, self.pad_id = corpus, seq_len, isolate_documents, pad_id
        stride = seq_len - 1
        if isolate_documents:
            starts, ends = [], []
            for a, b in zip(corpus.offsets[:-1].tolist(), corpus.offsets[1:].tolist()):
                for start in range(a, b - 1, stride):
                    starts.append(start)
                    ends.append(min(start + seq_len, b))
            self.starts = np.asarray(starts, dtype=np.int64)
            self.ends = np.asarray(ends, dtype=np.int64)
            self.uncovered_tokens = 0
        else:
            total = corpus.num_tokens
            count = (total - seq_len) // stride + 1 if total >= seq_len else 0
            self.starts = np.arange(count, dtype=np.int64) * stride
            self.ends = self.starts + seq_len
            # The tail shorter than one row is not used; said here and in the run's data summary.
            self.uncovered_tokens = int(total - (self.ends[-1] if count else 0))
        if len(self.starts) == 0:
            raise ValueError(
                f"corpus {corpus.directory!r} ({corpus.num_tokens} tokens) gives no row of seq_len={seq_len}; "
                "use a shorter seq_len or a larger corpus"
            )

    def __len__(self) -> int:
        return len(self.starts)

    def row(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = int(self.starts[j]), int(self.ends[j])
        ids = np.full(self.seq_len, self.pad_id, dtype=np.int64)
        ids[: end - start] = self.corpus.tokens[start:end]
        labels = np.full(self.seq_len, -100, dtype=np.int64)
        labels[: end - start] = ids[: end - start]
        return ids, labels

    def summary(self) -> dict:
        lengths = self.ends - self.starts
        return {
            "rows": len(self),
            "isolate_documents": self.isolate,
            "real_token_fraction": float(lengths.sum() / (len(self) * self.seq_len)),
            "uncovered_tokens": self.uncovered_tokens,
        }


SOURCE_BLOCK = 4096  # rows whose sources are drawn together (one generator call per block)


class MixtureStream:
    """Row n of the training stream: its source is drawn with `mixture` weights (the uniform draws of
    rows [k*SOURCE_BLOCK, (k+1)*SOURCE_BLOCK) come from one generator seeded by (seed, 2, k)); corpus rows
    follow a seeded permutation per epoch, indexed by the number of corpus draws before row n, so every
    epoch reads each corpus row exactly once whatever the mixture; task rows are generated at seq_len
    from a generator seeded by (seed, 0, n) with a uniform random needle depth, labelled on their answers
    only or (full_task_loss) on every token.

    The count of corpus draws before row n is a prefix sum over blocks (cached), so any row, the first
    one after a resume included, is computed from n alone in O(n / SOURCE_BLOCK) block draws."""

    def __init__(self, tok: TextTokenizer, seq_len: int, mixture: dict, corpus_rows: CorpusRows | None = None,
                 task_params: dict | None = None, seed: int = 0, full_task_loss: bool = False):
        self.tok, self.seq_len, self.seed = tok, seq_len, seed
        self.full_task_loss = full_task_loss  # task rows labelled on every token (TaskSample.labels(full=True))
        self.sources = [s for s, w in mixture.items() if w > 0]
        for source in self.sources:
            if source != "corpus" and source not in TASKS:
                raise ValueError(f"unknown mixture source {source!r}")
        if "corpus" in self.sources and corpus_rows is None:
            raise ValueError("the mixture draws from the corpus but no corpus was given")
        weights = np.asarray([mixture[s] for s in self.sources], dtype=np.float64)
        given = np.asarray(list(mixture.values()), dtype=np.float64)
        if not np.isfinite(given).all() or (given < 0).any() or weights.sum() <= 0:
            # inf would make every draw pick one source and NaN would drop its source silently;
            # TrainConfig refuses them too, this guards direct use.
            raise ValueError(f"mixture weights must be finite, >= 0 and not all 0, got {mixture}")
        self.cumulative = np.cumsum(weights / weights.sum())
        self.corpus_rows = corpus_rows
        self.corpus_code = self.sources.index("corpus") if "corpus" in self.sources else -1
        self.task_params = task_params or {}
        self._perm_epoch, self._perm = -1, None
        self._block_index, self._block = -1, None
        self._corpus_before_block = [0]  # corpus draws in rows [0, k * SOURCE_BLOCK), for k = 0, 1, ...

    def _source_block(self, k: int) -> np.ndarray:
        """Source index (into self.sources) of every row of block k."""
        if k != self._block_index:
            draws = np.random.default_rng([self.seed, 2, k]).random(SOURCE_BLOCK)
            codes = np.searchsorted(self.cumulative, draws, side="right").clip(max=len(self.sources) - 1)
            self._block_index, self._block = k, codes
        return self._block

    def source_of(self, n: int) -> str:
        return self.sources[int(self._source_block(n // SOURCE_BLOCK)[n % SOURCE_BLOCK])]

    def corpus_draws_before(self, n: int) -> int:
        """How many of rows [0, n) are corpus rows."""
        k, offset = divmod(n, SOURCE_BLOCK)
        while len(self._corpus_before_block) <= k:
            j = len(self._corpus_before_block) - 1
            self._corpus_before_block.append(
                self._corpus_before_block[-1] + int((self._source_block(j) == self.corpus_code).sum()))
        return self._corpus_before_block[k] + int((self._source_block(k)[:offset] == self.corpus_code).sum())

    def _corpus_index(self, draw: int) -> int:
        """The corpus row of the draw-th corpus draw: a seeded permutation of the rows per epoch."""
        count = len(self.corpus_rows)
        epoch = draw // count
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, 1, epoch]).permutation(count)
            self._perm_epoch = epoch
        return int(self._perm[draw % count])

    def example(self, n: int) -> tuple[np.ndarray, np.ndarray, str, np.ndarray]:
        """(input_ids, labels, source, answer): answer is True at the task's answer tokens (all False for
        corpus rows), so the training log can follow the answers apart from the rest of a full-loss row."""
        source = self.source_of(n)
        if source == "corpus":
            ids, labels = self.corpus_rows.row(self._corpus_index(self.corpus_draws_before(n)))
            return ids, labels, source, np.zeros(len(ids), dtype=bool)
        rng = np.random.default_rng([self.seed, 0, n])
        sample = generate_task(source, self.tok, rng, self.seq_len, float(rng.random()), **self.task_params.get(source, {}))
        answer = np.zeros(len(sample.input_ids), dtype=bool)
        for start, end in sample.answer_spans:
            answer[start:end] = True
        return (np.asarray(sample.input_ids, dtype=np.int64), np.asarray(sample.labels(full=self.full_task_loss), dtype=np.int64),
                source, answer)

    def batch(self, indices) -> dict:
        """{'input_ids': [B, L] int64, 'labels': [B, L] int64, 'sources': [str], 'answer_mask': [B, L] bool}
        for global row indices."""
        rows = [self.example(int(n)) for n in indices]
        return {
            "input_ids": torch.from_numpy(np.stack([r[0] for r in rows])),
            "labels": torch.from_numpy(np.stack([r[1] for r in rows])),
            "sources": [r[2] for r in rows],
            "answer_mask": torch.from_numpy(np.stack([r[3] for r in rows])),
        }


def step_row_indices(rows_before: int, micro_step: int, micro_batch: int, world: int, rank: int) -> range:
    """Global row indices of one rank's micro-batch: the step's rows are laid out micro-step by micro-step,
    rank by rank, so W processes x batch b read exactly the rows of 1 process x batch W*b."""
    first = rows_before + micro_step * world * micro_batch + rank * micro_batch
    return range(first, first + micro_batch)
