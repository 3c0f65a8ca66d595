"""Where a decode step's wall time goes, from a torch.profiler trace with CPU and CUDA activity
(bench/gpu/step_time.py runs it on the GPU; issue 10's idle gap between kernels and the step time).

`step_timeline(events)` reads the Chrome-trace events of a profile in which every engine step was wrapped in
`torch.profiler.record_function("step ...")`, and reports per step:
  wall_us          the step's CPU range (what `llm.step()` took, profiler overhead included)
  kernel_us        the sum of the GPU activities (kernels, memcpy, memset) that start inside the step
  busy_us          their union on the timeline (kernels that overlap count once)
  gpu_span_us      first GPU activity's start to last one's end
  idle_inside_us   gpu_span_us - busy_us: gaps between the GPU activities of the step (inside a graph: the
                   device's own launch gaps)
  idle_outside_us  wall_us - gpu_span_us: the GPU has nothing of this step to run (host work before the launch
                   and after the results came back)
  host_before_launch_us  step start to the first launch call of the step (cudaGraphLaunch or a kernel launch,
                   whichever comes first; None without one)
  host_after_sync_us     end of the step's last synchronising call (cudaStreamSynchronize, cudaDeviceSynchronize,
                   cudaEventSynchronize or the synchronous cudaMemcpy; an async copy is not one, but PyTorch
                   follows a blocking copy with cudaStreamSynchronize) to step end
  syncs            those synchronising runtime calls in the step
  kernels          GPU activities in the step
Pure Python on the trace's dicts, so it is tested on CPU with a made-up trace."""

from __future__ import annotations

import re
import statistics

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCHES = ("cudaGraphLaunch", "cuGraphLaunch", "cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
         "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize")


def _api(name) -> str:
    """A runtime call's name without the version suffix some traces carry (cudaGraphLaunch_v10000)."""
    return re.sub(r"_v\d+$", "", str(name))


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def step_timeline(events: list[dict], prefix: str = "step") -> list[dict]:
    """One dict per profiled step (in order), see the module docstring. events: a Chrome trace's
    "traceEvents" (complete events, "ph": "X", with "ts" and "dur" in microseconds)."""
    complete = [e for e in events if e.get("ph") == "X" and "ts" in e and "dur" in e]
    steps = sorted((e for e in complete if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith(prefix)),
                   key=lambda e: e["ts"])
    gpu = sorted((e for e in complete if e.get("cat") in GPU_CATEGORIES), key=lambda e: e["ts"])
    runtime = sorted((e for e in complete if e.get("cat") in ("cuda_runtime", "cuda_driver")), key=lambda e: e["ts"])
    out = []
    for i, step in enumerate(steps):
        t0, t1 = float(step["ts"]), float(step["ts"]) + float(step["dur"])
        # GPU work of this step starts before the next step starts (every step ends in a sync).
        limit = float(steps[i + 1]["ts"]) if i + 1 < len(steps) else float("inf")
        mine = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in gpu if t0 <= float(e["ts"]) < limit]
        calls = [e for e in runtime if t0 <= float(e["ts"]) <= t1]
        launches = [e for e in calls if _api(e.get("name")) in LAUNCHES]
        syncs = [e for e in calls if _api(e.get("name")) in SYNCS]
        span = (max(b for _, b in mine) - min(a for a, _ in mine)) if mine else 0.0
        busy = _union(mine)
        wall = t1 - t0
        out.append({
            "name": step.get("name"), "wall_us": wall, "kernel_us": sum(b - a for a, b in mine), "busy_us": busy,
            "gpu_span_us": span, "idle_inside_us": span - busy, "idle_outside_us": wall - span,
            "host_before_launch_us": (float(launches[0]["ts"]) - t0) if launches else None,
            "host_after_sync_us": (t1 - max(float(e["ts"]) + float(e["dur"]) for e in syncs)) if syncs else None,
            "syncs": len(syncs), "kernels": len(mine),
        })
    return out


def summarise(steps: list[dict]) -> dict:
    """Medians over the steps of every figure of `step_timeline` (None where a step has none)."""
    if not steps:
        return {}
    summary = {}
    for key, value in steps[0].items():
        if key == "name":
            continue
        values = [s[key] for s in steps if s[key] is not None]
        summary[key] = statistics.median(values) if values else None
    summary["steps"] = len(steps)
    return summary
