"""Corpus building from local text, row packing, and document isolation (no leak across documents)."""

import json
import os

import numpy as np
import pytest
import torch

from nosa import NosaConfig, NosaForCausalLM
from nosa.data.corpus import TokenCorpus, build_corpus, stdlib_files
from nosa.data.packing import CorpusRows, MixtureStream, step_row_indices
from nosa.data.tokenization import load_tokenizer

TOK = load_tokenizer("byte")


def _texts(n=12, seed=0):
    rng = np.random.default_rng(seed)
    return [f"document {i}: " + " ".join(["alpha", "beta", "gamma", "delta"][j % 4] for j in rng.integers(0, 4, int(rng.integers(5, 90))))
            for i in range(n)]


@pytest.fixture
def corpus_dir(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i, text in enumerate(_texts()):
        (src / f"doc{i:02d}.txt").write_text(text)
    (src / "empty.txt").write_text("  \n")
    (src / "ignored.bin").write_bytes(b"\x00\x01")
    out = tmp_path / "corpus"
    metas = build_corpus(str(out), str(src), "byte", val_fraction=0.2, seed=1)
    return out, metas


def test_build_from_folder_round_trips(corpus_dir):
    out, metas = corpus_dir
    assert metas["train"]["num_documents"] + metas["val"]["num_documents"] == 12
    assert metas["val"]["num_documents"] == 2 and metas["train"]["skipped_empty_documents"] == 1
    texts = set(_texts())
    for split in ("train", "val"):
        corpus = TokenCorpus(str(out / split))
        for a, b in zip(corpus.offsets[:-1], corpus.offsets[1:]):
            doc = corpus.tokens[a:b]
            assert doc[0] == TOK.bos_id and doc[-1] == TOK.eos_id
            assert TOK.decode(doc[1:-1]) in texts


def test_build_from_jsonl_and_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in _texts(5)) + "\n")
    metas = build_corpus(str(tmp_path / "c"), str(path), "byte", val_fraction=0.2)
    assert metas["train"]["num_documents"] == 4
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        build_corpus(str(tmp_path / "c2"), str(bad), "byte")
    with pytest.raises(ValueError, match="corpus source"):
        build_corpus(str(tmp_path / "c3"), str(tmp_path / "missing"), "byte")
    with pytest.raises(FileNotFoundError, match="build"):
        TokenCorpus(str(tmp_path / "nothing"))


def test_stdlib_is_the_default_source():
    files = stdlib_files()
    assert any(f.endswith(os.sep + "os.py") for f in files)
    assert not any("site-packages" in f.split(os.sep) for f in files)


@pytest.mark.parametrize("isolate", [False, True])
def test_rows_predict_every_token_exactly_once(corpus_dir, isolate):
    out, _ = corpus_dir
    corpus = TokenCorpus(str(out / "train"))
    rows = CorpusRows(corpus, 24, isolate, TOK.pad_id)
    predicted = np.zeros(corpus.num_tokens, dtype=int)
    for j in range(len(rows)):
        ids, labels = rows.row(j)
        start = int(rows.starts[j])
        real = int(rows.ends[j] - rows.starts[j])
        assert (ids[:real] == corpus.tokens[start : start + real]).all()
        assert (labels[real:] == -100).all() and (ids[real:] == TOK.pad_id).all()
        predicted[start + 1 : start + real] += 1
    if isolate:
        firsts = corpus.offsets[:-1]
        expected = np.ones(corpus.num_tokens, dtype=int)
        expected[firsts] = 0  # a document's bos has no context to be predicted from
        assert (predicted == expected).all()
        for j in range(len(rows)):  # each row lies inside one document
            doc = np.searchsorted(corpus.offsets, rows.starts[j], side="right") - 1
            assert rows.ends[j] <= corpus.offsets[doc + 1]
    else:
        assert (predicted[1 : corpus.num_tokens - rows.uncovered_tokens] == 1).all()
        assert rows.summary()["real_token_fraction"] == 1.0


