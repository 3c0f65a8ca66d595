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


def graph_ms(fn, calls: int = 20, reps: int = 10) -> float:
    """Per-call GPU time of `fn` replayed from a CUDA graph of `calls` back-to-back calls (median of
    `reps` replays): decode steps run from graphs, so launch overhead is not part of what is measured."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up outside capture (compiles and autotunes)
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return cuda_median_ms(graph.replay, 2, reps) / calls


def hbm_copy_rate(device) -> float:
    """HBM copy rate in bytes/s (read + write counted), 1 GiB bf16."""
    a = torch.empty(1 << 29, device=device, dtype=torch.bfloat16)
    b = torch.empty_like(a)
    ms = cuda_median_ms(lambda: b.copy_(a), 3, 10)
    rate = 2 * a.numel() * a.element_size() / (ms * 1e-3)
    del a, b
    return rate
