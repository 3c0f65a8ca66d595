"""The engine benchmarks run on CPU: `nosa bench decode --model DIR` (a saved checkpoint end to end, real
prefill through the engine) and `nosa bench ttft` (time to first token behind a long prompt) write their
result files with the machine header and figures that agree with what the engine did."""

import json

import pytest

from nosa.cli import main
from nosa.tokenizer import ByteTokenizer
from tests.helpers import cli_error, engine_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    engine_model("nosa", seed=2).save_pretrained(directory)
    ByteTokenizer().save_pretrained(directory)
    return directory


def test_bench_decode_of_a_saved_model_on_cpu(saved, tmp_path):
    text = tmp_path / "prompt.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. ")
    argv = ["bench", "decode", "--model", str(saved), "--device", "cpu", "--prompt", "21", "--batch", "3", "--steps", "4",
            "--warmup", "1", "--offload", "on,off", "--prompt-text", str(text), "--prefill-chunk", "8",
            "--out-dir", str(tmp_path), "--name", "ckpt"]
    assert main(argv) == 0
    result = json.loads((tmp_path / "ckpt.json").read_text())
    assert result["machine"]["torch"] and result["parameters"]["batch"] == 3
    runs = result["results"]["runs"]
    assert [r["offload"] for r in runs] == [True, False] and result["results"]["complete"]
    for run in runs:
        assert run["decode_tokens"] == 3 * 4 and run["decode_tokens_per_s"] > 0  # every request in every timed step
        assert 0 < run["ttft_s"]["min"] <= run["ttft_s"]["p50"] <= run["ttft_s"]["max"]
        assert run["prefill_chunk"] == 8 and run["process_peak_rss_bytes"] > 0 and run["weight_bytes"] > 0
    assert runs[0]["host_store_bytes"] > 0 and runs[1]["host_store_bytes"] == 0


def test_bench_decode_model_errors_are_clear(saved, tmp_path, capsys):
    assert "not a directory" in cli_error(["bench", "decode", "--model", str(tmp_path / "none"), "--device", "cpu"], capsys)
    assert "--offload" in cli_error(["bench", "decode", "--model", str(saved), "--device", "cpu", "--offload", "maybe"], capsys)


def test_bench_ttft_on_cpu(saved, tmp_path):
    argv = ["bench", "ttft", "--model", str(saved), "--device", "cpu", "--background", "2", "--background-prompt", "5",
            "--long-prompt", "40", "--short", "2", "--short-prompt", "3", "--short-output", "2", "--reps", "1",
            "--schedules", "8:12,64:64", "--out-dir", str(tmp_path), "--name", "t"]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "t.json").read_text())["results"]["schedules"]
    assert [(r["prefill_chunk"], r["max_prefill_tokens"]) for r in rows] == [(8, 12), (64, 64)]
    # Chunks of 8: the short prompts are prefilled beside the long one's first chunk, so they come first.
    assert rows[0]["ttft_short_s"]["p50"] < rows[0]["ttft_long_s"]["p50"]
    assert rows[0]["background_max_gap_s"]["p50"] > 0
