"""`nosa bench generate` end to end on the CPU: model.generate with the NosaCache beside the engine at batch 1
on the same model, in one run, written with the machine header."""

import json


def test_bench_generate_reports_generate_beside_the_engine(tmp_path):
    from nosa.cli import main

    rc = main(["bench", "generate", "--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--prompt", "40",
               "--new-tokens", "6", "--dynamic-new-tokens", "3", "--repeats", "1", "--out-dir", str(tmp_path)])
    assert rc == 0
    data = json.load(open(tmp_path / "generate_vs_engine.json"))
    assert data["machine"]["torch"] and "cpu_count" in data["machine"]
    assert data["parameters"]["device_used"] == "cpu" and data["parameters"]["shape"] == "tiny"
    runs, summary = data["results"]["runs"], data["results"]["summary"]
    assert set(runs) == {"engine", "generate_nosa_cache", "loop_nosa_cache", "generate_dynamic_cache"}
    for run in runs.values():
        assert run["decode_tokens_per_s"] > 0 and run["step_ms"] > 0
    assert summary["tokens_compared"] == 6 and summary["tokens_equal_prefix"] == 6  # float32: the same tokens
    assert summary["loop_tokens_equal_generate"] is True
    assert summary["generate_decode_step"] == {"cuda_graphs": False, "captured": 0, "replayed": 0}
    assert summary["ratio_engine_over_generate"] > 0


def test_bench_generate_refuses_bad_lengths(capsys):
    from nosa.cli import main

    assert main(["bench", "generate", "--shape", "tiny", "--device", "cpu", "--new-tokens", "1"]) == 2
    assert "--new-tokens >= 2" in capsys.readouterr().err
