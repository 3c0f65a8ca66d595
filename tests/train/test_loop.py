"""The training loop: exact resume, batch-split invariance (accumulation, 2 processes), Llama start,
configuration precedence. float32 on CPU, tiny model, deterministic data."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from nosa.train.config import TrainConfig, make_config
from nosa.data.corpus import build_corpus
from nosa.train.loop import learning_rate, train

MODEL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
             block_size=8, topk_blocks=6, sink_blocks=1, window_blocks=2, query_blocks=2, compress_kernel=8, compress_stride=4)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(0)
    words = "def class return import self value with for while print".split()
    for i in range(30):
        (src / f"f{i}.txt").write_text(" ".join(rng.choice(words, size=int(rng.integers(40, 200)))))
    out = tmp_path_factory.mktemp("corpus")
    build_corpus(str(out), str(src), "byte", val_fraction=0.1)
    return str(out)


def _source(corpus):
    with open(os.path.join(corpus, "train", "meta.json")) as f:
        return json.load(f)["source"]


def _cfg(corpus, out_dir, **kw):
    values = dict(corpus_dir=corpus, corpus_source=_source(corpus), out_dir=str(out_dir), seq_len=192, max_steps=3, micro_batch_size=4, warmup_steps=1,
                  precision="fp32", progress=False, mixture={"corpus": 0.7, "passkey": 0.3}, model=dict(MODEL), seed=1)
    values.update(kw)
    return TrainConfig(**values)


def _losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r and "event" not in r}


def test_resume_reproduces_the_uninterrupted_run(corpus, tmp_path):
    full = _cfg(corpus, tmp_path / "full", max_steps=6, save_every=3, micro_batch_size=2, grad_accum=2, val_every=3)
    train(full, device="cpu")
    resumed = _cfg(corpus, tmp_path / "resumed", max_steps=6, save_every=3, micro_batch_size=2, grad_accum=2, val_every=3)
    summary = train(resumed, resume=str(tmp_path / "full" / "checkpoints" / "step_000003"), device="cpu")
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert sorted(b) == [4, 5, 6]
    assert [a[s] for s in (4, 5, 6)] == [b[s] for s in (4, 5, 6)]  # bit for bit
    assert len(set(a.values())) == 6  # the run really moved
    wa = load_file(str(tmp_path / "full" / "checkpoints" / "step_000006" / "model.safetensors"))
    wb = load_file(os.path.join(summary["final_checkpoint"], "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # resuming in the run's own directory rewinds its metrics to the checkpoint
    train(_cfg(corpus, tmp_path / "full", max_steps=6, save_every=3, micro_batch_size=2, grad_accum=2, val_every=3),
          resume=str(tmp_path / "full" / "checkpoints" / "step_000003"), device="cpu")
    assert _losses(tmp_path / "full") == a
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(_cfg(corpus, tmp_path / "empty"), resume="latest", device="cpu")


def test_accumulation_and_checkpointing_do_not_change_the_step(corpus, tmp_path):
    train(_cfg(corpus, tmp_path / "b4"), device="cpu")
    train(_cfg(corpus, tmp_path / "b2x2", micro_batch_size=2, grad_accum=2, activation_checkpointing=True), device="cpu")
    a, b = _losses(tmp_path / "b4"), _losses(tmp_path / "b2x2")
    assert a.keys() == b.keys() == {1, 2, 3}
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5)
    assert a[3] < a[1]


def _torchrun(config, *extra):
    """`nosa train` in 2 processes; each also fails if its process group's threads outlived the run."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          os.path.join(ROOT, "tests", "train", "train_and_check_teardown.py"),
                          "--config", str(config), "--device", "cpu", *extra],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one_process_with_twice_the_batch(corpus, tmp_path, parallel):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(_cfg(corpus, tmp_path / "two", micro_batch_size=2, parallel=parallel, save_every=2).to_dict()))
    _torchrun(config)
    train(_cfg(corpus, tmp_path / "one", micro_batch_size=4, save_every=2), device="cpu")
    two, one = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert two.keys() == one.keys() == {1, 2, 3}
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5)
    # the saved weights are whole tensors (FSDP gathers its shards) and match the one-process run
    wa = load_file(str(tmp_path / "one" / "checkpoints" / "step_000003" / "model.safetensors"))
    wb = load_file(str(tmp_path / "two" / "checkpoints" / "step_000003" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(wa[k].shape == wb[k].shape for k in wa)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5
    if parallel == "fsdp":  # resume under FSDP: the sharded optimizer state comes back from the full file
        _torchrun(config, "--resume", str(tmp_path / "two" / "checkpoints" / "step_000002"), "--out-dir", str(tmp_path / "again"))
        assert _losses(tmp_path / "again") == {3: two[3]}


def test_llama_start_computes_the_dense_models_loss(corpus, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from nosa.data.packing import CorpusRows, MixtureStream
    from nosa.data.corpus import TokenCorpus
    from nosa.data.tokenization import load_tokenizer

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=264, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512))
    llama.save_pretrained(tmp_path / "llama")
    cfg = _cfg(corpus, tmp_path / "conv", init_from="llama", init_path=str(tmp_path / "llama"), tokenizer="byte",
               max_steps=1, model=dict(block_size=16, topk_blocks=16, window_blocks=2, query_blocks=2, compress_kernel=16, compress_stride=8))
    got = train(cfg, device="cpu")["loss"]
    tok = load_tokenizer("byte")
    rows = CorpusRows(TokenCorpus(os.path.join(corpus, "train")), 192, False, tok.pad_id)
    batch = MixtureStream(tok, 192, cfg.mixture, rows, {}, seed=cfg.seed).batch(range(4))
    with torch.no_grad():
        expected = llama(input_ids=batch["input_ids"], labels=batch["labels"]).loss.item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_time_limit_stops_and_saves(corpus, tmp_path):
    summary = train(_cfg(corpus, tmp_path / "t", max_steps=50, time_limit_s=1e-6), device="cpu")
    assert summary["stopped_by_time_limit"] and summary["step"] == 1
    assert os.path.exists(os.path.join(summary["final_checkpoint"], "model.safetensors"))


def test_schedule():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert learning_rate(0, cfg) == pytest.approx(1e-4)
    assert learning_rate(9, cfg) == pytest.approx(1e-3)
    assert learning_rate(55, cfg) == pytest.approx(0.55e-3)
    assert learning_rate(100, cfg) == pytest.approx(1e-4)


def test_config_precedence_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.001\nseq_len: 512\nmodel: {hidden_size: 128}\n")
    cfg = make_config(str(path), ["lr=0.002", "model.num_hidden_layers=3"], seq_len=256)
    assert (cfg.lr, cfg.seq_len, cfg.model) == (0.002, 256, {"hidden_size": 128, "num_hidden_layers": 3})
    path.write_text("learning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown training options"):
        make_config(str(path))
    with pytest.raises(ValueError, match="unknown mixture sources"):
        TrainConfig(mixture={"wikipedia": 1.0})
    with pytest.raises(ValueError, match="init_path"):
        TrainConfig(init_from="llama")
    with pytest.raises(ValueError, match="seq_len"):
        TrainConfig(seq_len=0)
    with pytest.raises(ValueError, match="key=value"):
        make_config(None, ["lr"])


def test_activation_checkpointing_reaches_every_layer():
    from nosa import NosaConfig, NosaForCausalLM
    from nosa.train.loop import enable_activation_checkpointing

    model = NosaForCausalLM(NosaConfig(**MODEL))
    assert not any(layer.gradient_checkpointing for layer in model.model.layers)
    enable_activation_checkpointing(model)
    assert all(layer.gradient_checkpointing for layer in model.model.layers)


def test_numbers_written_as_text_are_converted_and_every_field_is_checked(tmp_path):
    # PyYAML reads 1e-3 (no dot) as a string: the help text's own example must work
    assert make_config(None, ["lr=1e-3"]).lr == 1e-3
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\ncorpus_max_tokens: 1e6\nmin_lr_ratio: 5e-2\n")
    cfg = make_config(str(path))
    assert (cfg.lr, cfg.corpus_max_tokens, cfg.min_lr_ratio) == (1e-3, 1_000_000, 0.05)
    assert isinstance(cfg.corpus_max_tokens, int)
    bad = {"time_limit_s=abc": "time_limit_s", "min_lr_ratio=abc": "min_lr_ratio", "beta1=2": "beta1",
           "beta2=1": "beta2", "eps=-1": "eps", "corpus_max_tokens=-5": "corpus_max_tokens",
           "corpus_max_tokens=1.5": "corpus_max_tokens", "isolate_documents=maybe": "isolate_documents",
           "progress=maybe": "progress", "lr=.nan": "lr", "seed=-1": "seed", "max_steps=true": "max_steps",
           "grad_clip=-0.5": "grad_clip", "out_dir=3": "out_dir", "task_params.mqar=4": "task_params.mqar"}
    for assignment, name in bad.items():
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            make_config(None, [assignment])


def test_misspelt_model_fields_are_refused():
    with pytest.raises(ValueError, match="hiden_size.*hidden_size"):
        make_config(None, ["model.hiden_size=128"])
    assert make_config(None, ["model.hidden_size=128"]).model == {"hidden_size": 128}


def test_dotted_mixture_override_merges_with_the_default(tmp_path):
    assert make_config(None, ["mixture.passkey=0.2"]).mixture == {"corpus": 1.0, "passkey": 0.2}
    path = tmp_path / "c.yaml"
    path.write_text("mixture: {corpus: 0.5, mqar: 0.5}\n")
    assert make_config(str(path), ["mixture.passkey=0.2"]).mixture == {"corpus": 0.5, "mqar": 0.5, "passkey": 0.2}


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), -1.0, "x"])
def test_mixture_weights_must_be_finite_and_non_negative(weight):
    with pytest.raises(ValueError, match="mixture.passkey"):
        TrainConfig(mixture={"corpus": 1.0, "passkey": weight})
    with pytest.raises(ValueError, match="not all 0"):
        TrainConfig(mixture={"corpus": 0.0})


