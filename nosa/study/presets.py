"""Study presets: `tiny` (CPU, CI: seconds) and `h200` (one H200, under 9 minutes wall time).

A preset is a plain mapping; a YAML file given to `--config` is merged over the preset it names
(`preset: h200`, default h200), key by key (mappings merged recursively), so a config states only what it
changes. Fields:
  modes        attn_modes trained, all with the same model, data, schedule and seed
  model        NosaConfig fields shared by every mode (attn_mode is set per mode)
  data         corpus, mixture, task_params, task_loss, seed: TrainConfig fields shared by every phase
  phases       a curriculum: list of {seq_len, micro_batch_size, max_steps, time_limit_s, lr, warmup_steps}
               and optionally val_every, mixture (replaces data.mixture), task_params (merged over
               data.task_params, task by task), task_loss (replaces data.task_loss),
               stop_at_answer_nll and stop_window_steps (stop the phase once its answers are learnt:
               nosa/train/answer_target.py); other keys raise (PHASE_KEYS). Phase k > 0 starts from
               phase k - 1's final weights (a fresh optimizer and schedule). A phase with `shared: true` is
               trained once, in its `attn_mode` (default dense), and every mode starts the next phase from
               a copy of the last shared phase's weights (nosa.study.quality.derive_mode_init); shared
               phases come first
  shared_eval  retrieval of every shared phase's final weights, measured right after the shared phases
               (nosa.study.shared_eval): tasks, lengths (each phase is also scored at its own seq_len;
               a task too long for a length is left out), depths, samples, batch_size, seed, time_limit_s
  chain_shared train the shared phases in one process (nosa.study.train_chain; default true) instead of one
               `nosa train` process each
  concurrent   train (and evaluate) the modes as concurrent processes instead of back to back
  eval         what nosa.study.evaluate measures (lengths, depths, samples, locality lengths and steps)
  budget_s     wall time of the whole study; training phases stop by their time_limit_s, evaluation
               gets what is left minus `reserve_s` for the summary, plots and archive
"""

from __future__ import annotations

import copy

# The 8B model's attention geometry where it matters for selection and offloading: head_dim 128, 2 KV
# heads, GQA group 8, block 64, topk 64 = 1 sink + own + 16 window + 16 query-aware + 30 agnostic,
# compression 32/16.
GEOMETRY = {"head_dim": 128, "num_key_value_heads": 2, "num_attention_heads": 16, "block_size": 64,
            "topk_blocks": 64, "sink_blocks": 1, "window_blocks": 16, "query_blocks": 16,
            "compress_kernel": 32, "compress_stride": 16}

MODES = ["dense", "infllmv2", "dma", "nosa"]

TASKS = ["passkey", "multikey_niah", "mqar", "variable_tracking"]

# Training rows (docs/quality.md): task rows are labelled on their answers only (on CPU, loss on every token
# of a drill row kept copying from forming; corpus rows are always labelled on every token), multikey_niah
# rows ask all their keys, and kv_recall rows (training only) hold dozens of facts each asked later at a random
# distance; the evaluation's prompts and answer-only scoring stay as defined in nosa/data/tasks.py.
DATA = {
    "corpus_source": "stdlib",
    "corpus_max_tokens": 40_000_000,
    "mixture": {"corpus": 0.25, "kv_recall": 0.3, "passkey": 0.15, "multikey_niah": 0.15, "mqar": 0.075,
                "variable_tracking": 0.075},
    "task_params": {"multikey_niah": {"num_queries": 4}, "kv_recall": {"facts_per_1k": 4.0}},
    "task_loss": "answer",
    "seed": 0,
}

# Training rows of the later phases: the first run's mixture with copy_drill rows mixed in at every length,
# so the copying skill of phase 0 is kept and drilled at the phase's distances (docs/quality.md).
LONG_MIXTURE = {"corpus": 0.2, "copy_drill": 0.25, "kv_recall": 0.2, "passkey": 0.125, "multikey_niah": 0.125,
                "mqar": 0.05, "variable_tracking": 0.05}