def _tiny_model():
    torch.manual_seed(0)
    config = NosaConfig(vocab_size=264, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, block_size=8, topk_blocks=4, sink_blocks=1, window_blocks=1, query_blocks=1,
                        compress_kernel=8, compress_stride=4)
    model = NosaForCausalLM(config).eval()
    with torch.no_grad():  # a non-zero eviction bias, so the agnostic score matters
        for layer in model.model.layers:
            layer.self_attn.eviction.A.fill_(0.5)
    return model


def test_isolated_rows_compute_what_each_document_computes_alone(corpus_dir):
    """Right padding needs no mask: the real tokens' logits equal those of the document run alone, and
    nothing placed after them (padding or another document) changes them."""
    out, _ = corpus_dir
    corpus = TokenCorpus(str(out / "train"))
    rows = CorpusRows(corpus, 96, True, TOK.pad_id)
    model = _tiny_model()
    short = [j for j in range(len(rows)) if rows.ends[j] - rows.starts[j] < 80][:3]
    assert short, "fixture should have documents shorter than a row"
    with torch.no_grad():
        for j in short:
            ids, _ = rows.row(j)
            real = int(rows.ends[j] - rows.starts[j])
            padded = model(torch.from_numpy(ids)[None]).logits[0, :real]
            alone = model(torch.from_numpy(ids[:real])[None]).logits[0]
            torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)
            other = ids.copy()
            other[real:] = np.random.default_rng(j).integers(0, 256, len(ids) - real)
            torch.testing.assert_close(model(torch.from_numpy(other)[None]).logits[0, :real], alone, rtol=1e-5, atol=1e-5)


def test_packed_rows_do_leak_and_the_check_sees_it(corpus_dir):
    """The contrast that shows the isolation test can fail: in a packed row, the second document's logits
    depend on the first document."""
    out, _ = corpus_dir
    corpus = TokenCorpus(str(out / "train"))
    rows = CorpusRows(corpus, 96, False, TOK.pad_id)
    j = next(j for j in range(len(rows)) if 8 < int(np.argmax(rows.row(j)[0] == TOK.bos_id)) < 80)
    ids, _ = rows.row(j)
    boundary = int(np.argmax(ids == TOK.bos_id))  # a document starts here; another one ends before it
    changed = ids.copy()
    changed[: boundary - 1] = (changed[: boundary - 1] + 1) % 256
    model = _tiny_model()
    with torch.no_grad():
        a = model(torch.from_numpy(ids)[None]).logits[0, boundary:]
        b = model(torch.from_numpy(changed)[None]).logits[0, boundary:]
    assert (a - b).abs().max() > 1e-3


def test_mixture_is_a_function_of_the_row_index(corpus_dir):
    out, _ = corpus_dir
    rows = CorpusRows(TokenCorpus(str(out / "train")), 400, False, TOK.pad_id)
    mixture = {"corpus": 0.5, "passkey": 0.25, "mqar": 0.25}
    stream = MixtureStream(TOK, 400, mixture, rows, {}, seed=3)
    first = stream.batch(range(0, 40))
    again = MixtureStream(TOK, 400, mixture, rows, {}, seed=3).batch(range(20, 40))
    assert torch.equal(first["input_ids"][20:], again["input_ids"])
    assert torch.equal(first["labels"][20:], again["labels"])
    assert set(first["sources"]) == {"corpus", "passkey", "mqar"}
    for row, source in enumerate(first["sources"]):
        labelled = int((first["labels"][row] != -100).sum())
        assert labelled == 400 if source == "corpus" else 0 < labelled < 40
    with pytest.raises(ValueError, match="no corpus"):
        MixtureStream(TOK, 400, mixture, None)
    for weight in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="finite"):
            MixtureStream(TOK, 400, {"passkey": weight, "mqar": 1.0})


