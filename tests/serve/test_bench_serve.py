"""`nosa bench serve` end to end on the CPU: a real server process under a small concurrent load, the result
file's fields, and a warm-up drawn from the load's own distributions (so compiles and graph captures are not
measured)."""

import json

from nosa.bench.serve import draw_requests


def test_warmup_follows_the_load_distribution():
    warmup = draw_requests(16, (100, 200), (5, 9), 264, seed=1)
    lengths = [len(r["prompt"]) for r in warmup]
    assert min(lengths) >= 100 and max(lengths) <= 200 and len(set(lengths)) > 4
    assert {r["max_tokens"] for r in warmup} <= set(range(5, 10))


def test_bench_serve_runs_a_load_on_the_cpu(tmp_path):
    from nosa.cli import main

    rc = main(["bench", "serve", "--shape", "tiny", "--device", "cpu", "--clients", "3", "--requests", "5",
               "--prompt-len", "8:24", "--output-len", "2:5", "--offload", "on", "--max-num-seqs", "3",
               "--out-dir", str(tmp_path)])
    assert rc == 0
    data = json.load(open(tmp_path / "serve.json"))
    assert data["parameters"]["warmup"] == 3  # --clients of them by default
    (run,) = data["results"]
    assert run["requests"] == 5 and run["errors"] == 0 and run["exact_lengths"] and run["offload"] is True
    assert run["output_tokens"] > 0 and run["ttft_s"]["p50"] > 0
    # the warm-up and the load are accounted apart: growths of the host store and CUDA graph work (none on CPU)
    warm, load = run["server"]["warmup"], run["server"]["load"]
    assert warm["requests"] == 3 and warm["wall_s"] > 0 and warm["prefill_tokens"] > 0 and load["decode_steps"] > 0
    assert warm["host_store_growths"] >= 1 and warm["graph_captures"] == load["graph_captures"] == 0
