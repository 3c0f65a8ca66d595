"""The `nosa` command and its demo, end to end at a tiny size."""

import json

import pytest

from nosa.cli import build_parser, main
from nosa.tokenizer import ByteTokenizer
from tests.helpers import cli_error


def test_demo_runs_end_to_end(tmp_path, capsys):
    code = main(["demo", "--steps", "3", "--batch-size", "2", "--seq-len", "256", "--corpus-bytes", "200000",
                 "--prompt-tokens", "300", "--new-tokens", "12", "--output-dir", str(tmp_path), "--device", "cpu",
                 "--summary", str(tmp_path / "summary.json")])
    assert code == 0
    out = capsys.readouterr().out
    assert "loss:" in out and "generated 12 tokens after a 300-token prompt" in out
    assert "\033" not in out  # no terminal escapes when stdout is not a terminal
    # The last forward is the query at position 300 + 12 - 2 = 310, in block 19: 20 blocks visible, 8 attended.
    assert "8.0 of 20.0 visible blocks" in out
    assert (tmp_path / "model.safetensors").exists()
    ByteTokenizer.from_pretrained(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["machine"]["torch"] and len(summary["results"]["losses"]) == 3
    assert summary["results"]["blocks_attended"] == 8.0 and summary["results"]["new_tokens"] == 12


def test_demo_rejects_a_prompt_within_the_budget(capsys):
    assert "must exceed topk_blocks x block_size = 128" in cli_error(
        ["demo", "--steps", "1", "--prompt-tokens", "100", "--output-dir", ""], capsys)


@pytest.mark.parametrize("flag, value", [("--steps", "0"), ("--new-tokens", "1"), ("--batch-size", "0")])
def test_demo_rejects_bad_sizes(flag, value, capsys):
    assert f"{flag} must be >=" in cli_error(["demo", flag, value, "--output-dir", ""], capsys)


def test_cli_lists_demo():
    assert "demo" in build_parser().format_help()


def test_demo_leaves_the_thread_count_to_torch_unless_told(monkeypatch, capsys):
    import torch

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    cli_error(["demo", "--steps", "0", "--output-dir", "", "--device", "cpu"], capsys)  # stops after the thread setup
    assert calls == []
    cli_error(["demo", "--threads", "1", "--steps", "0", "--output-dir", "", "--device", "cpu"], capsys)
    assert calls == [1]
    assert "--threads must be >= 1" in cli_error(["demo", "--threads", "0", "--output-dir", ""], capsys)
