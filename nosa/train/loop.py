"""The training loop behind `nosa train`.

One optimizer step reads `world x micro_batch_size x grad_accum` rows. The loss is the token mean over
every label of the step on every process: each micro-batch contributes sum(CE) * world / (global label
count) to the backward pass, because DDP/FSDP average gradients over processes. So the gradient does not
depend on how the step's rows are split over processes and micro-steps (2 GPUs x b == 1 GPU x 2b).
The learning rate is a pure function of the step (linear warm-up, cosine decay to lr * min_lr_ratio), so
it needs no saved scheduler state.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F

from nosa.config import NosaConfig
from nosa.models import NosaForCausalLM
from nosa.train.answer_target import DEFAULT_WINDOW_STEPS, AnswerTarget, target_still_met
from nosa.train.checkpoint import checkpoint_root, find_checkpoint, load_optimizer, read_state, save_checkpoint
from nosa.train.config import TrainConfig
from nosa.data.corpus import TokenCorpus, build_corpus, source_path
from nosa.train.interrupt import StopRequest, stop_on_signals
from nosa.train.distributed import (DistInfo, all_reduce_sum, barrier, cleanup, init_distributed,
                                    skip_gradient_sync, wrap_model)
from nosa.data.packing import CorpusRows, MixtureStream, step_row_indices
from nosa.data.tasks import generate_task
from nosa.data.tokenization import TextTokenizer, load_tokenizer

METRICS_FILE = "metrics.jsonl"


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """lr of optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_tokenizer(cfg: TrainConfig) -> TextTokenizer:
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    if cfg.init_from in ("nosa", "llama"):
        return load_tokenizer(cfg.init_path)
    return load_tokenizer("byte")


def build_model(cfg: TrainConfig, tok: TextTokenizer, resume_dir: str | None = None) -> NosaForCausalLM:
    """Weights in float32 (the master copy; bf16 happens under autocast)."""
    if resume_dir is not None:
        return NosaForCausalLM.from_pretrained(resume_dir, dtype=torch.float32)
    if cfg.init_from == "nosa":
        if cfg.model:
            raise ValueError("init_from='nosa' continues a NOSA checkpoint as it is; remove the `model` fields")
        model = NosaForCausalLM.from_pretrained(cfg.init_path, dtype=torch.float32)
    elif cfg.init_from == "llama":
        model = NosaForCausalLM.from_llama(cfg.init_path, **cfg.model).float()
    else:
        fields = {"vocab_size": tok.vocab_size, "pad_token_id": tok.pad_id, "bos_token_id": tok.bos_id,
                  "eos_token_id": tok.eos_id, **cfg.model}
        model = NosaForCausalLM(NosaConfig(**fields)).float()
    if model.config.vocab_size < tok.vocab_size:
        raise ValueError(f"model vocab_size {model.config.vocab_size} < tokenizer vocabulary {tok.vocab_size}")
    return model


def enable_activation_checkpointing(model: NosaForCausalLM) -> None:
    """Recompute each decoder layer in the backward pass instead of storing its activations."""
    # transformers renamed the method during 5.x; the old name warns where the new one exists.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    # Matrices decay; norms, biases and the eviction head's per-head scale A do not.
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def autocast_context(cfg: TrainConfig, device: torch.device):
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def token_nll(model, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, L-1] float32 next-token cross-entropy, 0 where label == -100; [B, L-1] bool: the argmax is the
    next input token). Position j predicts token j + 1."""
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1]
    nll = F.cross_entropy(logits.float().transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")
    return nll, logits.detach().argmax(-1) == input_ids[:, 1:]


def token_loss_rows(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B] float32: per row, the sum over label != -100 of next-token cross-entropy."""
    return token_nll(model, input_ids, labels)[0].sum(dim=1)


