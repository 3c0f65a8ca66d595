"""What every benchmark result file carries: the machine header, the parameters, the figures."""

from __future__ import annotations

import os

import torch

from nosa.results.header import write_json_result

RESULTS_DIR = os.path.join("bench", "results")


def write_result(name: str, parameters: dict, results, directory: str = RESULTS_DIR) -> str:
    """Write bench/results/<name>.json with the machine header; returns the path."""
    return write_json_result(os.path.join(directory, f"{name}.json"), parameters, results)


def cuda_median_ms(fn, warmup: int = 1, reps: int = 10) -> float:
    """Median GPU time of `fn` in ms over `reps` calls, each bracketed by CUDA events, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]
