"""One error path for the whole `nosa` command: a user error prints the message alone on stderr with exit
code 2 (no traceback); a bug keeps its traceback. Run in-process through nosa.cli.main."""

import pytest

from nosa.cli import main
from tests.helpers import cli_error


@pytest.fixture
def train_args(tmp_path):
    # A fresh out_dir and a passkey-only mixture: the checks below fail before any corpus is needed.
    return ["train", "--out-dir", str(tmp_path / "run"), "--set", "mixture={passkey: 1.0}", "--device", "cpu",
            "--seq-len", "256", "--max-steps", "1", "--no-progress"]


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_train_bad_yaml(tmp_path, train_args, capsys):
    err = cli_error([*train_args, "--config", _write(tmp_path / "c.yaml", "lr: [1,\n")], capsys)
    assert "c.yaml" in err and "not valid YAML" in err


def test_train_missing_config_file(tmp_path, train_args, capsys):
    assert "does not exist" in cli_error([*train_args, "--config", str(tmp_path / "nope.yaml")], capsys)


def test_train_unknown_key(tmp_path, train_args, capsys):
    err = cli_error([*train_args, "--config", _write(tmp_path / "c.yaml", "lrr: 0.1\n")], capsys)
    assert "unknown training options" in err and "lrr" in err


def test_train_negative_lr(train_args, capsys):
    assert "lr must be" in cli_error([*train_args, "--lr", "-1"], capsys)


def test_train_unknown_task(train_args, capsys):
    assert "unknown mixture sources" in cli_error([*train_args, "--set", "mixture.nope=1"], capsys)


def test_train_existing_out_dir(tmp_path, train_args, capsys):
    (tmp_path / "run" / "checkpoints" / "step_000001").mkdir(parents=True)
    assert "--overwrite" in cli_error(train_args, capsys)


def test_train_nothing_to_resume(train_args, capsys):
    assert "nothing to resume" in cli_error([*train_args, "--resume"], capsys)


def test_train_zero_steps(train_args, capsys):
    assert "max_steps must be" in cli_error([*train_args, "--max-steps", "0"], capsys)


def test_demo_zero_steps(capsys):
    assert "--steps must be >= 1" in cli_error(["demo", "--steps", "0", "--output-dir", ""], capsys)


def test_stage_entry_point_uses_the_same_path(train_args, capsys):
    from nosa.train.cli import main as train_main

    capsys.readouterr()
    assert train_main([*train_args[1:], "--lr", "-1"]) == 2
    err = capsys.readouterr().err
    assert "lr must be" in err and "Traceback" not in err


def test_a_bug_keeps_its_traceback(monkeypatch):
    import nosa.demo

    def broken(args):
        raise RuntimeError("a real bug")

    monkeypatch.setattr(nosa.demo, "run", broken)
    with pytest.raises(RuntimeError, match="a real bug"):
        main(["demo"])


def test_traceback_on_request(monkeypatch):
    monkeypatch.setenv("NOSA_TRACEBACK", "1")
    with pytest.raises(ValueError, match="--steps must be"):
        main(["demo", "--steps", "0", "--output-dir", ""])


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("command", [["demo", "--output-dir", ""], ["train", "--set", "mixture={passkey: 1.0}"],
                                     ["eval", "--model", "."]])
def test_device_cuda_without_cuda(command, capsys):
    err = cli_error([*command, "--device", "cuda"], capsys)
    assert "--device cuda" in err and "no CUDA device" in err


def test_unknown_device_is_named(capsys):
    assert "--device 'tpu'" in cli_error(["demo", "--output-dir", "", "--device", "tpu"], capsys)
