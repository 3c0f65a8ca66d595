"""Selection traces: the blocks a trained sparse model selected at every decoding step, saved compactly
for the trace-driven decode benchmark to replay.

File format (`save_traces` / `load_traces`, one .npz per attn_mode):
  trace_<i>            int16 `[num_layers, steps, H_kv, K]`, selected block ids, -1 for unused slots; step s is
                       the query at position first_position[i] + s (the engine's `selections`)
  first_position       int64 `[n]`: the prompt length of trace i
  meta                 JSON text: attn_mode, geometry (block_size, topk_blocks, sink/window/query blocks,
                       compression, num_layers, num_kv_heads, head_dim) and per trace a label (what the
                       prompt was: held-out text or a task input) and the prompt length.
Block ids fit int16 up to 32767 blocks (2M tokens at block 64); save_traces refuses larger ids.

Replaying on a model with more layers (`layer_map`): layer l of a model with N layers replays trace layer
l mod L, where L is the traced model's layer count. Selection statistics differ between layers (in the
study's trained models the first and last layers select less locally than the middle ones, see
results/quality/locality.png), so cycling the traced layers keeps that mix in the same proportion, where e.g. stretching (l * L // N) would also keep
it; cycling is the one documented mapping so benchmarks stay comparable. KV heads map the same way
(h mod H_kv) when the target has more KV heads.
"""

from __future__ import annotations

import json

import numpy as np

TRACE_VERSION = 1


def save_traces(path: str, traces: list, first_positions: list[int], meta: dict, labels: list[str]) -> str:
    """traces: per prompt an int array `[L, S, H, K]` (torch or numpy); returns path."""
    if not traces or len(traces) != len(first_positions) or len(traces) != len(labels):
        raise ValueError(f"need one first_position and one label per trace, got {len(traces)} traces, "
                         f"{len(first_positions)} positions and {len(labels)} labels")
    arrays = {}
    for i, trace in enumerate(traces):
        a = np.asarray(trace.cpu() if hasattr(trace, "cpu") else trace)
        if a.ndim != 4:
            raise ValueError(f"trace {i} must be [layers, steps, kv_heads, topk], got shape {a.shape}")
        if a.size and int(a.max()) > np.iinfo(np.int16).max:
            raise ValueError(f"trace {i} holds block id {int(a.max())}, beyond int16; the format stores int16")
        arrays[f"trace_{i}"] = a.astype(np.int16)
    full_meta = {"version": TRACE_VERSION, **meta,
                 "traces": [{"label": lab, "first_position": int(p), "shape": list(arrays[f"trace_{i}"].shape)}
                            for i, (lab, p) in enumerate(zip(labels, first_positions))]}
    np.savez_compressed(path, first_position=np.asarray(first_positions, dtype=np.int64),
                        meta=np.asarray(json.dumps(full_meta)), **arrays)
    return path


def load_traces(path: str) -> dict:
    """{'meta': dict, 'traces': [int16 [L, S, H, K]], 'first_position': [int], 'labels': [str]}."""
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        if meta.get("version") != TRACE_VERSION:
            raise ValueError(f"{path}: trace format version {meta.get('version')!r}, this code reads {TRACE_VERSION}")
        n = len(meta["traces"])
        traces = [data[f"trace_{i}"] for i in range(n)]
        first = [int(x) for x in data["first_position"]]
    return {"meta": meta, "traces": traces, "first_position": first, "labels": [t["label"] for t in meta["traces"]]}


def layer_map(target_layers: int, trace_layers: int) -> list[int]:
    """Trace layer replayed by each layer of a model with `target_layers` layers: l -> l mod trace_layers."""
    if target_layers < 1 or trace_layers < 1:
        raise ValueError(f"layer counts must be >= 1, got {target_layers} and {trace_layers}")
    return [l % trace_layers for l in range(target_layers)]


def replay(trace: np.ndarray, target_layers: int, target_kv_heads: int | None = None) -> np.ndarray:
    """A trace `[L, S, H, K]` laid onto `target_layers` layers (and KV heads: h -> h mod H)."""
    out = trace[layer_map(target_layers, trace.shape[0])]
    if target_kv_heads is not None:
        out = out[:, :, [h % trace.shape[2] for h in range(target_kv_heads)]]
    return out
