"""nosa.bench.step_time: the per-step breakdown of a profiler trace, on a made-up trace whose answer is known."""

import pytest

from nosa.bench.step_time import step_timeline, summarise


def X(cat, name, ts, dur):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def trace():
    # Step 0: 100 us of host work, a graph launch, kernels 110-150 and 140-170 (overlapping: busy 60) and
    # 180-200 (gap 10), a D2H copy and the stream sync after it ending at 205, 15 us of host work after it
    # (an async H2D copy before the launch is no sync). Step 1 starts at 230.
    return [
        X("user_annotation", "step 0", 0, 220),
        X("cuda_runtime", "cudaMemcpyAsync", 50, 4),
        X("cuda_runtime", "cudaGraphLaunch_v10000", 100, 5),
        X("kernel", "a", 110, 40), X("kernel", "b", 140, 30), X("gpu_memcpy", "Memcpy DtoH", 180, 20),
        X("cuda_runtime", "cudaMemcpyAsync", 175, 10), X("cuda_runtime", "cudaStreamSynchronize", 186, 19),
        X("cpu_op", "aten::argmax", 170, 3),
        X("user_annotation", "step 1", 230, 100),
        X("cuda_runtime", "cudaLaunchKernel", 240, 2), X("kernel", "c", 250, 50),
        X("cuda_runtime", "cudaStreamSynchronize", 260, 45),
        X("user_annotation", "other", 0, 1000),  # not a step
        {"ph": "i", "cat": "kernel", "name": "instant", "ts": 120},
    ]


def test_step_timeline_splits_the_wall_time():
    s0, s1 = step_timeline(trace())
    assert s0["wall_us"] == 220 and s0["kernel_us"] == 90 and s0["busy_us"] == 80
    assert s0["gpu_span_us"] == 90 and s0["idle_inside_us"] == 10 and s0["idle_outside_us"] == 130
    assert s0["host_before_launch_us"] == 100 and s0["host_after_sync_us"] == 15
    assert s0["syncs"] == 1 and s0["kernels"] == 3
    assert s1["kernel_us"] == 50 and s1["idle_outside_us"] == 50 and s1["host_after_sync_us"] == 25
    assert s1["host_before_launch_us"] == 10


def test_summarise_takes_medians():
    steps = step_timeline(trace())
    summary = summarise(steps)
    assert summary["steps"] == 2 and summary["wall_us"] == pytest.approx(160) and summary["kernels"] == 2
    assert summarise([]) == {}
