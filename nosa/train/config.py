"""Training configuration: defaults < YAML/JSON file < command-line flags, validated with clear errors."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

import yaml

from nosa.train.tasks import TASKS

INIT_FROM = ("scratch", "nosa", "llama")
PRECISIONS = ("auto", "bf16", "fp32")
PARALLEL = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    # what to train
    init_from: str = "scratch"          # scratch | nosa (a NOSA checkpoint dir) | llama (a dense Llama dir)
    init_path: str | None = None
    model: dict = field(default_factory=dict)  # NosaConfig fields (scratch) or overrides (llama: sparse fields)
    tokenizer: str | None = None        # 'byte' or a local tokenizer dir; default: byte, or init_path's
    # data
    corpus_dir: str = "data/stdlib"
    corpus_source: str = "stdlib"       # used to build corpus_dir when it does not exist yet
    corpus_max_tokens: int | None = None
    seq_len: int = 1024
    isolate_documents: bool = False     # True: one document (piece) per row, no attention across documents
    mixture: dict = field(default_factory=lambda: {"corpus": 1.0})  # source -> weight (corpus and TASKS)
    task_params: dict = field(default_factory=dict)  # task -> generator keyword arguments
    # optimisation
    max_steps: int = 1000
    micro_batch_size: int = 8           # rows per process per micro-step
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1           # cosine decays to lr * min_lr_ratio at max_steps
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0              # 0 disables clipping
    # run
    out_dir: str = "runs/train"
    seed: int = 0
    precision: str = "auto"             # auto: bf16 autocast on CUDA, fp32 on CPU
    activation_checkpointing: bool = False
    parallel: str = "ddp"               # how several processes split the work under torchrun
    log_every: int = 1
    save_every: int = 0                 # 0: only at the end
    val_every: int = 0                  # 0: never during training
    val_batches: int = 4
    time_limit_s: float = 0.0           # > 0: stop (and save) once this much wall time has passed
    progress: bool = True

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.init_from not in INIT_FROM:
            raise ValueError(f"init_from must be one of {INIT_FROM}, got {self.init_from!r}")
        if self.init_from != "scratch" and not self.init_path:
            raise ValueError(f"init_from={self.init_from!r} needs init_path (a local checkpoint directory)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, got {self.parallel!r}")
        for name in ("seq_len", "max_steps", "micro_batch_size", "grad_accum", "log_every", "val_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (one prediction needs two tokens), got {self.seq_len}")
        for name in ("warmup_steps", "save_every", "val_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("grad_clip and weight_decay must be >= 0")
        if not isinstance(self.mixture, dict) or not self.mixture:
            raise ValueError(f"mixture must be a non-empty mapping of source -> weight, got {self.mixture!r}")
        known = {"corpus", *TASKS}
        unknown = sorted(set(self.mixture) - known)
        if unknown:
            raise ValueError(f"unknown mixture sources {unknown}; known: {sorted(known)}")
        if any(not isinstance(w, (int, float)) or w < 0 for w in self.mixture.values()) or sum(self.mixture.values()) <= 0:
            raise ValueError(f"mixture weights must be >= 0 and not all 0, got {self.mixture}")
        unknown = sorted(set(self.task_params) - set(TASKS))
        if unknown:
            raise ValueError(f"task_params names unknown tasks {unknown}; known: {sorted(TASKS)}")
        if not isinstance(self.model, dict):
            raise ValueError(f"model must be a mapping of NosaConfig fields, got {type(self.model).__name__}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def uses_corpus(self) -> bool:
        return self.mixture.get("corpus", 0) > 0


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def read_config_file(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    with open(path) as f:
        data = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of training options, got {type(data).__name__}")
    return data


def apply_override(values: dict, assignment: str) -> None:
    """'key=value' or 'model.key=value' (value parsed as YAML: numbers, booleans, lists, mappings)."""
    if "=" not in assignment:
        raise ValueError(f"--set takes key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    value = yaml.safe_load(raw) if raw else None
    parts = key.strip().split(".")
    if parts[0] not in FIELDS:
        raise ValueError(f"unknown training option {parts[0]!r}; known: {sorted(FIELDS)}")
    target = values
    for part in parts[:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ValueError(f"{key}: {part} is not a mapping")
    target[parts[-1]] = value


def make_config(file: str | None = None, overrides: list[str] = (), **flags) -> TrainConfig:
    values: dict = read_config_file(file) if file else {}
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown training options in {file}: {unknown}; known: {sorted(FIELDS)}")
    for assignment in overrides:
        apply_override(values, assignment)
    values.update({k: v for k, v in flags.items() if v is not None})
    return TrainConfig(**values)
