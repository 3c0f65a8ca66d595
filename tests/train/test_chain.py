"""Training phases chained in one torchrun process (`python -m nosa.study.train_chain`), 2 processes under
FSDP on gloo: every phase gets a process group of its own that comes up and works, each phase starts
from the previous one's final checkpoint, and no group's threads outlive the chain.

Rank 0 is made to reach each later phase's rendezvous a second after rank 1 (tests/train/chain_late_rank.py),
as it does by chance when it renders the loss plot of the phase just finished. Each later group used to
rendezvous under the keys of the first one in torchrun's store, so rank 1 read rank 0's address from the
previous phase and the group hung or failed with "Connection reset by peer": with 3 such phase changes
that failed 8 of 8 runs."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import yaml

from nosa.data.corpus import build_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
             block_size=8, topk_blocks=6, sink_blocks=1, window_blocks=2, query_blocks=2, compress_kernel=8, compress_stride=4)
PHASES = 4
LATE_S = 1.0    # rank 0's delay before each later phase's process group
WORKER_LIMIT_S = 50.0  # a worker still running then dumps its stacks and exits (a passing chain takes ~15 s)


def _corpus(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    words = "def class return import self value with for while print".split()
    for i in range(20):
        (src / f"f{i}.txt").write_text(" ".join(rng.choice(words, size=int(rng.integers(40, 200)))))
    build_corpus(str(tmp_path / "corpus"), str(src), "byte", val_fraction=0.1)
    with open(tmp_path / "corpus" / "train" / "meta.json") as f:
        return str(tmp_path / "corpus"), json.load(f)["source"]


def test_fsdp_phases_chained_in_one_torchrun_process(tmp_path):
    corpus, source = _corpus(tmp_path)
    configs = []
    for k in range(PHASES):
        values = dict(corpus_dir=corpus, corpus_source=source, out_dir=str(tmp_path / f"phase{k}"), seq_len=64,
                      max_steps=1, micro_batch_size=2, warmup_steps=0, precision="fp32", progress=False,
                      mixture={"corpus": 1.0}, seed=k, parallel="fsdp")
        if k == 0:
            values["model"] = dict(MODEL)
        else:
            values["init_from"] = "nosa"  # with no init_path: the previous phase's final checkpoint
        configs.append(tmp_path / f"phase{k}.yaml")
        configs[-1].write_text(yaml.safe_dump(values))
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(ROOT, "tests", "train", "chain_late_rank.py"), str(LATE_S), str(WORKER_LIMIT_S),
                             *map(str, configs), "--device", "cpu"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=WORKER_LIMIT_S + 40)
    except subprocess.TimeoutExpired:  # the workers' own limit did not end them: end torchrun, which ends them
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, f"the chain failed or hung (exit {proc.returncode}):\n{err[-4000:]}"
    summaries = [json.loads(line) for line in out.splitlines() if line.startswith('{"config"')]
    assert len(summaries) == 2 * PHASES  # each rank prints one line per phase
    ends = {}
    for line in summaries:
        ends.setdefault(line["config"], set()).add(line["summary"]["final_checkpoint"])
        assert line["summary"]["step"] == 1
    assert list(ends) == list(map(str, configs))
    for k in range(1, PHASES):  # each later phase started from the previous phase's final checkpoint
        with open(tmp_path / f"phase{k}" / "train_config.json") as f:
            assert {json.load(f)["init_path"]} == ends[str(configs[k - 1])]
