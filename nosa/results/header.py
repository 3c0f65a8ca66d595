"""The machine header every result file carries (GPU, driver, torch, Triton, CUDA, commit), and the one
way result files are written, so benchmarks, training, evaluation and the demo all record the same facts."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess

import torch


def git_commit() -> str | None:
    """NOSA_COMMIT when set (a copy of the tree on another machine may carry stale git metadata: the GPU
    machine's copy reported the session's first commit for a run of a later tree), else HEAD of the
    checkout nosa is imported from (not of the current directory)."""
    if os.environ.get("NOSA_COMMIT"):
        return os.environ["NOSA_COMMIT"]
    package_dir = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        return subprocess.run(["git", "-C", package_dir, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def machine_header() -> dict:
    """GPU, driver, torch, Triton, CUDA, Python, host and commit, as found now."""
    header = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": git_commit(),
    }
    try:
        import triton

        header["triton"] = triton.__version__
    except ImportError:
        header["triton"] = None
    try:
        import transformers

        header["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        header["gpu"] = props.name
        header["gpu_count"] = torch.cuda.device_count()
        header["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        header["sm_count"] = props.multi_processor_count
        try:
            header["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, check=True,
            ).stdout.strip().splitlines()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            header["driver"] = None
    else:
        header["gpu"] = None
    return header



def write_json_result(path: str, parameters: dict, results) -> str:
    """Write {"machine", "parameters", "results"} to `path` (directories made as needed); returns the path."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"machine": machine_header(), "parameters": parameters, "results": results}, f, indent=2)
    return path