def test_validation_rows_do_not_depend_on_how_the_batch_is_split(corpus, monkeypatch):
    """2 processes x b=1 evaluate the same rows as 1 process x b=2 (two simulated ranks, their sums added)."""
    import nosa.train.loop as loop
    from nosa import NosaConfig, NosaForCausalLM
    from nosa.data.corpus import TokenCorpus
    from nosa.train.distributed import DistInfo
    from nosa.data.packing import CorpusRows

    rows = CorpusRows(TokenCorpus(os.path.join(corpus, "val")), 64, False, 0)
    assert len(rows) >= 8
    totals = []
    monkeypatch.setattr(loop, "all_reduce_sum", lambda t, info: totals.append(t.clone()) or t)
    torch.manual_seed(0)
    model = NosaForCausalLM(NosaConfig(**MODEL)).float()
    cpu = torch.device("cpu")
    two = _cfg(corpus, "unused", seq_len=64, micro_batch_size=1, val_batches=2)
    for rank in (0, 1):
        loop.validation_loss(model, rows, two, DistInfo(rank, 2, rank, cpu))
    split = totals[0] + totals[1]
    totals.clear()
    loop.validation_loss(model, rows, _cfg(corpus, "unused", seq_len=64, micro_batch_size=2, val_batches=2), DistInfo(0, 1, 0, cpu))
    assert float(split[1]) == float(totals[0][1]) == 4 * 63
    assert float(split[0]) == pytest.approx(float(totals[0][0]), rel=1e-6)


