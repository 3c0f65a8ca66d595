"""`nosa study quality`: train dense, InfLLM-v2, DMA and NOSA with the same model, data, token budget,
schedule and seed, evaluate each, and write one summary (with the machine header), the plots, the
selection traces of the sparse modes and one log archive.

Every mode runs `nosa train` (nosa.train.loop) once per curriculum phase, then `nosa.study.evaluate` (the
shared phases, trained once for all modes, run one after another in one process: nosa.study.train_chain); the
modes run as concurrent processes (one GPU is shared; a small model leaves most of an H200 idle, and
running side by side gives every mode the same wall-clock window) or back to back. The whole study is
time-boxed: each phase stops at its `time_limit_s` (the loop saves and exits), a process still alive
past its limit plus a grace period is killed, evaluation stops starting new parts at the evaluation
deadline, and the summary, plots and archive are written from whatever finished (failures are recorded
in the summary, never hidden).

Files written to --out-dir (flat, at most 8, so a GPU run can bring them all back):
  summary.json  loss.png  accuracy.png  locality.png  traces_nosa.npz  traces_infllmv2.npz  logs.tar.gz
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import yaml

from nosa.study.presets import resolve

TRACE_MODES = ("nosa", "infllmv2")
WORK_MARKER = ".nosa_study_work"
KILL_GRACE_S = 45  # a phase past time_limit_s still saves its checkpoint; startup also takes a while
CHAIN_PHASE_OVERHEAD_S = 15  # a chained phase's own set-up and final save (the kill backstop, not a plan)
POLL_S = 0.1  # how often a running job is checked: each back-to-back job waited up to a whole poll after it ended
# What a study writes to --out-dir (the module docstring's list).
OUT_FILES = ("summary.json", "loss.png", "accuracy.png", "locality.png", *(f"traces_{m}.npz" for m in TRACE_MODES),
             "logs.tar.gz")


def _log(msg: str, logf=None) -> None:
    line = f"[study {time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    if logf is not None:
        logf.write(line + "\n")
        logf.flush()


def phase_dir(work: str, mode: str, phase_index: int, study: dict) -> str:
    """Where a phase's run lives: a shared phase (trained once, see derive_mode_init) under 'shared'."""
    owner = "shared" if study["phases"][phase_index].get("shared") else mode
    return os.path.join(work, owner, f"phase{phase_index}")


def start_weights(study: dict, mode: str, phase_index: int, work: str) -> str | None:
    """The weights a mode's phase starts from: its previous phase's final checkpoint, or, after a shared
    phase, the mode's copy of the shared weights (derive_mode_init)."""
    if study["phases"][phase_index].get("shared"):  # shared after shared: the one model continues
        return final_checkpoint(phase_dir(work, mode, phase_index - 1, study))
    if study["phases"][phase_index - 1].get("shared"):
        init = os.path.join(work, mode, "init")
        return init if os.path.exists(os.path.join(init, "config.json")) else None
    return final_checkpoint(phase_dir(work, mode, phase_index - 1, study))


PHASE_SEED_STRIDE = 1000


def phase_seed(data_seed: int, phase_index: int) -> int:
    """The training seed of one phase: phase 0 keeps the data seed (the model's initialisation and its rows),
    each later phase draws fresh rows. One seed for every phase replayed the earlier phases' rows, the same
    keys and answers, wherever two phases share a length (the gate phase and the per-mode phase at 16K)."""
    return data_seed + PHASE_SEED_STRIDE * phase_index