def token_loss_sum(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over label != -100 of next-token cross-entropy (float32)."""
    return token_loss_rows(model, input_ids, labels).sum()


def open_corpus(cfg: TrainConfig, tok: TextTokenizer, info: DistInfo, split: str) -> TokenCorpus:
    if not os.path.exists(os.path.join(cfg.corpus_dir, split, "meta.json")):
        if info.is_main:
            build_corpus(cfg.corpus_dir, cfg.corpus_source, tok, max_tokens=cfg.corpus_max_tokens, seed=cfg.seed)
        barrier(info)
    corpus = TokenCorpus(os.path.join(cfg.corpus_dir, split))
    check_corpus_matches(corpus, cfg)
    corpus.check_tokenizer(tok)
    return corpus


def check_corpus_matches(corpus: TokenCorpus, cfg: TrainConfig) -> None:
    """An existing corpus_dir is only reused when it was built from this config's source and token cap;
    otherwise a changed corpus_source would silently train on the old data."""
    meta = corpus.meta
    built_from = meta.get("source_path") or meta.get("source")
    wanted = source_path(cfg.corpus_source)
    problems = []
    if built_from != wanted and source_path(str(built_from)) != wanted:
        problems.append(f"corpus_source {meta.get('source')!r} (this run: {cfg.corpus_source!r})")
    if meta.get("max_tokens") != cfg.corpus_max_tokens:
        problems.append(f"corpus_max_tokens {meta.get('max_tokens')!r} (this run: {cfg.corpus_max_tokens!r})")
    if problems:
        raise ValueError(
            f"corpus_dir {cfg.corpus_dir!r} was built with {' and '.join(problems)}; rebuild it "
            "with this config (`nosa train --build-corpus` rewrites corpus_dir) or point corpus_dir elsewhere"
        )


def _rewind_metrics(path: str, step: int) -> None:
    """On resume, keep the records up to the checkpoint so the file reads as one uninterrupted run."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    kept = [json.dumps(r) + "\n" for r in records if r.get("step", 0) <= step and r.get("event") != "end"]
    with open(path, "w") as f:
        f.writelines(kept)


def validation_row_count(available: int, cfg: TrainConfig, world: int) -> int:
    return min(available, cfg.val_batches * world * cfg.micro_batch_size)


@torch.no_grad()
def validation_loss(model, rows: CorpusRows, cfg: TrainConfig, info: DistInfo) -> float:
    """Token-mean loss over the first val_batches x world x micro_batch_size rows of the val split: val_batches
    global micro-batches, the rows 1 process x batch W*b reads too, so the value does not depend on how the
    global batch is split over processes (the processes share the rows)."""
    model.eval()
    count = validation_row_count(len(rows), cfg, info.world)
    totals = torch.zeros(2, dtype=torch.float64, device=info.device)
    per_round = info.world * cfg.micro_batch_size
    # Every process runs the same number of forwards: under FSDP each forward is a collective, so a process
    # with one forward fewer (the last round's rows ran out before its turn) would leave the others waiting
    # forever. Such a process runs row 0 again and adds nothing.
    for round_start in range(0, count, per_round):
        start = round_start + info.rank * cfg.micro_batch_size
        indices = list(range(start, min(start + cfg.micro_batch_size, count)))
        counted = bool(indices)
        batch = [rows.row(j) for j in (indices or [0])]
        ids = torch.stack([torch.from_numpy(b[0]) for b in batch]).to(info.device)
        labels = torch.stack([torch.from_numpy(b[1]) for b in batch]).to(info.device)
        with autocast_context(cfg, info.device):
            loss_sum = token_loss_sum(model, ids, labels).double()
        if counted:
            totals[0] += loss_sum
            totals[1] += (labels[:, 1:] != -100).sum()
    all_reduce_sum(totals, info)
    model.train()
    return float(totals[0] / totals[1].clamp(min=1))


# Fields a resume must keep: they decide the data (which rows, in which order, how they are cut and
# tokenized) or the optimisation (schedule, optimizer hyper-parameters, the model itself), so changing
# them would make the resumed run differ from the uninterrupted one. Every other field (time limit,
# logging, checkpoint cadence, validation, precision, out_dir, where the corpus lives) may change.
RESUME_FIXED = ("model", "tokenizer", "corpus_source", "corpus_max_tokens", "seq_len", "isolate_documents", "mixture",
                "task_params", "task_loss", "max_steps", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "beta1", "beta2", "eps",
                "grad_clip", "seed")


def _plain(value):
    """JSON round trip, so a config compares equal to the copy a checkpoint stored (tuples -> lists)."""
    return json.loads(json.dumps(value))


def _same_for_resume(key: str, saved, current) -> bool:
    # The mixture's order is part of its meaning: each row's uniform draw maps to the sources in that order
    # (nosa.data.packing.MixtureStream), so {a, b} and {b, a} give other rows though they compare equal as dicts.
    if key == "mixture" and isinstance(saved, dict) and isinstance(current, dict):
        return list(_plain(saved).items()) == list(current.items())
    return _plain(saved) == current


def check_resume_config(cfg: TrainConfig, state: dict, world: int, resume_dir: str) -> dict:
    """Refuse a resume whose config breaks exact resume; returns the harmless changes {field: [old, new]}."""
    saved = state.get("config") or {}
    current = _plain(cfg.to_dict())
    refused = {k: [saved[k], current[k]] for k in RESUME_FIXED if k in saved and not _same_for_resume(k, saved[k], current[k])}
    saved_rows = state.get("world_size", 1) * saved.get("micro_batch_size", cfg.micro_batch_size) * saved.get("grad_accum", cfg.grad_accum)
    rows = world * cfg.micro_batch_size * cfg.grad_accum
    if saved_rows != rows:
        # Any split of the same global batch over processes, micro-batches and accumulation reads the same
        # rows with the same gradient (see the module docstring); a different global batch does not.
        refused["rows_per_step (world x micro_batch_size x grad_accum)"] = [
            f"{state.get('world_size', 1)} x {saved.get('micro_batch_size')} x {saved.get('grad_accum')} = {saved_rows}",
            f"{world} x {cfg.micro_batch_size} x {cfg.grad_accum} = {rows}"]
    if refused:
        lines = "; ".join(f"{k}: checkpoint {old!r}, now {new!r}" for k, (old, new) in refused.items())
        raise ValueError(
            f"cannot resume {resume_dir!r} exactly with this config: {lines}. Use the checkpoint's values "
            f"(its trainer_state.json holds the config), or start a new run from its weights with "
            f"init_from='nosa', init_path={resume_dir!r}"
        )
    return {k: [saved[k], current[k]] for k in current if k in saved and _plain(saved[k]) != current[k]}


def _read_metrics(metrics_path: str) -> list[dict]:
    if not os.path.exists(metrics_path):
        return []
    with open(metrics_path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _last_logged_loss(metrics_path: str, step: int):
    losses = [r["loss"] for r in _read_metrics(metrics_path) if r.get("step") == step and "event" not in r and "loss" in r]
    return losses[-1] if losses else None


def _answer_target_end(metrics_path: str, step: int) -> dict | None:
    """The end record with which the run ended at `step` by meeting its answer target, else None."""
    ends = [r for r in _read_metrics(metrics_path) if r.get("event") == "end" and r.get("step") == step]
    return ends[-1] if ends and ends[-1].get("stopped_by_answer_target") else None


def _check_out_dir(cfg: TrainConfig, overwrite: bool, info: DistInfo) -> None:
    """A fresh run must not share out_dir with an earlier run's checkpoints: `latest` would still name
    the old run's, and a later --resume would continue the wrong run."""
    root = checkpoint_root(cfg.out_dir)
    if not os.path.isdir(root) or not os.listdir(root):
        return
    if not overwrite:
        raise ValueError(
            f"out_dir {cfg.out_dir!r} already holds checkpoints of another run ({root}); continue it with "
            "--resume, choose another out_dir (--out-dir), or pass --overwrite to delete them"
        )
    barrier(info)  # every process has looked before the main one deletes
    if info.is_main:
        shutil.rmtree(root)
    barrier(info)


def check_tasks(cfg: TrainConfig, tok: TextTokenizer) -> None:
    """Generate one sample of each task of the mixture at seq_len, so a bad task_params entry or a too
    short seq_len fails now instead of when the first such row is drawn, maybe hours in."""
    check_mixture_tasks(cfg.mixture, cfg.task_params, cfg.seq_len, tok)


def check_mixture_tasks(mixture: dict, task_params: dict, seq_len: int, tok: TextTokenizer) -> None:
    """`check_tasks` for a mixture not (yet) in a TrainConfig (the study checks every phase up front)."""
    for task, weight in mixture.items():
        if task == "corpus" or weight <= 0:
            continue
        params = task_params.get(task, {})
        try:
            generate_task(task, tok, np.random.default_rng(0), seq_len, 0.5, **params)
        except (ValueError, TypeError) as err:
            raise ValueError(f"mixture task {task!r} cannot be generated at seq_len={seq_len} with "
                             f"task_params.{task}={params}: {err}") from None


def train(cfg: TrainConfig, resume: str | None = None, device: str | None = None, overwrite: bool = False) -> dict:
    """Run training; returns a summary (also the last line of metrics.jsonl). `resume`: a checkpoint dir
    or 'latest'. `overwrite`: a fresh run may delete the checkpoints already in out_dir."""
    info = init_distributed(device)
    try:
        with stop_on_signals() as stop:
            summary = _train(cfg, resume, info, overwrite, stop)
    except BaseException:
        cleanup(info)  # the group is not freed: its queued work may wait on a process that failed
        raise
    cleanup(info, completed=True)  # freed too, so its threads end before the interpreter does
    return summary


def _train(cfg: TrainConfig, resume: str | None, info: DistInfo, overwrite: bool = False,
           stop_request: StopRequest | None = None) -> dict:
    stop_request = stop_request or StopRequest()
    torch.manual_seed(cfg.seed)
    tok = resolve_tokenizer(cfg)
    check_tasks(cfg, tok)
    resume_dir = find_checkpoint(resume, cfg.out_dir) if resume else None
    window_steps = cfg.stop_window_steps or DEFAULT_WINDOW_STEPS
    start_step, rows_consumed = 0, 0
    metrics_path = os.path.join(cfg.out_dir, METRICS_FILE)
    resume_changes = {}
    if resume_dir:
        state = read_state(resume_dir)
        start_step, rows_consumed = state["step"], state["rows_consumed"]
        resume_changes = check_resume_config(cfg, state, info.world, resume_dir)
        run_metrics = os.path.join(os.path.dirname(os.path.dirname(resume_dir)), METRICS_FILE)
        ended = _answer_target_end(run_metrics, start_step) if cfg.stop_at_answer_nll else None
        # A run that stopped because its answers were learnt, as well as this target asks, is finished too.
        met = ended["stopped_by_answer_target"] if ended and target_still_met(ended, cfg.stop_at_answer_nll, window_steps) else None
        if start_step >= cfg.max_steps or met:
            # Nothing to train: say so, and leave the checkpoint and the metrics as they are.
            why = (f"is already at max_steps={cfg.max_steps}" if start_step >= cfg.max_steps
                   else f"already met stop_at_answer_nll (window means {met})")
            return {"event": "end", "step": start_step, "final_checkpoint": resume_dir,
                    "loss": _last_logged_loss(run_metrics, start_step), "already_finished": True,
                    "stopped_by_time_limit": False, "stopped_by_answer_target": met, "wall_s": 0.0,
                    "message": f"{resume_dir} {why}; nothing was trained or saved"}
    else:
        _check_out_dir(cfg, overwrite, info)
    model = build_model(cfg, tok, resume_dir).to(info.device)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    wrapped = wrap_model(model, info, cfg.parallel)
    optimizer = build_optimizer(wrapped, cfg)
    if resume_dir:
        load_optimizer(resume_dir, wrapped, optimizer)

    # Each split is opened only when it is used: a run without validation needs no usable val split.
    corpus_rows = val_rows = None
    if cfg.uses_corpus:
        corpus_rows = CorpusRows(open_corpus(cfg, tok, info, "train"), cfg.seq_len, cfg.isolate_documents, tok.pad_id)
    if cfg.val_every:
        val_corpus = open_corpus(cfg, tok, info, "val")
        try:
            val_rows = CorpusRows(val_corpus, cfg.seq_len, cfg.isolate_documents, tok.pad_id)
        except ValueError as err:
            raise ValueError(f"val_every={cfg.val_every} needs validation rows: {err}; or set val_every=0") from None
    stream = MixtureStream(tok, cfg.seq_len, cfg.mixture, corpus_rows, cfg.task_params, cfg.seed,
                           full_task_loss=cfg.task_loss == "full")

    if info.is_main:
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, "train_config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=1)
        if resume_dir:
            _rewind_metrics(metrics_path, start_step)
        elif os.path.exists(metrics_path):
            os.remove(metrics_path)
    metrics = open(metrics_path, "a") if info.is_main else None
    if info.is_main and resume_dir:
        metrics.write(json.dumps({"event": "resume", "step": start_step, "from": resume_dir, "rows_consumed": rows_consumed,
                                  "world_size": info.world, "changed": resume_changes}) + "\n")
    if info.is_main and not resume_dir:
        summary_line = {"event": "start", "step": 0, "parameters": sum(p.numel() for p in model.parameters()),
                        "world_size": info.world, "rows_per_step": info.world * cfg.micro_batch_size * cfg.grad_accum,
                        "tokens_per_step": info.world * cfg.micro_batch_size * cfg.grad_accum * cfg.seq_len,
                        "corpus": corpus_rows.summary() if corpus_rows else None}
        metrics.write(json.dumps(summary_line) + "\n")

    progress = None
    if info.is_main and cfg.progress:
        from tqdm import tqdm

        progress = tqdm(total=cfg.max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
    rows_per_step = info.world * cfg.micro_batch_size * cfg.grad_accum
    began = time.time()
    step = start_step
    last = {}
    target = AnswerTarget(cfg.stop_at_answer_nll, window_steps)
    target_met = False
    while step < cfg.max_steps:
        t0 = time.time()
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [stream.batch(step_row_indices(rows_consumed, a, cfg.micro_batch_size, info.world, info.rank))
                   for a in range(cfg.grad_accum)]
        count = torch.tensor(float(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)), device=info.device, dtype=torch.float64)
        global_count = float(all_reduce_sum(count, info))
        if global_count == 0:
            raise RuntimeError(f"step {step} has no label tokens on any process; check the mixture and task lengths")
        # Per source: [loss sums..., label counts...], summed over processes for the log; and over the task
        # answers alone: [answer NLL sums..., answer tokens..., answer tokens predicted by the argmax...],
        # which tells whether retrieval is forming even when the full-row loss is dominated by the haystack.
        by_source = torch.zeros(2 * len(stream.sources), dtype=torch.float64, device=info.device)
        answers = torch.zeros(3 * len(stream.sources), dtype=torch.float64, device=info.device)
        for a, batch in enumerate(batches):
            ids, labels = batch["input_ids"].to(info.device), batch["labels"].to(info.device)
            with skip_gradient_sync(wrapped, a < cfg.grad_accum - 1):
                with autocast_context(cfg, info.device):
                    nll, hits = token_nll(wrapped, ids, labels)
                    rows = nll.sum(dim=1)
                (rows.sum() * (info.world / global_count)).backward()
            counts = (labels[:, 1:] != -100).sum(dim=1)
            answer = batch["answer_mask"].to(info.device)[:, 1:] & (labels[:, 1:] != -100)
            answer_nll = (nll.detach() * answer).sum(dim=1)
            answer_hits = (hits & answer).sum(dim=1)
            answer_count = answer.sum(dim=1)
            n_src = len(stream.sources)
            for row, source in enumerate(batch["sources"]):
                k = stream.sources.index(source)
                by_source[k] += rows[row].detach().double()
                by_source[n_src + k] += counts[row].double()
                answers[k] += answer_nll[row].double()
                answers[n_src + k] += answer_count[row].double()
                answers[2 * n_src + k] += answer_hits[row].double()
        all_reduce_sum(by_source, info)
        all_reduce_sum(answers, info)
        loss_sum = by_source[: len(stream.sources)].sum()
        grad_norm = None
        if cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), cfg.grad_clip)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        rows_consumed += rows_per_step
        step += 1
        loss = float(loss_sum) / global_count
        n = len(stream.sources)
        loss_by_source = {src: float(by_source[k] / by_source[n + k]) for k, src in enumerate(stream.sources)
                          if by_source[n + k] > 0}
        answer_nll_by_source = {src: float(answers[k] / answers[n + k]) for k, src in enumerate(stream.sources)
                                if answers[n + k] > 0}
        answer_acc_by_source = {src: float(answers[2 * n + k] / answers[n + k]) for k, src in enumerate(stream.sources)
                                if answers[n + k] > 0}
        if target.active:
            sums = answers.tolist()
            target_met = target.update({src: sums[k] for k, src in enumerate(stream.sources)},
                                       {src: sums[n + k] for k, src in enumerate(stream.sources)})
        elapsed = time.time() - t0
        tokens = rows_per_step * cfg.seq_len
        last = {"step": step, "loss": loss, "loss_by_source": loss_by_source,
                "answer_nll_by_source": answer_nll_by_source, "answer_token_acc_by_source": answer_acc_by_source, "lr": lr, "grad_norm": grad_norm,
                "label_tokens": int(global_count), "tokens": tokens, "tokens_per_s": tokens / elapsed, "step_s": elapsed,
                "elapsed_s": time.time() - began, "rows_consumed": rows_consumed}
        if cfg.val_every and (step % cfg.val_every == 0 or step == cfg.max_steps):
            last["val_loss"] = validation_loss(wrapped, val_rows, cfg, info)
        if target_met:  # the step that met the target is always logged, with the window's means
            last["stopped_by_answer_target"] = target.means()
        if info.is_main and (step % cfg.log_every == 0 or step == cfg.max_steps or "val_loss" in last or target_met):
            metrics.write(json.dumps(last) + "\n")
            metrics.flush()
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / elapsed:,.0f}")
        out_of_time = cfg.time_limit_s > 0 and time.time() - began >= cfg.time_limit_s
        # Every process must agree to stop at the same step: rank 0's clock decides the time limit, a
        # signal to any process stops all, and the answer target is rank 0's decision too (though every rank
        # computed it from the same sums). One summed vector, one entry per reason: packing them into the
        # digits of one number lost a signal that reached a multiple of 10 processes.
        flags = torch.tensor([float(info.is_main and out_of_time), float(stop_request.requested),
                              float(info.is_main and target_met)], device=info.device)
        timed_out, signalled, target_met = (bool(x > 0) for x in all_reduce_sum(flags, info).tolist())
        stop = timed_out or signalled or target_met
        if step < cfg.max_steps and not stop and cfg.save_every and step % cfg.save_every == 0:
            save_checkpoint(cfg.out_dir, wrapped, optimizer, tok, step, rows_consumed, cfg.to_dict(), info)
        if stop:
            if timed_out:
                last["stopped_by_time_limit"] = True
            if signalled:
                last["stopped_by_signal"] = stop_request.signal_name or "signal on another process"
            break
    if progress is not None:
        progress.close()
    final = save_checkpoint(cfg.out_dir, wrapped, optimizer, tok, step, rows_consumed, cfg.to_dict(), info)
    summary = {"event": "end", "step": step, "final_checkpoint": final, "loss": last.get("loss"),
               "stopped_by_time_limit": bool(last.get("stopped_by_time_limit")),
               "stopped_by_signal": last.get("stopped_by_signal"),
               "stopped_by_answer_target": last.get("stopped_by_answer_target"), "wall_s": time.time() - began}
    if summary["stopped_by_answer_target"]:
        summary["answer_target"] = {"thresholds": cfg.stop_at_answer_nll, "window_steps": window_steps}
    if info.is_main:
        metrics.write(json.dumps(summary) + "\n")
        metrics.close()
        try:
            from nosa.results.plots import plot_training

            summary["plot"] = plot_training(metrics_path, os.path.join(cfg.out_dir, "loss.png"))
        except (ImportError, ValueError) as err:  # no matplotlib, or no step ran: the metrics file stays
            summary["plot_error"] = str(err)
    return summary