def test_every_process_runs_the_same_number_of_validation_forwards(corpus, monkeypatch):
    """Under FSDP each forward is a collective: with fewer rows than world x micro-batch x val_batches, the
    processes whose turn the rows do not reach must still run a forward (adding nothing), or the others hang."""
    import nosa.train.loop as loop
    from nosa import NosaConfig, NosaForCausalLM
    from nosa.data.corpus import TokenCorpus
    from nosa.train.distributed import DistInfo
    from nosa.data.packing import CorpusRows

    rows = CorpusRows(TokenCorpus(os.path.join(corpus, "val")), 64, False, 0)
    available = len(rows)
    world, mb = 5, 2
    assert 0 < available % (world * mb) <= mb * (world - 1), available  # the last round ends before the last rank's turn
    forwards, totals = {}, []
    real_loss_sum = loop.token_loss_sum
    monkeypatch.setattr(loop, "all_reduce_sum", lambda t, info: totals.append(t.clone()) or t)
    torch.manual_seed(0)
    model = NosaForCausalLM(NosaConfig(**MODEL)).float()
    cpu = torch.device("cpu")
    cfg = _cfg(corpus, "unused", seq_len=64, micro_batch_size=mb, val_batches=10 ** 6)  # more than the split holds
    for rank in range(world):
        monkeypatch.setattr(loop, "token_loss_sum", lambda *a, rank=rank: forwards.update({rank: forwards.get(rank, 0) + 1}) or real_loss_sum(*a))
        loop.validation_loss(model, rows, cfg, DistInfo(rank, world, rank, cpu))
    assert len(set(forwards.values())) == 1 and forwards[0] == -(-available // (world * mb)), forwards
    split = sum(totals)
    totals.clear()
    loop.validation_loss(model, rows, _cfg(corpus, "unused", seq_len=64, micro_batch_size=available, val_batches=1), DistInfo(0, 1, 0, cpu))
    assert float(split[1]) == float(totals[0][1]) == available * 63  # every row counted once, the repeats not at all
    assert float(split[0]) == pytest.approx(float(totals[0][0]), rel=1e-6)


def test_no_validation_needs_no_val_split(corpus, tmp_path):
    import shutil

    small = tmp_path / "corpus"
    shutil.copytree(corpus, small)
    val = small / "val"  # a val split too short for one row
    np.asarray([1, 2, 3, 4, 5], dtype=np.uint16).tofile(val / "tokens.bin")
    np.save(val / "docs.npy", np.asarray([0, 5], dtype=np.int64))
    summary = train(_cfg(str(small), tmp_path / "run", max_steps=1, mixture={"corpus": 1.0}), device="cpu")
    assert summary["step"] == 1
    with pytest.raises(ValueError, match="val_every=1 needs validation rows"):
        train(_cfg(str(small), tmp_path / "run2", max_steps=1, val_every=1), device="cpu")


def test_an_existing_corpus_dir_must_match_the_source(corpus, tmp_path):
    with pytest.raises(ValueError, match="corpus_source.*stdlib.*--build-corpus"):
        train(_cfg(corpus, tmp_path / "a", corpus_source="stdlib", max_steps=1), device="cpu")
    with pytest.raises(ValueError, match="corpus_max_tokens None.*1000"):
        train(_cfg(corpus, tmp_path / "b", corpus_max_tokens=1000, max_steps=1), device="cpu")


def test_tasks_of_the_mixture_are_checked_before_training(corpus, tmp_path):
    out = tmp_path / "t"
    with pytest.raises(ValueError, match=r"task_params\.mqar"):
        train(_cfg(corpus, out, mixture={"corpus": 0.5, "mqar": 0.5}, task_params={"mqar": {"num_queries": 20}}), device="cpu")
    with pytest.raises(ValueError, match="'passkey'.*seq_len=32"):
        train(_cfg(corpus, out, seq_len=32), device="cpu")
    assert not out.exists()


def _mtimes(out_dir):
    root = os.path.join(out_dir, "checkpoints")
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(root) for f in fs}


