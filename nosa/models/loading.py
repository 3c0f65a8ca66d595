"""Checks before and around loading a saved model directory, so a missing or damaged file is named with
what to do, instead of a library error that names neither (or a missing model.safetensors reported for
a directory that is not a model at all)."""

from __future__ import annotations

import json
import os
import struct

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


def _damaged(path: str, what: str) -> ValueError:
    return ValueError(f"{path} is damaged or truncated ({what}); save the model again, or use another "
                      "checkpoint (training keeps one per save under runs/<name>/checkpoints/)")


def check_safetensors(path: str) -> None:
    """A safetensors file is an 8-byte header length, a JSON header giving each tensor's byte range, then
    the data: a file cut short or overwritten in its header is found here without reading the data."""
    size = os.path.getsize(path)
    if size < 8:
        raise _damaged(path, f"{size} bytes, shorter than the 8-byte header length")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            raise _damaged(path, f"the header claims {header_len} bytes but the file holds {size}")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise _damaged(path, f"the header is not valid JSON: {err}") from None
    if not isinstance(header, dict):
        raise _damaged(path, "the header is not a mapping of tensors")
    try:
        data_end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise _damaged(path, "a header entry has no data_offsets") from None
    if 8 + header_len + data_end != size:
        raise _damaged(path, f"the header describes {8 + header_len + data_end} bytes, the file holds {size}")


def check_model_directory(path) -> None:
    """Raise FileNotFoundError / ValueError naming the first missing or damaged file of a local model
    directory: config.json first (without it the directory is not a saved model), then the weights."""
    path = os.fspath(path)
    config = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(config):
        raise FileNotFoundError(f"{path!r} holds no {CONFIG_FILE}: it is not a model directory saved with "
                                "save_pretrained (training checkpoints are runs/<name>/checkpoints/step_NNNNNN)")
    try:
        with open(config) as f:
            json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config} is not valid JSON ({err}); restore it, or save the model again") from None
    weights = os.path.join(path, WEIGHTS_FILE)
    if os.path.exists(weights):
        check_safetensors(weights)
    elif not os.path.exists(os.path.join(path, WEIGHTS_INDEX)):
        raise FileNotFoundError(f"{path!r} has a {CONFIG_FILE} but no {WEIGHTS_FILE}: the weights were not saved "
                                "or were removed; save the model again (save_pretrained)")


def checked_from_pretrained(path, load):
    """Run `load()` (transformers' from_pretrained) for `path`; a local directory is checked first, and
    a weights file that still fails to load is named."""
    if not (isinstance(path, (str, os.PathLike)) and os.path.isdir(path)):
        return load()  # a Hub name, or nothing there: transformers says what it looked for
    check_model_directory(path)
    try:
        return load()
    except Exception as err:  # noqa: BLE001 - rewrap only safetensors' own errors, re-raise the rest
        if type(err).__module__.startswith("safetensors") or "safetensors" in type(err).__name__.lower():
            raise _damaged(os.path.join(os.fspath(path), WEIGHTS_FILE), str(err)) from err
        raise
