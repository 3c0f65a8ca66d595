"""Interrupted training: SIGINT/SIGTERM saves a resumable checkpoint and exits without a traceback; a
process killed while saving leaves every earlier checkpoint usable."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from nosa.models import NosaForCausalLM
from nosa.train.checkpoint import checkpoint_root, find_checkpoint, load_optimizer, read_state
from tests.helpers import tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def _check_usable(path, training_run=False):
    """A resume reads these three; each must load."""
    state = read_state(path)
    model = NosaForCausalLM.from_pretrained(path)
    if training_run:
        from nosa.train.config import TrainConfig
        from nosa.train.loop import build_optimizer

        optimizer = build_optimizer(model, TrainConfig(**state["config"]))
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    load_optimizer(path, model, optimizer)
    return state


@pytest.mark.parametrize("second_step", [1, 2])  # re-saving the same step, or saving the next one
def test_a_save_killed_half_way_leaves_the_previous_checkpoint_usable(tmp_path, second_step):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "train", "save_and_die.py"), str(out), str(second_step)],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "first save done" in proc.stdout and "not reached" not in proc.stdout
    latest = find_checkpoint("latest", str(out))
    assert os.path.basename(latest) == "step_000001"
    assert _check_usable(latest)["rows_consumed"] == 10  # the first save, intact
    # the killed save is not a checkpoint: no step_000002, only a partial directory the next save removes
    names = sorted(os.listdir(checkpoint_root(str(out))))
    assert [n for n in names if n.startswith("step_") and not n.endswith(".partial")] == ["step_000001"]
    assert any(n.endswith(".partial") for n in names)


def test_sigint_saves_a_resumable_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    model = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=48,
                 block_size=8, topk_blocks=6, sink_blocks=1, window_blocks=2, query_blocks=2, compress_kernel=8, compress_stride=4)
    command = [sys.executable, "-m", "nosa.cli", "train", "--out-dir", str(out), "--seq-len", "160", "--max-steps", "100000",
               "--micro-batch-size", "1", "--warmup-steps", "1", "--precision", "fp32", "--no-progress", "--device", "cpu",
               "--set", "mixture={passkey: 1.0}", "--set", "val_every=0",
               *sum((["--set", f"model.{k}={v}"] for k, v in model.items()), [])]
    proc = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and sum(1 for line in metrics.read_text().splitlines() if '"loss"' in line) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1]
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert "Traceback" not in stderr and "stopped by SIGINT" in stderr and "--resume" in stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["stopped_by_signal"] == "SIGINT" and summary["step"] >= 2
    latest = find_checkpoint("latest", str(out))
    assert latest == summary["final_checkpoint"] and _check_usable(latest, training_run=True)["step"] == summary["step"]