PRESETS = {
    "h200": {
        "modes": MODES,
        "model": {**GEOMETRY, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 6,
                  "max_position_embeddings": 65536, "rope_theta": 500000.0},
        "data": DATA,
        # A curriculum for retrieval (docs/quality.md, "The second GPU run's curriculum" and "CPU: what
        # makes copying form"): shared phases train ONE dense model (rows of <= 4K tokens hold <= topk 64
        # blocks, where every sparse mode computes dense attention anyway), then each mode continues from a
        # copy at 16K, the four side by side with equal steps. Content-based copying is what retrieval
        # needs and what the second run never formed (512-token drill rows, loss on every token: ln 67 for
        # 1,119 steps); on CPU it formed within 400-550 steps on 64-token drill rows with the loss on the
        # copies only, and carried to 256 tokens within ~50 steps. So phase 0a drills copying alone at 64
        # tokens (span_max 24: two spans of 32 do not fit), 0b and 0c use the skill on passkey rows at 256
        # tokens (two-query NIAH rows need 384) and on passkey and NIAH rows at 512, then the rows grow to
        # 2K and 4K with drill rows still 25% of them; the last phase is the per-mode 16K phase. Every phase
        # puts the task loss on the answers only (DATA's task_loss), corpus rows keep the language-model
        # loss. Planned wall time on one H200 (run 3: ~460K tokens/s at 2K, ~0.8 s a step for the four 16K
        # processes, ~14 s start-up per process, so the shared phases run chained in one; 0a: ~0.064 s a
        # step, copying formed at step ~450-740 of runs so far, 60 s hold ~930):
        # ~14 + 60 + 20 + 20 + 45 + 30 + 45 + 176 s of training, ~95 s of evaluation, under budget_s.
        "phases": [
            {"shared": True, "attn_mode": "dense", "seq_len": 64, "micro_batch_size": 128, "max_steps": 2500,
             "time_limit_s": 60, "lr": 2e-3, "warmup_steps": 50, "mixture": {"copy_drill": 1.0},
             "task_params": {"copy_drill": {"span_max": 24}}},
            {"shared": True, "attn_mode": "dense", "seq_len": 256, "micro_batch_size": 64, "max_steps": 400,
             "time_limit_s": 20, "lr": 2e-3, "warmup_steps": 20, "mixture": {"copy_drill": 0.7, "passkey": 0.3}},
            {"shared": True, "attn_mode": "dense", "seq_len": 512, "micro_batch_size": 32, "max_steps": 400,
             "time_limit_s": 20, "lr": 2e-3, "warmup_steps": 20,
             "mixture": {"copy_drill": 0.6, "passkey": 0.2, "multikey_niah": 0.2},
             "task_params": {"multikey_niah": {"num_queries": 2}}},
            {"shared": True, "attn_mode": "dense", "seq_len": 2048, "micro_batch_size": 32, "max_steps": 300,
             "time_limit_s": 45, "lr": 1.5e-3, "warmup_steps": 30, "mixture": LONG_MIXTURE},
            {"shared": True, "attn_mode": "dense", "seq_len": 4096, "micro_batch_size": 16, "max_steps": 120,
             "time_limit_s": 30, "lr": 1e-3, "warmup_steps": 15, "mixture": LONG_MIXTURE},
            # Dense at 8K on the whole GPU (run 3's shared model scored 0 at 16K: what it never saw): ~15M
            # tokens in 45 s, twice what each mode's 16K phase gets. Sparse modes continue from dense weights
            # trained past their topk, as a converted dense checkpoint does.
            {"shared": True, "attn_mode": "dense", "seq_len": 8192, "micro_batch_size": 8, "max_steps": 250,
             "time_limit_s": 45, "lr": 1e-3, "warmup_steps": 10, "mixture": LONG_MIXTURE},
            # 220 steps (the first run had 300): ~156-176 s for the four side by side. The 190 s limit is a
            # backstop that 220 steps of the slowest sparse mode fit, so every mode trains the same tokens.
            # lr 6e-4 (run 3: 1e-3): run 3's dense model lost 4K passkey in this phase (0.92 -> 0.76).
            {"seq_len": 16384, "micro_batch_size": 2, "max_steps": 220, "time_limit_s": 190, "lr": 6e-4,
             "warmup_steps": 20, "mixture": LONG_MIXTURE},
        ],
        "shared_eval": {"tasks": ["passkey", "multikey_niah"], "lengths": [2048, 16384], "depths": [0.0, 0.5, 1.0],
                        "samples": 8, "batch_size": 8, "seed": 1234, "time_limit_s": 60},
        "train": {"weight_decay": 0.1, "grad_clip": 1.0, "min_lr_ratio": 0.1, "val_batches": 2, "log_every": 5},
        "chain_shared": True,
        "concurrent": True,
        "budget_s": 535,
        "reserve_s": 20,
        "eval": {"tasks": TASKS, "lengths": [4096, 8192, 16384, 32768], "primary_length": 16384,
                 "depths": [0.0, 0.25, 0.5, 0.75, 1.0], "samples": 5, "ppl_len": 16384, "ppl_rows": 8,
                 "ppl_buckets": 8, "batch_size": 4, "locality_lengths": [16384, 32768], "locality_steps": 256,
                 "seed": 1234},
    },
    "tiny": {
        "modes": MODES,
        "model": {"head_dim": 16, "num_key_value_heads": 2, "num_attention_heads": 4, "hidden_size": 32,
                  "intermediate_size": 64, "num_hidden_layers": 2, "max_position_embeddings": 4096,
                  "block_size": 16, "topk_blocks": 8, "sink_blocks": 1, "window_blocks": 2, "query_blocks": 2,
                  "compress_kernel": 8, "compress_stride": 4},
        "data": {**DATA, "corpus_max_tokens": 200_000},
        "phases": [
            # The answer target is met at once (a random model's answer NLL is far below 100 nats): the test
            # follows a target stop through the chain, the summary and the report.
            {"shared": True, "attn_mode": "dense", "seq_len": 256, "micro_batch_size": 2, "max_steps": 3,
             "time_limit_s": 60, "lr": 1e-3, "warmup_steps": 1, "mixture": {"copy_drill": 0.5, "passkey": 0.5},
             "stop_at_answer_nll": {"passkey": 100.0}, "stop_window_steps": 1},
            {"shared": True, "attn_mode": "dense", "seq_len": 768, "micro_batch_size": 1, "max_steps": 3,
             "time_limit_s": 60, "lr": 1e-3, "warmup_steps": 1},
            {"seq_len": 640, "micro_batch_size": 1, "max_steps": 2, "time_limit_s": 60, "lr": 1e-3, "warmup_steps": 1},
        ],
        "train": {"weight_decay": 0.1, "grad_clip": 1.0, "min_lr_ratio": 0.1, "val_batches": 1, "log_every": 1},
        "shared_eval": {"tasks": ["passkey", "multikey_niah"], "lengths": [1024], "depths": [0.5], "samples": 1,
                        "batch_size": 2, "seed": 1234, "time_limit_s": 60},
        "chain_shared": True,
        "concurrent": False,
        "budget_s": 600,
        "reserve_s": 10,
        "eval": {"tasks": TASKS, "lengths": [512, 1024], "primary_length": 1024, "depths": [0.5], "samples": 1,
                 "ppl_len": 512, "ppl_rows": 2, "ppl_buckets": 4, "batch_size": 2,
                 "locality_lengths": [256, 320], "locality_steps": 4, "seed": 1234},
    },
}