def train_config(study: dict, mode: str, phase_index: int, work: str) -> dict:
    """The TrainConfig mapping of one mode's phase: shared model, data and optimisation; only attn_mode,
    out_dir and the warm start differ between modes. A shared phase trains attn_mode `phase.attn_mode`
    (default dense) once for all modes."""
    phase = study["phases"][phase_index]
    data = study["data"]
    cfg = {
        "model": {**study["model"], "attn_mode": phase.get("attn_mode", "dense") if phase.get("shared") else mode},
        "corpus_dir": os.path.join(work, "corpus"),
        "corpus_source": data["corpus_source"],
        "corpus_max_tokens": data["corpus_max_tokens"],
        "mixture": phase.get("mixture", data["mixture"]),
        "task_params": phase_task_params(study, phase_index),
        "task_loss": phase.get("task_loss", data.get("task_loss", "answer")),
        "seed": phase_seed(data.get("seed", 0), phase_index),
        "seq_len": phase["seq_len"],
        "micro_batch_size": phase["micro_batch_size"],
        "max_steps": phase["max_steps"],
        "time_limit_s": phase["time_limit_s"],
        "lr": phase["lr"],
        "warmup_steps": phase["warmup_steps"],
        "val_every": phase.get("val_every", max(1, phase["max_steps"] // 4)),
        "out_dir": phase_dir(work, mode, phase_index, study),
        "progress": False,
        **study.get("train", {}),
    }
    # Optional: stop the phase once its answers are learnt (nosa/train/answer_target.py).
    for key in ("stop_at_answer_nll", "stop_window_steps"):
        if key in phase:
            cfg[key] = phase[key]
    if phase_index > 0:
        cfg["init_from"] = "nosa"
        cfg["init_path"] = start_weights(study, mode, phase_index, work)
        del cfg["model"]  # init_from=nosa continues the checkpoint's model as it is
    return cfg


def check_phase_tasks(study: dict) -> None:
    """Generate one row of every task of every phase's mixture at the phase's seq_len, before anything is
    trained: a task that does not fit a phase would otherwise stop the study at that phase, after the
    earlier phases spent their GPU time (nosa.train.loop.check_mixture_tasks is the rule)."""
    from nosa.data.tokenization import load_tokenizer
    from nosa.train.loop import check_mixture_tasks

    tok = load_tokenizer("byte")
    for k, phase in enumerate(study["phases"]):
        try:
            check_mixture_tasks(phase.get("mixture", study["data"]["mixture"]), phase_task_params(study, k),
                                phase["seq_len"], tok)
        except ValueError as err:
            raise ValueError(f"phases[{k}]: {err}") from None


def phase_task_params(study: dict, phase_index: int) -> dict:
    """data.task_params with the phase's own task_params merged over it, task by task."""
    params = {task: dict(p) for task, p in study["data"].get("task_params", {}).items()}
    for task, p in study["phases"][phase_index].get("task_params", {}).items():
        params[task] = {**params.get(task, {}), **p}
    return params


def derive_mode_init(shared_checkpoint: str, mode: str, dst: str, seed: int = 0) -> dict:
    """The shared weights as a model of attn_mode `mode`: every weight copied; the eviction head, which
    dma and nosa add, starts as a fresh model's (A = 0: no bias, so the sparse model starts from the
    shared model's attention scores). Saved with the tokenizer as a loadable model directory. `seed`: the
    study's data seed, which initialises the fresh head's other weights."""
    import torch

    from nosa.config import NosaConfig
    from nosa.data.tokenization import load_tokenizer
    from nosa.models import NosaForCausalLM

    src = NosaForCausalLM.from_pretrained(shared_checkpoint, dtype=torch.float32, local_files_only=True)
    fields = {k: v for k, v in src.config.to_dict().items() if k in NosaConfig().to_dict() and not k.startswith("_")}
    fields.update(attn_mode=mode)
    torch.manual_seed(seed)
    model = NosaForCausalLM(NosaConfig(**fields)).float()
    result = model.load_state_dict(src.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if ".eviction." not in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"shared weights do not fit attn_mode {mode!r}: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    model.save_pretrained(dst)
    load_tokenizer(shared_checkpoint).inner.save_pretrained(dst)
    return {"from": shared_checkpoint, "fresh": sorted(set(result.missing_keys))[:8], "fresh_count": len(result.missing_keys)}


def final_checkpoint(run_dir: str) -> str | None:
    latest = os.path.join(run_dir, "checkpoints", "latest")
    if not os.path.exists(latest):
        return None
    with open(latest) as f:
        return os.path.join(run_dir, "checkpoints", f.read().strip())


def _env() -> dict:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def run_processes(jobs: list[tuple[str, list[str], str]], concurrent: bool, deadline: float, logf) -> dict:
    """jobs: (name, argv, log path). Runs them together or one after another; kills what is still alive at
    `deadline`. Returns name -> {'rc', 'wall_s', 'killed'}."""
    status = {}

    def launch(name, argv, log_path):
        out = open(log_path, "w")
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
        _log(f"started {name} (pid {proc.pid}): {' '.join(argv[2:])}", logf)
        return proc, out, time.time()

    def wait(items):
        while True:
            alive = [n for n, (p, _, _) in items.items() if p.poll() is None]
            for n, (p, out, t0) in list(items.items()):
                if p.poll() is not None and n not in status:
                    out.close()
                    status[n] = {"rc": p.returncode, "wall_s": round(time.time() - t0, 1), "killed": False}
                    _log(f"{n} finished rc={p.returncode} after {status[n]['wall_s']} s", logf)
            if not alive:
                return
            if time.time() > deadline:
                for n in alive:
                    p, out, t0 = items[n]
                    os.killpg(p.pid, signal.SIGKILL)  # its own session: the process and its children only
                    p.wait()
                    out.close()
                    status[n] = {"rc": p.returncode, "wall_s": round(time.time() - t0, 1), "killed": True}
                    _log(f"{n} killed at the deadline after {status[n]['wall_s']} s", logf)
                return
            time.sleep(POLL_S)

    if concurrent:
        wait({name: launch(name, argv, log) for name, argv, log in jobs})
    else:
        for name, argv, log in jobs:
            if time.time() > deadline:
                status[name] = {"rc": None, "wall_s": 0.0, "killed": False, "skipped": "deadline passed before it started"}
                continue
            wait({name: launch(name, argv, log)})
    return status


ANSWER_WINDOW = 20  # logged steps averaged for the phase's final answer statistics


def _mean_by_source(records: list[dict], key: str) -> dict:
    sums: dict = {}
    for r in records:
        for source, value in (r.get(key) or {}).items():
            total, count = sums.get(source, (0.0, 0))
            sums[source] = (total + value, count + 1)
    return {source: total / count for source, (total, count) in sums.items()}


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def mode_row(study: dict, mode: str, work: str, train_status: dict, eval_status: dict) -> dict:
    """One summary row: parameters, tokens, wall time, losses, perplexity buckets, accuracy, locality."""
    row = {"attn_mode": mode, "phases": [], "tokens_trained": 0, "train_wall_s": 0.0, "errors": {}}
    curve = []
    tokens_before = 0
    for k, phase in enumerate(study["phases"]):
        run = phase_dir(work, mode, k, study)
        records = read_jsonl(os.path.join(run, "metrics.jsonl"))
        steps = [r for r in records if "event" not in r and "loss" in r]
        start = next((r for r in records if r.get("event") == "start"), {})
        end = next((r for r in records if r.get("event") == "end"), None)
        st = train_status.get(f"{'shared' if phase.get('shared') else mode}/phase{k}", {})
        if "parameters" in start:
            row["parameters"] = start["parameters"]
        # The end record's step: with log_every > 1 a phase cut by its time limit ends after its last logged step.
        done_steps = end["step"] if end and "step" in end else (steps[-1]["step"] if steps else 0)
        tokens_per_step = phase["seq_len"] * phase["micro_batch_size"] * study.get("train", {}).get("grad_accum", 1)
        tokens = done_steps * tokens_per_step
        info = {"shared": bool(phase.get("shared")), "seq_len": phase["seq_len"], "steps_planned": phase["max_steps"], "steps_done": done_steps,
                "tokens": tokens, "stopped_by_time_limit": bool(end and end.get("stopped_by_time_limit")),
                "stopped_by_answer_target": end.get("stopped_by_answer_target") if end else None,
                "wall_s": end.get("wall_s") if end else None, "process": st}
        vals = [r for r in steps if "val_loss" in r]
        if vals:
            info["val_loss"] = vals[-1]["val_loss"]
        if steps:
            info["final_train_loss"] = steps[-1]["loss"]
            info["final_loss_by_source"] = steps[-1].get("loss_by_source")
            # The answers alone, averaged over the last logged steps (one step's batch holds only a few rows
            # of each task): whether retrieval is forming, which the full-row loss hides.
            for key in ("answer_nll_by_source", "answer_token_acc_by_source"):
                info[f"final_{key}"] = _mean_by_source(steps[-ANSWER_WINDOW:], key)
        if end is None:
            row["errors"][f"phase{k}"] = f"no end record (process {st})"
        row["phases"].append(info)
        for r in steps:
            curve.append({"tokens": tokens_before + r["step"] * tokens_per_step,
                          "phase": k, "loss": r["loss"], "corpus_loss": (r.get("loss_by_source") or {}).get("corpus"),
                          "val_loss": r.get("val_loss"), "answer_nll_by_source": r.get("answer_nll_by_source")})
        tokens_before += tokens
        row["tokens_trained"] += tokens
        row["train_wall_s"] += info["wall_s"] or 0.0
    row["loss_curve"] = curve
    last = row["phases"][-1] if row["phases"] else {}
    row["final_train_loss"] = last.get("final_train_loss")
    row["final_train_corpus_loss"] = (last.get("final_loss_by_source") or {}).get("corpus")
    row["final_val_loss"] = last.get("val_loss")
    ev_path = os.path.join(work, mode, "eval.json")
    if os.path.exists(ev_path):
        with open(ev_path) as f:
            ev = json.load(f)
        row["eval_wall_s"] = ev.get("wall_s")
        row["eval_parts_done"] = ev.get("parts_done")
        row["eval_parts_skipped"] = ev.get("parts_skipped")
        if ev.get("errors"):
            row["errors"]["eval"] = ev["errors"]
        if "perplexity" in ev:
            ppl = ev["perplexity"]
            row["heldout_loss"] = ppl["nll"]
            row["perplexity"] = {"seq_len": ppl["seq_len"], "tokens": ppl["tokens"], "nll": ppl["nll"], "ppl": ppl["ppl"],
                                 "buckets": [{k: b[k] for k in ("start", "end", "nll", "ppl")} for b in ppl["buckets"]]}
        row["accuracy"] = {task: {n: cell["accuracy"] for n, cell in by_len.items()} for task, by_len in ev.get("tasks", {}).items()}
        row["accuracy_detail"] = ev.get("tasks", {})
        row["locality"] = ev.get("locality", {})
    else:
        row["errors"]["eval"] = f"no eval result (process {eval_status.get(mode)})"
    return row


def write_phase_config(cfg: dict, work: str, owner: str, phase_index: int) -> str:
    path = os.path.join(work, owner, f"phase{phase_index}.yaml")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


def run_shared_chain(study: dict, shared_phases: list[int], work: str, logs: str, py: str, deadline: float, logf) -> dict:
    """Train the shared phases in one process (nosa.study.train_chain: the per-process start-up is paid
    once). Each phase's file leaves init_path empty after the first, so the chain starts it from the phase
    before. Returns each phase's status (the chain's process status, with the chain's name)."""
    paths = []
    for k in shared_phases:
        cfg = train_config(study, "shared", k, work)
        if k != shared_phases[0]:
            cfg["init_path"] = None  # the chain fills in the previous phase's final checkpoint
        paths.append(write_phase_config(cfg, work, "shared", k))
    first, last = shared_phases[0], shared_phases[-1]
    name = f"shared/phase{first}" if first == last else f"shared/phase{first}-{last}"
    limit = sum(study["phases"][k]["time_limit_s"] + CHAIN_PHASE_OVERHEAD_S for k in shared_phases) + KILL_GRACE_S
    job = (name, [py, "-m", "nosa.study.train_chain", *paths], os.path.join(logs, "train_shared_chain.log"))
    st = run_processes([job], False, min(time.time() + limit, deadline), logf)[name]
    return {f"shared/phase{k}": {**st, "chain": name} for k in shared_phases}


def start_shared_eval(study: dict, work: str, logs: str, py: str, deadline: float, logf):
    """Launch nosa.study.shared_eval on every shared phase's final weights, in the background: it runs
    beside the per-mode phases' start-up (a few seconds of GPU work for the h200 preset's cells), and is
    collected before the final evaluation. None if the study has no shared_eval or no shared phase."""
    spec = study.get("shared_eval")
    if not spec:
        return None
    checkpoints = []
    for k, phase in enumerate(study["phases"]):
        if phase.get("shared"):
            ckpt = final_checkpoint(phase_dir(work, "shared", k, study))
            if ckpt is not None:
                checkpoints.append({"phase": k, "seq_len": phase["seq_len"], "path": ckpt})
    if not checkpoints:
        return None
    limit = float(spec.get("time_limit_s", 60))
    out = os.path.join(work, "shared", "shared_eval.json")
    if os.path.exists(out):  # a reused work dir: never report an earlier run's result as this one's
        os.remove(out)
    argv = [py, "-m", "nosa.study.shared_eval", "--checkpoints", json.dumps(checkpoints), "--spec", json.dumps(spec),
            "--out", out, "--deadline", str(min(time.time() + limit, deadline))]
    log = open(os.path.join(logs, "shared_eval.log"), "w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    _log(f"started shared_eval (pid {proc.pid}) on phases {[c['phase'] for c in checkpoints]}", logf)
    return {"proc": proc, "log": log, "t0": time.time(), "kill_at": time.time() + limit + KILL_GRACE_S}


def finish_shared_eval(job, logf) -> dict | None:
    if job is None:
        return None
    proc = job["proc"]
    while proc.poll() is None and time.time() < job["kill_at"]:
        time.sleep(POLL_S)
    killed = proc.poll() is None
    if killed:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the process and its children only
        proc.wait()
    job["log"].close()
    st = {"rc": proc.returncode, "wall_s": round(time.time() - job["t0"], 1), "killed": killed}
    _log(f"shared_eval finished {st}", logf)
    return st


def shared_eval_current(study: dict, work: str) -> bool:
    """The saved shared evaluation scored exactly the shared phases' present final weights (a resumed call
    that trained a shared phase again, or an earlier call that was cut before scoring all of them, is not)."""
    saved = read_shared_eval(work)
    if not saved or saved.get("errors") or any(str(x).endswith(": deadline") for x in saved.get("skipped", [])):
        return False
    finals = {k: final_checkpoint(phase_dir(work, "shared", k, study)) for k, p in enumerate(study["phases"]) if p.get("shared")}
    return {e["phase"]: e.get("checkpoint") for e in saved.get("phases", [])} == finals


def read_shared_eval(work: str) -> dict | None:
    """The shared phases' retrieval (nosa.study.shared_eval's JSON), or None if it did not run."""
    path = os.path.join(work, "shared", "shared_eval.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


# What a resumed study must share with the call that made its work dir (the evaluation and the time budget
# may differ: they act after, or only on, the call that sets them).
# `phase_seed_stride` records how each phase's seed derives from the data seed (phase_seed): a work dir made
# before that rule (no such key) trained its phases on other seeds, and is not resumed under this one.
RESUME_KEYS = ("modes", "model", "data", "phases", "train", "shared_eval", "chain_shared", "phase_seed_stride")


def phase_finished(work: str, owner: str, phase_index: int, study: dict) -> bool:
    """The phase's run ended by itself (its end record, also after its time limit, but not after a signal:
    that end saved part-trained weights) and left a final checkpoint: a resumed study does not train it
    again, unless a phase before it of the same weights is trained again (run_study)."""
    run = phase_dir(work, owner, phase_index, study)
    ends = [r for r in read_jsonl(os.path.join(run, "metrics.jsonl")) if r.get("event") == "end"]
    # A signal on the step that met the answer target still leaves a finished phase (the loop saves it).
    done = bool(ends) and (not ends[-1].get("stopped_by_signal") or bool(ends[-1].get("stopped_by_answer_target")))
    return done and final_checkpoint(run) is not None


def open_work_dir(work: str, study: dict, resume: bool) -> None:
    """A fresh work dir (an earlier study's is deleted), or, with resume, the one an earlier call of the same
    study left (checked: made by `nosa study`, same RESUME_KEYS)."""
    made_here = os.path.exists(os.path.join(work, WORK_MARKER))
    if resume:
        saved = os.path.join(work, "logs", "study_config.yaml")
        if not made_here or not os.path.exists(saved):
            raise ValueError(f"--resume: {work!r} holds no study to resume (run the study's first call with this --work-dir)")
        with open(saved) as f:
            before = yaml.safe_load(f)
        now = yaml.safe_load(yaml.safe_dump(study))
        changed = [key for key in RESUME_KEYS if before.get(key) != now.get(key)]
        if changed:
            raise ValueError(f"--resume: the study's {changed} differ from those {work!r} was trained with; "
                             f"resume with the same config, or start a new study without --resume")
        return
    if os.path.exists(work) and os.listdir(work):
        # Only a folder an earlier study made is deleted: a mistyped --work-dir must not wipe anything else.
        if not made_here:
            raise ValueError(f"work dir {work!r} is not empty and was not made by `nosa study`; choose another --work-dir")
        shutil.rmtree(work)
    os.makedirs(os.path.join(work, "logs"))
    open(os.path.join(work, WORK_MARKER), "w").close()


def answer_target_note(work: str, owner: str, phase_index: int, study: dict) -> str:
    """One line on whether a phase with `stop_at_answer_nll` met it, so the log of a call that stops after
    that phase says whether the next call is worth its time."""
    run = phase_dir(work, owner, phase_index, study)
    records = read_jsonl(os.path.join(run, "metrics.jsonl"))
    end = next((r for r in reversed(records) if r.get("event") == "end"), None)
    target = study["phases"][phase_index]["stop_at_answer_nll"]
    name = f"phase {phase_index} ({owner})"
    if end is None:
        return f"{name}: no end record, so its answer target {target} is not known to be met"
    if end.get("stopped_by_answer_target"):
        means = ", ".join(f"{t} {v:.3f}" for t, v in end["stopped_by_answer_target"].items())
        return f"{name}: answer target met at step {end['step']} (window means {means})"
    last = [r for r in records if "answer_nll_by_source" in r]
    seen = {t: round(v, 3) for t, v in (last[-1]["answer_nll_by_source"] if last else {}).items() if t in target}
    why = "its time limit" if end.get("stopped_by_time_limit") else "a signal" if end.get("stopped_by_signal") else "max_steps"
    return (f"{name}: answer target {target} NOT met; ended at step {end['step']} by {why} "
            f"(last logged answer NLL {seen or 'none of the target tasks'})")


def study_for_run(config: str | None, modes: list[str] | None = None, seed: int | None = None) -> dict:
    """The resolved study with the command line's overrides: the modes, and the data seed."""
    study = resolve(config)
    study["phase_seed_stride"] = PHASE_SEED_STRIDE
    if modes:
        study["modes"] = modes
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"--seed must be an integer >= 0, got {seed!r}")
        study["data"]["seed"] = seed
    return study


def run_study(config: str | None, out_dir: str, work_dir: str | None = None, modes: list[str] | None = None,
              stop_after_phase: int | None = None, resume: bool = False, seed: int | None = None) -> dict:
    """Run the study. `stop_after_phase` k: train phases 0..k (and the shared evaluation, if k is the last
    shared phase), write logs.tar.gz and stop, leaving the work dir for a later call with `resume`, which
    trains only the phases not finished yet, then evaluates and writes everything. Together they split a
    study over two time-limited GPU calls on one machine. `seed` replaces the config's data seed (the model's
    initialisation and the rows of every phase, the same for every mode): another run of the same recipe."""
    from nosa.results.header import write_json_result

    began = time.time()
    study = study_for_run(config, modes, seed)
    if stop_after_phase is not None and not 0 <= stop_after_phase < len(study["phases"]) - 1:
        raise ValueError(f"--stop-after-phase must be 0..{len(study['phases']) - 2} (the last phase is followed by the "
                         f"evaluation), got {stop_after_phase}")
    check_phase_tasks(study)
    deadline = began + study["budget_s"]
    os.makedirs(out_dir, exist_ok=True)
    work = os.path.abspath(work_dir or os.path.join(out_dir, "..", "study_work"))
    open_work_dir(work, study, resume)
    logs = os.path.join(work, "logs")
    logf = open(os.path.join(logs, "study.log"), "a" if resume else "w")
    if not resume:
        with open(os.path.join(logs, "study_config.yaml"), "w") as f:
            yaml.safe_dump(study, f, sort_keys=False)
    _log(f"study: modes {study['modes']}, budget {study['budget_s']} s, concurrent={study['concurrent']}"
         f"{', resumed' if resume else ''}{f', stops after phase {stop_after_phase}' if stop_after_phase is not None else ''}", logf)
    status = {"train": {}, "eval": {}, "corpus": None, "shared_eval": None, "calls": []}
    status_path = os.path.join(logs, "status.json")
    if resume and os.path.exists(status_path):
        with open(status_path) as f:
            earlier = json.load(f)  # the earlier call's process records
        status["train"], status["shared_eval"] = earlier.get("train", {}), earlier.get("shared_eval")
        status["calls"] = earlier.get("calls", [])
    # One record per call of a study split over calls (--stop-after-phase / --resume), so the summary's
    # wall time covers every call, not only the last.
    this_call = {"began": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(began)), "resumed": bool(resume),
                 "stop_after_phase": stop_after_phase, "wall_s": None}
    status["calls"].append(this_call)
    # This call's files replace an earlier call's: a stopped call leaves only logs.tar.gz, never an older
    # summary, plots or traces beside it.
    for name in OUT_FILES:
        if os.path.exists(p := os.path.join(out_dir, name)):
            os.remove(p)
    py = sys.executable

    def save_status():  # after every phase, so a call killed later still leaves its records to a resume
        this_call["wall_s"] = round(time.time() - began, 1)
        with open(status_path, "w") as f:
            json.dump(status, f, indent=1)

    # 1. the corpus, once (every mode reads the same files)
    try:
        from nosa.data.corpus import build_corpus
        from nosa.data.tokenization import load_tokenizer

        t0 = time.time()
        data = study["data"]
        metas = build_corpus(os.path.join(work, "corpus"), data["corpus_source"], load_tokenizer("byte"),
                             max_tokens=data["corpus_max_tokens"], seed=data.get("seed", 0))
        status["corpus"] = {s: {k: m[k] for k in ("num_documents", "num_tokens")} for s, m in metas.items()}
        status["corpus"]["wall_s"] = round(time.time() - t0, 1)
        _log(f"corpus: {status['corpus']}", logf)
    except Exception as err:
        status["corpus"] = {"error": f"{type(err).__name__}: {err}"}
        _log(f"corpus failed: {err}", logf)

    # 2. training, phase by phase (a mode whose previous phase left no checkpoint stops there)
    alive = list(study["modes"])
    status["derive"] = {}
    shared_eval_job = None
    shared_phases = [k for k, phase in enumerate(study["phases"]) if phase.get("shared")]
    chain = study.get("chain_shared", True) and len(shared_phases) > 1
    to_train = shared_phases
    if resume:
        # From the first unfinished shared phase on, everything trains again (it continues those weights).
        first = next((k for k in shared_phases if not phase_finished(work, "shared", k, study)), None)
        to_train = [] if first is None else [k for k in shared_phases if k >= first]
        _log(f"resume: shared phases finished {sorted(set(shared_phases) - set(to_train))}", logf)
    # owners whose weights this call trains again: each of their later phases trains again too
    retrained = ({"shared", *study["modes"]} if to_train else set()) if resume else None
    if stop_after_phase is not None:  # the chain stops where the call does
        to_train = [k for k in to_train if k <= stop_after_phase]
    for k, phase in enumerate(study["phases"]):
        if chain and phase.get("shared"):
            if to_train and k == to_train[0]:
                for j in to_train:  # an unfinished phase of the earlier call starts over
                    shutil.rmtree(phase_dir(work, "shared", j, study), ignore_errors=True)
                status["train"].update(run_shared_chain(study, to_train, work, logs, py, deadline, logf))
        else:
            jobs = []
            owners = ["shared"] if phase.get("shared") else alive
            if resume:
                owners = [o for o in owners if o in retrained or not phase_finished(work, o, k, study)]
                retrained.update(owners)
                for o in owners:
                    shutil.rmtree(phase_dir(work, o, k, study), ignore_errors=True)
            for mode in owners:
                cfg = train_config(study, mode, k, work)
                if k > 0 and cfg["init_path"] is None:
                    status["train"][f"{mode}/phase{k}"] = {"skipped": f"phase{k - 1} left no weights to start from"}
                    continue
                path = write_phase_config(cfg, work, mode, k)
                jobs.append((f"{mode}/phase{k}", [py, "-m", "nosa.train.cli", "--config", path],
                             os.path.join(logs, f"train_{mode}_phase{k}.log")))
            per_job = phase["time_limit_s"] + KILL_GRACE_S
            phase_deadline = time.time() + (per_job if study["concurrent"] else per_job * len(jobs))
            status["train"].update(run_processes(jobs, study["concurrent"], min(phase_deadline, deadline), logf))
        last_shared = phase.get("shared") and not study["phases"][k + 1].get("shared")
        if last_shared:  # score the shared weights in the background, then give each mode its copy
            if not (resume and shared_eval_current(study, work)):  # else the earlier call scored these weights
                shared_eval_job = start_shared_eval(study, work, logs, py, deadline, logf)
            shared = final_checkpoint(phase_dir(work, "shared", k, study))
            for mode in alive:
                try:
                    if shared is None:
                        raise RuntimeError(f"the shared phase{k} left no checkpoint")
                    status["derive"][mode] = derive_mode_init(shared, mode, os.path.join(work, mode, "init"), study["data"].get("seed", 0))
                except Exception as err:
                    status["derive"][mode] = {"error": f"{type(err).__name__}: {err}"}
                    _log(f"derive {mode} failed: {err}", logf)
            alive = [m for m in alive if os.path.exists(os.path.join(work, m, "init", "config.json"))]
        elif not phase.get("shared"):
            alive = [m for m in alive if final_checkpoint(phase_dir(work, m, k, study))]
        if phase.get("stop_at_answer_nll"):
            for owner in (["shared"] if phase.get("shared") else alive):
                _log(answer_target_note(work, owner, k, study), logf)
        save_status()
        if k == stop_after_phase:
            status["shared_eval"] = finish_shared_eval(shared_eval_job, logf)
            save_status()
            _log(f"stopped after phase {k} as asked ({round(time.time() - began, 1)} s); "
                 f"continue with the same config, --work-dir {work} and --resume", logf)
            logf.close()
            write_log_archive(out_dir, work, study)
            return {"stopped_after_phase": k, "work_dir": work, "logs": os.path.join(out_dir, "logs.tar.gz")}

    # 3. evaluation of every mode that has weights, until the evaluation deadline (the shared phases'
    #    evaluation, which ran beside the per-mode phases, is collected first)
    eval_deadline = deadline - study["reserve_s"]
    if shared_eval_job is not None:
        status["shared_eval"] = finish_shared_eval(shared_eval_job, logf)
    jobs = []
    for mode in study["modes"]:
        ckpt = final_checkpoint(phase_dir(work, mode, len(study["phases"]) - 1, study))
        if ckpt is None:
            status["eval"][mode] = {"skipped": "no final checkpoint"}
            continue
        if os.path.exists(stale := os.path.join(work, mode, "eval.json")):
            os.remove(stale)  # an earlier call's (a resume): never reported as this call's (OUT_FILES: the traces)
        argv = [py, "-m", "nosa.study.evaluate", "--model", ckpt, "--corpus-dir", os.path.join(work, "corpus"),
                "--spec", json.dumps(study["eval"]), "--out", os.path.join(work, mode, "eval.json"),
                "--deadline", str(eval_deadline - 5)]
        if mode in TRACE_MODES:
            argv += ["--traces", os.path.join(out_dir, f"traces_{mode}.npz")]
        jobs.append((mode, argv, os.path.join(logs, f"eval_{mode}.log")))
    if jobs and not study["concurrent"]:
        # back to back: each evaluation gets an equal share of what is left
        share = (eval_deadline - time.time()) / len(jobs)
        for name, argv, log in jobs:
            i = argv.index("--deadline")
            argv[i + 1] = str(time.time() + share - 5)
            status["eval"].update(run_processes([(name, argv, log)], False, time.time() + share, logf))
    else:
        status["eval"].update(run_processes(jobs, True, eval_deadline, logf))

    # 4. summary, plots, archive: from whatever finished
    rows = [mode_row(study, mode, work, status["train"], status["eval"]) for mode in study["modes"]]
    shared_eval = read_shared_eval(work)
    results = {"rows": rows, "shared_eval": shared_eval, "status": status, "study_wall_s": None, "files": {}}
    plots = {}
    try:
        from nosa.study.plots import plot_accuracy, plot_locality, plot_loss

        def loss_plot(rows, path):
            return plot_loss(rows, path, shared_eval)

        for name, fn in (("loss.png", loss_plot), ("accuracy.png", plot_accuracy), ("locality.png", plot_locality)):
            try:
                plots[name] = fn(rows, os.path.join(out_dir, name))
            except Exception as err:
                plots[name] = f"error: {type(err).__name__}: {err}"
    except ImportError as err:
        plots["error"] = str(err)
    results["files"]["plots"] = plots
    results["files"]["traces"] = {m: os.path.basename(p) for m in TRACE_MODES
                                  if os.path.exists(p := os.path.join(out_dir, f"traces_{m}.npz"))}
    results["study_wall_s"] = this_call["wall_s"] = round(time.time() - began, 1)  # this call's
    results["study_wall_s_all_calls"] = round(sum(c["wall_s"] or 0.0 for c in status["calls"]), 1)
    parameters = {"config": config, "study": study, "work_dir": work}
    summary_path = write_json_result(os.path.join(out_dir, "summary.json"), parameters, results)
    _log(f"summary: {summary_path} ({results['study_wall_s']} s)", logf)
    logf.close()
    save_status()
    write_log_archive(out_dir, work, study)
    print_table(rows, study)
    return {"summary": summary_path, "rows": rows}


def write_log_archive(out_dir: str, work: str, study: dict) -> None:
    """logs.tar.gz in out_dir: the study's logs, every phase's config, metrics and train_config, and the
    evaluations (whatever exists so far)."""
    logs = os.path.join(work, "logs")
    for extra in filter(None, os.environ.get("NOSA_STUDY_ATTACH", "").split(",")):
        if os.path.isfile(extra):  # e.g. a GPU utilisation log the launcher kept
            shutil.copy(extra, logs)
    with tarfile.open(os.path.join(out_dir, "logs.tar.gz"), "w:gz") as tar:
        tar.add(logs, arcname="logs")
        if os.path.exists(p := os.path.join(work, "shared", "shared_eval.json")):
            tar.add(p, arcname="shared/shared_eval.json")
        for owner in ["shared", *study["modes"]]:
            for name in ["eval.json"] + [f"phase{k}.yaml" for k in range(len(study["phases"]))]:
                p = os.path.join(work, owner, name)
                if os.path.exists(p):
                    tar.add(p, arcname=f"{owner}/{name}")
            for k in range(len(study["phases"])):
                for name in ("metrics.jsonl", "train_config.json"):
                    p = os.path.join(work, owner, f"phase{k}", name)
                    if os.path.exists(p):
                        tar.add(p, arcname=f"{owner}/phase{k}/{name}")


def print_table(rows: list[dict], study: dict) -> None:
    tasks = study["eval"]["tasks"]
    primary = str(study["eval"].get("primary_length", study["eval"]["lengths"][0]))
    head = ["mode", "params", "tokens", "train_s", "val_loss", "heldout"] + [f"{t[:8]}@{primary}" for t in tasks] + ["gamma", "new/step"]
    print(" | ".join(head))
    for r in rows:
        loc = (r.get("locality") or {}).get(str(study["eval"]["locality_lengths"][0]) if study["eval"].get("locality_lengths") else "", {})
        allp = loc.get("all_prompts", {})

        def f(x, fmt="{:.3f}"):
            return fmt.format(x) if isinstance(x, (int, float)) else "-"

        cells = [r["attn_mode"], f(r.get("parameters"), "{:,}"), f(r.get("tokens_trained"), "{:,}"), f(r.get("train_wall_s"), "{:.0f}"),
                 f(r.get("final_val_loss")), f(r.get("heldout_loss"))]
        cells += [f((r.get("accuracy") or {}).get(t, {}).get(primary), "{:.2f}") for t in tasks]
        cells += [f(allp.get("overlap_mean")), f(allp.get("new_blocks_mean"), "{:.2f}")]
        print(" | ".join(cells))
    errors = {r["attn_mode"]: r["errors"] for r in rows if r["errors"]}
    if errors:
        print("errors:", json.dumps(errors)[:2000])
