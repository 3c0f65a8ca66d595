"""Training checkpoints: safetensors weights + config + tokenizer (a loadable model directory), the
optimizer state and the data position, so a resumed run continues the uninterrupted one exactly.

Layout of `<out_dir>/checkpoints/step_000100/`:
  config.json, model.safetensors      NosaForCausalLM.save_pretrained (from_pretrained loads it)
  nosa_tokenizer.json | tokenizer*    the tokenizer
  optimizer.pt                        AdamW state (full, unsharded)
  trainer_state.json                  step, rows consumed, the training config
`<out_dir>/checkpoints/latest` names the newest complete checkpoint; it is written last, so a save that
was interrupted never becomes the one a resume picks. Each checkpoint is written into `step_N.partial`
and renamed into place when complete, so a killed save never damages an existing checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from nosa.train.distributed import DistInfo, barrier, is_fsdp, unwrap

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
LATEST = "latest"


def checkpoint_root(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def _full_states(model, optimizer):
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)
    return unwrap(model).state_dict(), optimizer.state_dict()


def save_checkpoint(out_dir: str, model, optimizer, tokenizer, step: int, rows_consumed: int, config: dict, info: DistInfo) -> str:
    """Every process must call this (FSDP gathers shards); rank 0 writes. Returns the checkpoint dir."""
    model_state, optim_state = _full_states(model, optimizer)
    root = checkpoint_root(out_dir)
    path = os.path.join(root, f"step_{step:06d}")
    if info.is_main:
        # Written whole into a temporary directory, then renamed into place: a save killed half way
        # leaves only a `.partial` directory (removed by the next save) and every earlier checkpoint,
        # including one of the same step being re-saved, as it was.
        os.makedirs(root, exist_ok=True)
        remove_partial_saves(root)
        partial = path + PARTIAL_SUFFIX
        os.makedirs(partial)
        hf_model = unwrap(model)
        hf_model.save_pretrained(partial, state_dict={k: v.detach().cpu().contiguous() for k, v in model_state.items()})
        inner = tokenizer.inner
        inner.save_pretrained(partial)
        torch.save({"format": "fsdp" if is_fsdp(model) else "plain", "state": optim_state}, os.path.join(partial, OPTIMIZER_FILE))
        with open(os.path.join(partial, STATE_FILE), "w") as f:
            json.dump({"step": step, "rows_consumed": rows_consumed, "world_size": info.world, "config": config}, f, indent=1)
        _replace_dir(partial, path)
        tmp = os.path.join(root, LATEST + ".tmp")
        with open(tmp, "w") as f:
            f.write(os.path.basename(path))
        os.replace(tmp, os.path.join(checkpoint_root(out_dir), LATEST))
    barrier(info)
    return path


PARTIAL_SUFFIX = ".partial"
_OLD_SUFFIX = ".old"


def remove_partial_saves(root: str) -> None:
    """Directories a killed save left behind (never complete checkpoints)."""
    for name in os.listdir(root):
        if name.endswith((PARTIAL_SUFFIX, _OLD_SUFFIX)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _replace_dir(new: str, target: str) -> None:
    """Rename `new` to `target`; a directory cannot be renamed over a non-empty one, so an existing
    target is first renamed aside (a crash between the two renames leaves it under `.old`, and `latest`
    still names the step: find_checkpoint falls back to that copy)."""
    if os.path.exists(target):
        old = target + _OLD_SUFFIX
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def find_checkpoint(resume: str, out_dir: str) -> str:
    """`resume` is a checkpoint directory, or 'latest' for the newest one under out_dir."""
    if resume == "latest":
        pointer = os.path.join(checkpoint_root(out_dir), LATEST)
        if not os.path.exists(pointer):
            raise FileNotFoundError(f"nothing to resume: no {pointer} (no checkpoint was completed in {out_dir})")
        with open(pointer) as f:
            resume = os.path.join(checkpoint_root(out_dir), f.read().strip())
        if not os.path.exists(resume) and os.path.exists(resume + _OLD_SUFFIX):
            os.replace(resume + _OLD_SUFFIX, resume)  # a re-save of this step was killed between its renames
    if not os.path.exists(os.path.join(resume, STATE_FILE)):
        raise FileNotFoundError(f"{resume!r} is not a training checkpoint (no {STATE_FILE})")
    return resume


def _damaged(file: str, what: str) -> ValueError:
    return ValueError(f"{file} is damaged or truncated ({what}); resume from an earlier checkpoint "
                      f"(--resume {os.path.dirname(os.path.dirname(file))}/step_NNNNNN) or start the run over (--overwrite)")


def read_state(path: str) -> dict:
    file = os.path.join(path, STATE_FILE)
    try:
        with open(file) as f:
            state = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _damaged(file, f"not valid JSON: {err}") from None
    missing = [k for k in ("step", "rows_consumed") if not isinstance(state, dict) or k not in state]
    if missing:
        raise _damaged(file, f"no {', '.join(missing)}")
    return state


def load_optimizer(path: str, model, optimizer) -> None:
    file = os.path.join(path, OPTIMIZER_FILE)
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file} is missing: this checkpoint cannot be resumed exactly; resume from "
                                "another one, or start over from its weights with --init-from nosa --init-path")
    try:
        saved = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError, ... for a bad file
        raise _damaged(file, f"{type(err).__name__}: {err}") from None
    if not isinstance(saved, dict) or "format" not in saved or "state" not in saved:
        raise _damaged(file, "not an optimizer state written by nosa train")
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if saved["format"] != "fsdp":
            raise ValueError(f"{path} holds a {saved['format']} optimizer state; resume it with parallel='ddp'")
        set_optimizer_state_dict(model, optimizer, saved["state"], options=StateDictOptions(full_state_dict=True))
        return
    if saved["format"] != "plain":
        raise ValueError(f"{path} holds an FSDP optimizer state; resume it with parallel='fsdp'")
    optimizer.load_state_dict(saved["state"])
