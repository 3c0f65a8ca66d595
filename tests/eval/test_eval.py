"""nosa eval: scoring rules checked against known answers, locality against the spec's bound, and the
command end to end on a tiny saved model."""

import json
import os
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from nosa import NosaConfig, NosaForCausalLM
from nosa.cli import main
from nosa.eval.locality import decode_locality
from nosa.eval.perplexity import perplexity_by_position
from nosa.eval.tasks import answer_hits, evaluate_tasks
from nosa.tokenizer import ByteTokenizer
from nosa.data.corpus import TokenCorpus, build_corpus
from nosa.data.packing import CorpusRows
from nosa.data.tasks import generate_task
from nosa.data.tokenization import load_tokenizer
from tests.helpers import cli_error

TOK = load_tokenizer("byte")


class Oracle(nn.Module):
    """Predicts the true next token of the sequence it was given (optionally wrong at one position)."""

    def __init__(self, truth: torch.Tensor, wrong_at: int | None = None):
        super().__init__()
        self.truth, self.wrong_at = truth, wrong_at

    def forward(self, input_ids, use_cache=False, logits_to_keep=0):
        nxt = torch.roll(self.truth, -1, dims=1)
        if self.wrong_at is not None:
            nxt[:, self.wrong_at - 1] = (nxt[:, self.wrong_at - 1] + 1) % 256
        logits = torch.nn.functional.one_hot(nxt, 264).float()
        return CausalLMOutputWithPast(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def test_answer_scoring_uses_the_right_positions():
    sample = generate_task("mqar", TOK, np.random.default_rng(0), 500, 0.5)
    truth = torch.tensor([sample.input_ids])
    assert answer_hits(Oracle(truth), [sample], "cpu") == [[True] * 4]
    second = sample.answer_spans[1]
    assert answer_hits(Oracle(truth, wrong_at=second[1] - 1), [sample], "cpu") == [[True, False, True, True]]
    # an error just before the answer (in the question) does not count against it
    assert answer_hits(Oracle(truth, wrong_at=second[0] - 1), [sample], "cpu") == [[True] * 4]


def _tiny(attn_mode="nosa", a_value=0.5):
    torch.manual_seed(0)
    config = NosaConfig(vocab_size=264, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, block_size=8, topk_blocks=6, sink_blocks=1, window_blocks=1, query_blocks=2,
                        compress_kernel=8, compress_stride=4, attn_mode=attn_mode)
    model = NosaForCausalLM(config).eval()
    if config.sparse.uses_eviction_head:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.eviction.A.fill_(a_value)
    return model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(1)
    for i in range(12):
        (src / f"f{i}.txt").write_text(" ".join(rng.choice("one two three four five six".split(), size=120)))
    out = tmp_path_factory.mktemp("corpus")
    build_corpus(str(out), str(src), "byte", val_fraction=0.25)
    return str(out)


def test_perplexity_matches_the_models_own_loss(corpus):
    model = _tiny()
    rows = CorpusRows(TokenCorpus(os.path.join(corpus, "val")), 128, False, TOK.pad_id)
    result = perplexity_by_position(model, rows, 3, 2, 4, "cpu")
    batch = torch.stack([torch.from_numpy(rows.row(j)[0]) for j in range(3)])
    with torch.no_grad():
        expected = model(batch, labels=batch).loss.item()
    assert result["nll"] == pytest.approx(expected, rel=1e-5)
    assert sum(b["tokens"] for b in result["buckets"]) == result["tokens"] == 3 * 127
    assert [b["start"] for b in result["buckets"]][0] == 1 and result["buckets"][-1]["end"] == 128
    with pytest.raises(ValueError, match="num_buckets"):
        perplexity_by_position(model, rows, 3, 2, 200, "cpu")


@pytest.mark.parametrize("attn_mode", ["nosa", "dma"])
def test_decode_locality_keeps_the_bound(attn_mode):
    model = _tiny(attn_mode)
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 130)))
    result = decode_locality(model, ids, 90, "cpu")
    quota = 2 if attn_mode == "nosa" else 0
    assert result["violations"] == 0
    assert result["visible_blocks_first_step"] > model.config.topk_blocks  # really sparse
    for layer in result["per_layer"]:
        assert layer["new_blocks_max_within_block"] <= quota
        assert layer["new_blocks_max_at_boundary"] <= quota + 1
    assert result["overlap_min"] >= (6 - quota - 1) / 6 - 1e-6
    # the log was recorded from decode steps only: one entry per step after the first
    assert result["decode_steps"] == 40


def test_locality_is_measured_not_assumed():
    """infllmv2 (all free slots query-aware) has no bound; random weights move its selection more."""
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 130)))
    free = decode_locality(_tiny("infllmv2"), ids, 90, "cpu")
    assert free["overlap_bound"] is None and "violations" not in free
    assert free["new_blocks_max"] > 0
    with pytest.raises(ValueError, match="dense"):
        decode_locality(_tiny("dense"), ids, 90, "cpu")


