"""`nosa generate` input handling: options anywhere, --token-ids and non-UTF-8 prompts named, --device
cuda without CUDA refused clearly, --quiet silences transformers' loading bar too."""

import io

import pytest
import torch

from helpers import tiny_model
from nosa.cli import main
from nosa.command import read_prompts
from nosa.tokenizer import ByteTokenizer
from tests.helpers import cli_error


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tiny_model(vocab_size=ByteTokenizer().vocab_size).save_pretrained(path)
    ByteTokenizer().save_pretrained(path)
    return str(path)


def test_options_between_model_and_prompt(saved, capsys):
    assert main(["generate", saved, "--max-tokens", "4", "def f(", "--device", "cpu", "--quiet", "--ignore-eos"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() and "4 tokens decoded" not in captured.out
    assert "[3 tokens decoded" in captured.err  # 4 generated: the first comes from the prefill


def test_quiet_silences_the_weight_loading_bar(saved, capsys):
    assert main(["generate", saved, "ab", "--max-tokens", "2", "--device", "cpu", "--quiet"]) == 0
    assert "Loading weights" not in capsys.readouterr().err
    from transformers.utils import logging

    assert logging.is_progress_bar_enabled()  # put back for whoever runs next in this process


def test_bad_token_ids_name_the_flag(saved, capsys):
    err = cli_error(["generate", saved, "a,b", "--token-ids", "--device", "cpu", "--quiet"], capsys)
    assert "--token-ids" in err and "'a,b'" in err


def test_non_utf8_prompt_argument_is_named(saved, capsys):
    bad = b"caf\xe9".decode("utf-8", "surrogateescape")  # what Python makes of such argv bytes
    err = cli_error(["generate", saved, bad, "--device", "cpu", "--quiet"], capsys)
    assert "prompt argument 1 is not valid UTF-8" in err and "--token-ids" in err


def test_non_utf8_stdin_line_is_named():
    stdin = io.BytesIO(b"ok\ncaf\xe9\n")
    with pytest.raises(ValueError, match="stdin line 2 is not valid UTF-8"):
        read_prompts([], stdin, token_ids=False)
    assert read_prompts([], io.BytesIO(b"1,2\n\n3\n"), token_ids=True) == [[1, 2], [3]]
    assert read_prompts([], io.BytesIO("héllo\n\nx\n".encode()), token_ids=False) == ["héllo", "x"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_cuda(saved, capsys):
    err = cli_error(["generate", saved, "ab", "--device", "cuda", "--quiet"], capsys)
    assert "--device cuda" in err and "no CUDA device" in err and "--device cpu" in err


def test_device_cache_blocks_flag(saved, capsys):
    """--device-cache-blocks takes a count or 'auto' (both reach the engine) and names anything else."""
    for value in ("auto", "12"):
        assert main(["generate", saved, "ab", "--max-tokens", "2", "--device", "cpu", "--quiet",
                     "--gpu-memory-budget", str(1 << 30), "--device-cache-blocks", value]) == 0
        capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["generate", saved, "ab", "--device", "cpu", "--device-cache-blocks", "many"])
    assert "expected a number of blocks or 'auto', got 'many'" in capsys.readouterr().err
    err = cli_error(["generate", saved, "ab", "--device", "cpu", "--quiet", "--device-cache-blocks", "1"], capsys)
    assert "device_cache_blocks must be an integer >= topk_blocks" in err


def test_micro_batches_flag(saved, capsys):
    """--micro-batches reaches the engine (two rows: two micro-batches) and a bad count is named."""
    assert main(["generate", saved, "ab", "cd", "--max-tokens", "2", "--device", "cpu", "--quiet", "--max-num-seqs", "2",
                 "--micro-batches", "2"]) == 0
    capsys.readouterr()
    err = cli_error(["generate", saved, "ab", "--device", "cpu", "--quiet", "--max-num-seqs", "2", "--micro-batches", "3"], capsys)
    assert "micro_batches must be an integer in [1, rows=2]" in err