def test_row_layout_splits_a_step_identically_over_processes():
    one = list(step_row_indices(64, 0, 8, 1, 0))
    two = list(step_row_indices(64, 0, 4, 2, 0)) + list(step_row_indices(64, 0, 4, 2, 1))
    accum = list(step_row_indices(64, 0, 4, 1, 0)) + list(step_row_indices(64, 1, 4, 1, 0))
    assert one == two == accum == list(range(64, 72))


class _NumberedRows:
    """Stands in for CorpusRows: row j is j repeated, so a row says which one it is."""

    def __init__(self, count):
        self.count = count

    def __len__(self):
        return self.count

    def row(self, j):
        return np.full(16, j, dtype=np.int64), np.full(16, j, dtype=np.int64)


def test_corpus_rows_are_a_permutation_per_epoch_under_a_mixture():
    """The corpus index counts corpus draws only: each epoch of draws reads every corpus row once, and a
    stream started at row n (a resume) reads what the uninterrupted stream read there."""
    rows = _NumberedRows(37)
    mixture = {"corpus": 0.8, "passkey": 0.2}
    stream = MixtureStream(TOK, 16, mixture, rows, {}, seed=5)
    draws = {}  # row n -> corpus row index, for corpus rows only (task rows at length 16 are never generated)
    for n in range(5000):  # crosses the first block of source draws (4096 rows)
        if stream.source_of(n) == "corpus":
            draws[n] = int(stream.example(n)[0][0])
    order = list(draws.values())
    epochs = len(order) // len(rows)
    assert epochs >= 100 and 0.75 < len(order) / 5000 < 0.85
    for e in range(epochs):
        assert sorted(order[e * len(rows):(e + 1) * len(rows)]) == list(range(len(rows)))
    for n in (4095, 4096, 4999):
        n = max(m for m in draws if m <= n)
        assert int(MixtureStream(TOK, 16, mixture, rows, {}, seed=5).example(n)[0][0]) == draws[n]


def _word_level_tokenizer(path, reverse=False):
    """A small transformers tokenizer saved at `path`; `reverse` gives the characters other ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)]
    vocab = {c: i for i, c in enumerate(reversed(chars) if reverse else chars)}
    vocab.update({"<s>": len(vocab), "</s>": len(vocab) + 1, "[UNK]": len(vocab) + 2})
    inner = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<s>", eos_token="</s>", unk_token="[UNK]").save_pretrained(path)


def test_tokenizer_check_compares_content_not_paths(tmp_path):
    _word_level_tokenizer(tmp_path / "tok")
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in _texts(6)) + "\n")
    tok = load_tokenizer(str(tmp_path / "tok"))
    build_corpus(str(tmp_path / "c"), str(jsonl), tok, val_fraction=0.2)
    corpus = TokenCorpus(str(tmp_path / "c" / "train"))
    corpus.check_tokenizer(tok)
    # the same tokenizer saved elsewhere (as a checkpoint saves it) is accepted
    tok.inner.save_pretrained(tmp_path / "ckpt")
    corpus.check_tokenizer(load_tokenizer(str(tmp_path / "ckpt")))
    # a different tokenizer at the original path is refused
    _word_level_tokenizer(tmp_path / "tok", reverse=True)
    with pytest.raises(ValueError, match="rebuild the corpus"):
        corpus.check_tokenizer(load_tokenizer(str(tmp_path / "tok")))
    with pytest.raises(ValueError, match="rebuild the corpus"):
        corpus.check_tokenizer(TOK)


def test_meta_says_when_the_document_list_is_cut(tmp_path, monkeypatch):
    import nosa.data.corpus as corpus_module

    monkeypatch.setattr(corpus_module, "MAX_LISTED", 3)
    src = tmp_path / "src"
    src.mkdir()
    for i, text in enumerate(_texts(10)):
        (src / f"doc{i:02d}.txt").write_text(text)
    metas = build_corpus(str(tmp_path / "c"), str(src), "byte", val_fraction=0.2)
    assert metas["train"]["num_documents"] == 8 and len(metas["train"]["documents"]) == 3
    assert metas["train"]["documents_list_truncated"] and not metas["val"]["documents_list_truncated"]