def test_task_eval_grid():
    results = evaluate_tasks(_tiny(), TOK, ["passkey", "mqar"], [300], [0.0, 1.0], 2, "cpu", batch_size=2)
    for task in ("passkey", "mqar"):
        assert len(results[task]["grid"]) == 2 and set(results[task]["by_depth"]) == {"0.0", "1.0"}
        assert 0.0 <= results[task]["accuracy"] <= 1.0
    assert results["mqar"]["by_length"]["300"]["answers"] == 2 * 2 * 4


def test_nosa_eval_end_to_end(corpus, tmp_path):
    model = _tiny()
    model.save_pretrained(tmp_path / "m")
    ByteTokenizer().save_pretrained(tmp_path / "m")
    out = tmp_path / "ev" / "r.json"
    code = main(["eval", "--model", str(tmp_path / "m"), "--corpus-dir", corpus, "--ppl-len", "128", "--ppl-rows", "2",
                 "--ppl-buckets", "4", "--tasks", "passkey,variable_tracking", "--lengths", "400", "--depths", "0.5",
                 "--samples", "1", "--locality-prompt", "100", "--locality-steps", "12", "--out", str(out), "--device", "cpu"])
    assert code == 0
    result = json.loads(out.read_text())
    assert {"machine", "parameters", "perplexity", "tasks", "locality", "timings_s"} <= set(result)
    assert len(result["perplexity"]["buckets"]) == 4
    assert set(result["tasks"]) == {"passkey", "variable_tracking"}
    # a sparse model: where its selection held the pass key's block, per layer (2 layers)
    sources = result["tasks"]["passkey"]["by_length"]["400"]["source_selection"]
    assert sources["answer_tokens"] == 5 and len(sources["selected_by_layer"]) == 2
    assert result["tasks"]["variable_tracking"]["by_length"]["400"]["source_selection"]["answers_without_source"] == 1
    assert len(result["locality"]["per_layer"]) == 2
    assert os.path.getsize(tmp_path / "ev" / "r.png") > 1000


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for mode in ("nosa", "dense"):
        _tiny(mode).save_pretrained(root / mode)
        ByteTokenizer().save_pretrained(root / mode)
    return root


def test_a_missing_model_directory_fails_without_the_hub(tmp_path, capsys):
    for missing in (tmp_path / "nope", tmp_path):  # no such folder; a folder without config.json
        assert "--model" in cli_error(["eval", "--model", str(missing), "--out", str(tmp_path / "r.json"), "--device", "cpu"], capsys)
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size"),
    (["--samples", "0"], "--samples"),
    (["--task-params", "[1]"], "--task-params"),
    (["--task-params", '{"mqar": 3}'], "--task-params"),
    (["--task-params", '{"nope": {}}'], "--task-params names unknown"),
    (["--tasks", "passkey,foo"], "--tasks"),
    (["--lengths", "a,b"], "--lengths"),
    (["--depths", "0,2"], "--depths"),
    (["--tasks", "passkey", "--lengths", "20"], "--lengths 20"),
    (["--tasks", "mqar", "--lengths", "300", "--task-params", '{"mqar": {"num_queries": 20}}'], "--task-params"),
    (["--tasks", "", "--locality-prompt", "10", "--locality-steps", "1"], "--locality-steps"),
    (["--tasks", "", "--locality-prompt", "10", "--locality-steps", "2"], r"--locality-prompt \+ --locality-steps = 12 tokens"),
    (["--tasks", "", "--locality-prompt", "0", "--ppl-len", "100000", "CORPUS"], "--ppl-len 100000"),
    (["--tasks", "", "--ppl-len", "64", "--locality-prompt", "100000", "CORPUS"], r"--locality-prompt \+ --locality-steps"),
    (["--tasks", "passkey", "--lengths", "1000,100000"], "--lengths 100000 exceeds the model's max_position_embeddings=65536"),
])
def test_eval_flags_are_checked_before_any_part_runs(saved_models, corpus, tmp_path, flags, message, capsys):
    if "CORPUS" in flags:
        flags = [f for f in flags if f != "CORPUS"] + ["--corpus-dir", corpus]
    out = tmp_path / "r.json"
    assert re.search(message, cli_error(["eval", "--model", str(saved_models / "nosa"), "--out", str(out), "--device", "cpu", *flags], capsys))
    assert not out.exists()


def test_skipped_parts_are_recorded_with_the_reason(saved_models, tmp_path):
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(saved_models / "dense"), "--tasks", "", "--locality-prompt", "100",
                 "--out", str(out), "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert set(result["skipped"]) == {"perplexity", "tasks", "locality"}
    assert "dense" in result["skipped"]["locality"] and "--corpus-dir" in result["skipped"]["perplexity"]
    assert "no eval results to plot" in result["plot_error"] and not os.path.exists(tmp_path / "r.png")
    assert main(["eval", "--model", str(saved_models / "nosa"), "--tasks", "passkey", "--lengths", "300", "--depths", "0.5",
                 "--samples", "1", "--locality-prompt", "0", "--out", str(out), "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert result["skipped"]["locality"] == "--locality-prompt 0" and "tasks" in result
