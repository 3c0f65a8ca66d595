"""Training configuration: defaults < YAML/JSON file < command-line flags, validated with clear errors."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import json
import math
import os
from dataclasses import dataclass, field

import yaml

from nosa.data.tasks import TASKS
from nosa.train.answer_target import validate_thresholds, validate_window

INIT_FROM = ("scratch", "nosa", "llama")
PRECISIONS = ("auto", "bf16", "fp32")
PARALLEL = ("ddp", "fsdp")
TASK_LOSSES = ("answer", "full")
# field -> smallest allowed value
INT_FIELDS = {"seq_len": 2, "max_steps": 1, "micro_batch_size": 1, "grad_accum": 1, "log_every": 1, "val_batches": 1,
              "warmup_steps": 0, "save_every": 0, "val_every": 0, "seed": 0}
# field -> (low, high, low excluded, high excluded)
FLOAT_FIELDS = {"lr": (0.0, math.inf, True, True), "min_lr_ratio": (0.0, 1.0, False, False),
                "weight_decay": (0.0, math.inf, False, True), "beta1": (0.0, 1.0, False, True),
                "beta2": (0.0, 1.0, False, True), "eps": (0.0, math.inf, True, True),
                "grad_clip": (0.0, math.inf, False, True), "time_limit_s": (0.0, math.inf, False, True)}
BOOL_FIELDS = ("isolate_documents", "activation_checkpointing", "progress")


@functools.lru_cache(maxsize=1)
def model_fields() -> frozenset:
    """The keyword arguments NosaConfig.__init__ names (its **kwargs excluded)."""
    from nosa.config import NosaConfig

    params = inspect.signature(NosaConfig.__init__).parameters.values()
    return frozenset(p.name for p in params if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))


def _number(name: str, value, low: float, high: float, low_open: bool, high_open: bool) -> float:
    """A finite float in the range, from a number or its text ('1e-3'); ValueError naming the field."""
    text = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{name} must be a number in {text}, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number in {text}, got {value!r}") from None
    if not math.isfinite(number) or number < low or number > high or (low_open and number == low) or (high_open and number == high):
        raise ValueError(f"{name} must be a finite number in {text}, got {value!r}")
    return number


def _integer(name: str, value, low: int) -> int:
    """An int >= low, from an int, an integral float or its text ('1e6'); ValueError naming the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    number = value
    if not isinstance(value, int):
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}") from None
        if not math.isfinite(number) or number != int(number):
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        number = int(number)
    if number < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return number


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
    task_loss: str = "answer"           # answer: loss on task answers only; full: on every token of task rows
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
    # task -> answer NLL: stop (and save) once every named task's answers are learnt this well, averaged
    # over the last stop_window_steps steps (nosa/train/answer_target.py says why and how)
    stop_at_answer_nll: dict = field(default_factory=dict)
    stop_window_steps: int | None = None  # None: answer_target.DEFAULT_WINDOW_STEPS
    progress: bool = True

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Type- and range-check every field, converting numbers written as text (PyYAML reads `1e-3`
        as a string: YAML 1.1 wants a dot in a float) so a value is either usable or refused here,
        never at the first step."""
        for name in ("init_from", "corpus_dir", "corpus_source", "out_dir", "precision", "parallel", "task_loss"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        for name in ("init_path", "tokenizer"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a string (a local directory) or null, got {value!r}")
        if self.init_from not in INIT_FROM:
            raise ValueError(f"init_from must be one of {INIT_FROM}, got {self.init_from!r}")
        if self.init_from != "scratch" and not self.init_path:
            raise ValueError(f"init_from={self.init_from!r} needs init_path (a local checkpoint directory)")
        if self.task_loss not in TASK_LOSSES:
            raise ValueError(f"task_loss must be one of {TASK_LOSSES}, got {self.task_loss!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, got {self.parallel!r}")
        for name, low in INT_FIELDS.items():
            setattr(self, name, _integer(name, getattr(self, name), low))
        if self.corpus_max_tokens is not None:
            self.corpus_max_tokens = _integer("corpus_max_tokens", self.corpus_max_tokens, 1)
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (one prediction needs two tokens), got {self.seq_len}")
        for name, (low, high, low_open, high_open) in FLOAT_FIELDS.items():
            setattr(self, name, _number(name, getattr(self, name), low, high, low_open, high_open))
        for name in BOOL_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        if not isinstance(self.mixture, dict) or not self.mixture:
            raise ValueError(f"mixture must be a non-empty mapping of source -> weight, got {self.mixture!r}")
        known = {"corpus", *TASKS}
        unknown = sorted(set(self.mixture) - known)
        if unknown:
            raise ValueError(f"unknown mixture sources {unknown}; known: {sorted(known)}")
        weights = {}
        for source, weight in self.mixture.items():
            # NaN passes `w < 0` and poisons the cumulative weights: every draw then picks one source.
            weights[source] = _number(f"mixture.{source}", weight, 0.0, math.inf, False, True)
        if sum(weights.values()) <= 0:
            raise ValueError(f"mixture weights must be finite, >= 0 and not all 0, got {self.mixture}")
        self.mixture = weights
        if not isinstance(self.task_params, dict):
            raise ValueError(f"task_params must be a mapping of task -> generator keyword arguments, got {self.task_params!r}")
        unknown = sorted(set(self.task_params) - set(TASKS))
        if unknown:
            raise ValueError(f"task_params names unknown tasks {unknown}; known: {sorted(TASKS)}")
        for task, params in self.task_params.items():
            if not isinstance(params, dict):
                raise ValueError(f"task_params.{task} must be a mapping of keyword arguments, got {params!r}")
        self.stop_at_answer_nll = validate_thresholds(self.stop_at_answer_nll, self.mixture, TASKS)
        if self.stop_window_steps is not None:  # text from YAML converted like every integer field
            self.stop_window_steps = _integer("stop_window_steps", self.stop_window_steps, 1)
        self.stop_window_steps = validate_window(self.stop_window_steps, self.stop_at_answer_nll, self.max_steps)
        if not isinstance(self.model, dict):
            raise ValueError(f"model must be a mapping of NosaConfig fields, got {type(self.model).__name__}")
        # NosaConfig takes **kwargs (transformers passes bookkeeping through it), so a misspelt field
        # would be stored and ignored: the run would train the default size without a word.
        allowed = model_fields()
        unknown = sorted(set(self.model) - allowed)
        if unknown:
            hints = [f"{k} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, allowed, 1)) else k for k in unknown]
            raise ValueError(f"unknown model fields: {', '.join(hints)}; NosaConfig accepts: {sorted(allowed)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def uses_corpus(self) -> bool:
        return self.mixture.get("corpus", 0) > 0


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


# The example configurations ship inside the package (a non-editable install has them too).
PACKAGED_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def packaged_configs() -> list[str]:
    return sorted(os.path.splitext(n)[0] for n in os.listdir(PACKAGED_CONFIGS) if n.endswith((".yaml", ".json")))


def resolve_config_path(path: str) -> str:
    """A file path, or the name of a packaged config (`tiny_cpu`, `tiny_cpu.yaml`, `configs/tiny_cpu.yaml`)
    when no such file exists here."""
    if os.path.exists(path):
        return path
    name = os.path.basename(path)
    for candidate in (name, name + ".yaml", name + ".json"):
        packaged = os.path.join(PACKAGED_CONFIGS, candidate)
        if os.path.dirname(path) in ("", "configs", os.path.join("nosa", "configs")) and os.path.isfile(packaged):
            return packaged
    raise FileNotFoundError(f"config file {path!r} does not exist (and is not a packaged config: "
                            f"{', '.join(packaged_configs())})")


def read_config_file(path: str) -> dict:
    path = resolve_config_path(path)
    with open(path) as f:
        text = f.read()
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"config file {path!r} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: {err}") from None
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
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as err:
        raise ValueError(f"--set {assignment!r}: the value is not valid YAML ({err})") from None
    parts = key.strip().split(".")
    if parts[0] not in FIELDS:
        raise ValueError(f"unknown training option {parts[0]!r}; known: {sorted(FIELDS)}")
    target = values
    if len(parts) > 1 and parts[0] not in values and FIELDS[parts[0]].default_factory is not dataclasses.MISSING:
        # `--set mixture.passkey=0.2` adds to the default mixture (it would otherwise replace it with
        # {passkey: 0.2}); a mapping from the config file is merged into the same way.
        values[parts[0]] = FIELDS[parts[0]].default_factory()
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