PHASE_KEYS = {"shared", "attn_mode", "seq_len", "micro_batch_size", "max_steps", "time_limit_s", "lr",
              "warmup_steps", "val_every", "mixture", "task_params", "task_loss", "stop_at_answer_nll",
              "stop_window_steps"}
PHASE_REQUIRED = {"seq_len", "micro_batch_size", "max_steps", "time_limit_s", "lr", "warmup_steps"}
SHARED_EVAL_KEYS = {"tasks", "lengths", "depths", "samples", "batch_size", "seed", "time_limit_s"}


# TrainConfig fields the study fills in for each phase from the phase, `data` and the work dir.
STUDY_SET_TRAIN_KEYS = frozenset({
    "seed", "seq_len", "micro_batch_size", "max_steps", "time_limit_s", "lr", "warmup_steps", "out_dir", "model",
    "corpus_dir", "corpus_source", "corpus_max_tokens", "mixture", "task_params", "task_loss", "init_from",
    "init_path", "stop_at_answer_nll", "stop_window_steps", "val_every"})


def validate(study: dict) -> dict:
    """Refuse phase and shared_eval keys the study does not know (a misspelt key would otherwise be
    silently ignored and the run would train something else than the config says)."""
    phases = study.get("phases")
    if not isinstance(phases, list) or not phases:
        raise ValueError("phases must be a non-empty list of phase mappings")
    seen_unshared = False
    for k, phase in enumerate(phases):
        if not isinstance(phase, dict):
            raise ValueError(f"phases[{k}] must be a mapping, got {phase!r}")
        unknown = sorted(set(phase) - PHASE_KEYS)
        if unknown:
            raise ValueError(f"phases[{k}]: unknown keys {unknown}; known: {sorted(PHASE_KEYS)}")
        missing = sorted(PHASE_REQUIRED - set(phase))
        if missing:
            raise ValueError(f"phases[{k}]: missing keys {missing}")
        if phase.get("shared") and seen_unshared:
            raise ValueError(f"phases[{k}]: a shared phase must come before every per-mode phase")
        seen_unshared = seen_unshared or not phase.get("shared")
        for key in ("mixture", "task_params"):
            if key in phase and not isinstance(phase[key], dict):
                raise ValueError(f"phases[{k}].{key} must be a mapping, got {phase[key]!r}")
        if "stop_at_answer_nll" in phase or "stop_window_steps" in phase:
            # Checked here, before any phase trains: inside the chain it would fail after the earlier
            # phases had spent their time.
            from nosa.data.tasks import TASKS
            from nosa.train.answer_target import validate_thresholds, validate_window

            mixture = phase.get("mixture", study.get("data", {}).get("mixture", {}))
            try:
                thresholds = validate_thresholds(phase.get("stop_at_answer_nll", {}), mixture, TASKS)
                validate_window(phase.get("stop_window_steps"), thresholds, phase["max_steps"])
            except ValueError as err:
                raise ValueError(f"phases[{k}]: {err}") from None
    if not seen_unshared:
        raise ValueError("the last phase must be per mode (not shared): it is what each mode is evaluated on")
    # `train` is merged last into every phase's TrainConfig: a key the study sets per phase would silently
    # replace it in every phase (a `seed` there undid each phase's own seed).
    overriding = sorted(set(study.get("train") or {}) & STUDY_SET_TRAIN_KEYS)
    if overriding:
        raise ValueError(f"train: {overriding} are set by the study for each phase (phases[k] and data); "
                         f"set them there, not in train")
    shared_eval = study.get("shared_eval")
    if shared_eval is not None:
        if not isinstance(shared_eval, dict):
            raise ValueError(f"shared_eval must be a mapping, got {shared_eval!r}")
        unknown = sorted(set(shared_eval) - SHARED_EVAL_KEYS)
        if unknown:
            raise ValueError(f"shared_eval: unknown keys {unknown}; known: {sorted(SHARED_EVAL_KEYS)}")
    return study


def merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("mixture",):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve(config: str | None) -> dict:
    """A preset name, a YAML/JSON file (merged over its `preset`, default h200), or None (h200)."""
    import json
    import os

    import yaml

    if config is None or config in PRESETS:
        return validate(copy.deepcopy(PRESETS[config or "h200"]))
    if not os.path.exists(config):
        raise FileNotFoundError(f"--config {config!r} is neither a preset ({sorted(PRESETS)}) nor a file")
    with open(config) as f:
        data = json.load(f) if config.endswith(".json") else yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{config} must hold a mapping of study options")
    base = data.pop("preset", "h200")
    if base not in PRESETS:
        raise ValueError(f"{config}: preset {base!r} is unknown; known: {sorted(PRESETS)}")
    unknown = sorted(set(data) - set(PRESETS[base]))
    if unknown:
        raise ValueError(f"{config}: unknown study options {unknown}; known: {sorted(PRESETS[base])}")
    return validate(merge(PRESETS[base], data))
