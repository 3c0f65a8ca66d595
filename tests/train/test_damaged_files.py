"""Damaged or missing files name themselves and what to do: model weights, optimizer state, trainer
state, an empty directory. Through the `nosa` command where a user meets them."""

import shutil

import pytest

from nosa.models import NosaForCausalLM
from nosa.models.loading import check_model_directory
from nosa.train.config import TrainConfig
from nosa.train.loop import train
from tests.helpers import cli_error, tiny_model

MODEL = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=48,
             block_size=8, topk_blocks=6, sink_blocks=1, window_blocks=2, query_blocks=2, compress_kernel=8, compress_stride=4)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(out_dir=str(out), seq_len=160, max_steps=2, save_every=1, micro_batch_size=2, warmup_steps=1,
                      precision="fp32", progress=False, mixture={"passkey": 1.0}, model=dict(MODEL), val_every=0),
          device="cpu")
    return out


def _resume_args(run, checkpoint):
    return ["train", "--out-dir", str(run), "--seq-len", "160", "--max-steps", "2", "--micro-batch-size", "2",
            "--warmup-steps", "1", "--precision", "fp32", "--no-progress", "--set", "mixture={passkey: 1.0}",
            "--set", "val_every=0", "--set", "save_every=1", *sum((["--set", f"model.{k}={v}"] for k, v in MODEL.items()), []),
            "--resume", str(checkpoint), "--device", "cpu"]


def _copy(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    return run, run / "checkpoints" / "step_000001"


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_resume_of_an_intact_copy_works(run_dir, tmp_path, capsys):
    from nosa.cli import main

    run, checkpoint = _copy(run_dir, tmp_path)
    assert main(_resume_args(run, checkpoint)) == 0


@pytest.mark.parametrize("file, damage, message", [
    ("model.safetensors", lambda p: _truncate(p), "model.safetensors is damaged or truncated"),
    ("model.safetensors", lambda p: p.write_bytes(b"\xff" * 64), "model.safetensors is damaged or truncated"),
    ("optimizer.pt", lambda p: _truncate(p), "optimizer.pt is damaged or truncated"),
    ("optimizer.pt", lambda p: p.unlink(), "optimizer.pt is missing"),
    ("trainer_state.json", lambda p: _truncate(p), "trainer_state.json is damaged or truncated"),
    ("trainer_state.json", lambda p: p.write_text("{}"), "trainer_state.json is damaged or truncated"),
    ("config.json", lambda p: _truncate(p), "config.json is not valid JSON"),
])
def test_damaged_checkpoint_files_are_named(run_dir, tmp_path, capsys, file, damage, message):
    run, checkpoint = _copy(run_dir, tmp_path)
    damage(checkpoint / file)
    err = cli_error(_resume_args(run, checkpoint), capsys)
    assert message in err and str(checkpoint) in err


def test_an_empty_directory_reports_the_missing_config_first(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        NosaForCausalLM.from_pretrained(tmp_path)
    assert "holds no config.json" in cli_error(["generate", str(tmp_path), "ab", "--device", "cpu"], capsys)
    tiny_model().config.save_pretrained(tmp_path)  # a config but no weights
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        check_model_directory(tmp_path)