def test_resume_refuses_changes_that_break_it_and_logs_the_others(corpus, tmp_path):
    base = dict(max_steps=2, save_every=1, micro_batch_size=2)
    train(_cfg(corpus, tmp_path / "run", **base), device="cpu")
    step1 = str(tmp_path / "run" / "checkpoints" / "step_000001")
    for change, name in ((dict(seed=2), "seed"), (dict(micro_batch_size=1), "rows_per_step"), (dict(max_steps=3), "max_steps"),
                         (dict(mixture={"corpus": 1.0}), "mixture"), (dict(lr=1e-3), "lr"),
                         (dict(mixture={"passkey": 0.3, "corpus": 0.7}), "mixture")):  # same weights, other order: other rows
        with pytest.raises(ValueError, match=f"cannot resume.*{name}"):
            train(_cfg(corpus, tmp_path / "other", **{**base, **change}), resume=step1, device="cpu")
    # the same global batch split differently (1 x 2 x accum 1 -> 1 x 1 x accum 2) and harmless fields are fine
    summary = train(_cfg(corpus, tmp_path / "other", **{**base, "micro_batch_size": 1, "grad_accum": 2, "log_every": 5,
                                                        "time_limit_s": 600.0}), resume=step1, device="cpu")
    assert summary["step"] == 2
    with open(tmp_path / "other" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    resumed = [r for r in records if r.get("event") == "resume"]
    assert len(resumed) == 1 and resumed[0]["step"] == 1 and resumed[0]["from"] == step1
    assert {"log_every", "time_limit_s", "micro_batch_size", "grad_accum", "out_dir"} <= set(resumed[0]["changed"])
    # a finished run: nothing is trained or saved again
    before = _mtimes(tmp_path / "run")
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    summary = train(_cfg(corpus, tmp_path / "run", **base), resume="latest", device="cpu")
    assert summary["already_finished"] and "already at max_steps=2" in summary["message"]
    assert summary["loss"] == _losses(tmp_path / "run")[2]
    assert _mtimes(tmp_path / "run") == before and (tmp_path / "run" / "metrics.jsonl").read_text() == metrics


def test_a_new_run_does_not_reuse_an_out_dir_with_checkpoints(corpus, tmp_path):
    out = tmp_path / "run"
    train(_cfg(corpus, out, max_steps=2, save_every=1), device="cpu")
    with pytest.raises(ValueError, match="--overwrite"):
        train(_cfg(corpus, out, max_steps=1), device="cpu")
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step_000001", "step_000002"]
    train(_cfg(corpus, out, max_steps=1), device="cpu", overwrite=True)
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step_000001"]
    assert (out / "checkpoints" / "latest").read_text() == "step_000001"


@pytest.mark.parametrize("task_loss", ["answer", "full"])
def test_the_log_follows_the_task_answers_apart_from_the_row(corpus, tmp_path, task_loss):
    from nosa.data.packing import CorpusRows, MixtureStream
    from nosa.data.corpus import TokenCorpus
    from nosa.data.tokenization import load_tokenizer

    cfg = _cfg(corpus, tmp_path / task_loss, max_steps=1, log_every=1, task_loss=task_loss, tokenizer="byte",
               mixture={"corpus": 0.25, "passkey": 0.75})
    train(cfg, device="cpu")
    with open(tmp_path / task_loss / "metrics.jsonl") as f:
        record = [r for r in map(json.loads, f) if r.get("step") == 1 and "event" not in r][0]
    tok = load_tokenizer("byte")
    rows = CorpusRows(TokenCorpus(os.path.join(corpus, "train")), 192, False, tok.pad_id)
    batch = MixtureStream(tok, 192, cfg.mixture, rows, {}, seed=cfg.seed, full_task_loss=task_loss == "full").batch(range(4))
    for row, source in enumerate(batch["sources"]):  # the mask marks exactly the answer tokens of task rows
        mask = batch["answer_mask"][row]
        if source == "corpus":
            assert not mask.any()
        else:
            assert 0 < int(mask.sum()) < 20 and (batch["labels"][row][mask] == batch["input_ids"][row][mask]).all()
    assert "passkey" in batch["sources"] and set(record["answer_nll_by_source"]) == {"passkey"}
    assert 0.0 <= record["answer_token_acc_by_source"]["passkey"] <= 1.0
    if task_loss == "answer":  # every label of a passkey row is an answer token: the two logs agree
        assert record["answer_nll_by_source"]["passkey"] == pytest.approx(record["loss_by_source"]["passkey"], rel=1e-6)
    else:  # the row's loss also covers the haystack, which a random model predicts no better than the answer
        assert record["answer_nll_by_source"]["passkey"] != pytest.approx(record["loss_by_source"]["passkey"], rel=1e-3)


def test_a_signal_on_every_one_of_ten_processes_still_stops_as_a_signal(corpus, tmp_path, monkeypatch):
    """The stop flags are summed over processes; with ten processes all signalled (simulated by scaling the
    sum by 10), the stop must still read as a signal, not as the answer target or a time limit."""
    import signal
    import nosa.train.loop as loop
    from nosa.train.distributed import DistInfo
    from nosa.train.interrupt import StopRequest

    monkeypatch.setattr(loop, "all_reduce_sum", lambda t, info: t.mul_(10))  # ten identical processes
    stop = StopRequest()
    stop.signum = signal.SIGTERM
    cfg = _cfg(corpus, tmp_path / "run", max_steps=5, val_every=0)
    summary = loop._train(cfg, None, DistInfo(0, 1, 0, torch.device("cpu")), stop_request=stop)
    assert summary["step"] == 1 and summary["stopped_by_signal"] == "SIGTERM"
    assert not summary.get("stopped_by_answer_target") and not summary.get("stopped_by_time_limit")
