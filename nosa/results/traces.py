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


MAPPING_RULE = (
    "a trace of prompt length P_t replays on a prompt of length P >= P_t with P - P_t a multiple of the block "
    "size: with D = (P - P_t) / block_size and W = the first block of the forced window at the trace's first "
    "step (P_t // block_size - window_blocks), block b maps to b for the sink blocks (b < sink_blocks), to b + D "
    "for b >= W (window, own block and everything newer move with the position), and to sink + floor((b - sink) "
    "* (W + D - sink) / (W - sink)) in between (the history stretched proportionally). The map is one fixed, "
    "strictly increasing function of the block id for the whole trace, so every step selects as many blocks "
    "as in the trace, the blocks that change between two steps are the images of the trace's (same count: "
    "the locality is kept exactly), the own block maps to the own block and no id passes it"
)


def map_to_prompt(trace: np.ndarray, trace_first: int, target_first: int, block_size: int, sink_blocks: int,
                  window_blocks: int) -> np.ndarray:
    """A trace `[..., S, H, K]` whose step s is the query at trace_first + s, remapped (MAPPING_RULE) so
    step s is the query at target_first + s. Returns int32, -1 kept."""
    if target_first < trace_first:
        raise ValueError(f"a trace recorded at a {trace_first}-token prompt cannot replay on a shorter prompt "
                         f"({target_first} tokens): its history would not fit; use a trace of <= {target_first} tokens")
    if (target_first - trace_first) % block_size:
        raise ValueError(f"prompt length {target_first} and the trace's {trace_first} must differ by a multiple of "
                         f"block_size={block_size}, so the steps cross block boundaries where the trace did")
    shift = (target_first - trace_first) // block_size
    window_start = trace_first // block_size - window_blocks
    b = np.asarray(trace).astype(np.int64)
    out = np.where(b >= window_start, b + shift, b)
    if window_start > sink_blocks:
        stretched = sink_blocks + ((b - sink_blocks) * (window_start + shift - sink_blocks)) // (window_start - sink_blocks)
        out = np.where((b >= sink_blocks) & (b < window_start), stretched, out)
    return np.where(b < 0, -1, out).astype(np.int32)


def check_geometry(meta: dict, path: str, **engine) -> None:
    """Raise ValueError naming every field where the traced model's geometry differs from `engine`'s."""
    geometry = meta.get("geometry", {})
    wrong = [f"{k}: trace {geometry.get(k)!r}, benchmark {v!r}" for k, v in engine.items() if geometry.get(k) != v]
    if wrong:
        raise ValueError(f"{path}: the trace's geometry does not match the benchmark's ({'; '.join(wrong)}); "
                         f"block ids only mean the same blocks under the same block size and topk")


def benchmark_traces(path: str, prompt_len: int, layers: int, kv_heads: int, steps: int, block_size: int,
                     topk_blocks: int) -> tuple[list[np.ndarray], dict]:
    """The traces of `path` laid onto a benchmark model: layers l -> l mod L, heads h -> h mod H
    (`replay`), positions by MAPPING_RULE onto a `prompt_len`-token prompt; at least `steps` decode steps
    each. Traces recorded at a longer prompt than prompt_len are left out (and listed). Returns (one int32
    `[layers, steps, kv_heads, topk]` per trace used, a description for the result file)."""
    data = load_traces(path)
    meta = data["meta"]
    check_geometry(meta, path, block_size=block_size, topk_blocks=topk_blocks)
    geometry = meta["geometry"]
    mapped, used = [], []
    for i, (trace, first) in enumerate(zip(data["traces"], data["first_position"])):
        if first > prompt_len:
            continue  # recorded at a longer prompt than the benchmark's: its history does not fit
        used.append(i)
        if trace.shape[1] < steps:
            raise ValueError(f"{path}: trace {i} has {trace.shape[1]} decode steps, the benchmark runs {steps}")
        laid = replay(trace[:, :steps], layers, kv_heads)
        mapped.append(map_to_prompt(laid, first, prompt_len, block_size, geometry["sink_blocks"], geometry["window_blocks"]))
    if not used:
        raise ValueError(f"{path}: every trace was recorded at a longer prompt ({min(data['first_position'])}+ tokens) "
                         f"than the benchmark's {prompt_len}; a trace replays only on a prompt at least as long")
    description = {
        "trace_file": path, "attn_mode": meta.get("attn_mode"), "labels": [data["labels"][i] for i in used],
        "trace_prompt_tokens": [data["first_position"][i] for i in used],
        "trace_steps": [int(data["traces"][i].shape[1]) for i in used],
        "skipped_longer_than_prompt": [data["labels"][i] for i in range(len(data["traces"])) if i not in used],
        "traced_layers": geometry.get("num_layers"), "traced_kv_heads": geometry.get("num_kv_heads"),
        "layer_map": f"benchmark layer l replays trace layer l mod {geometry.get('num_layers')}: {layer_map(layers, trace.shape[0])}",
        "head_map": f"kv head h replays trace head h mod {trace.shape[2]}",
        "sequence_map": f"benchmark sequence i replays trace i mod {len(mapped)}",
        "position_map": MAPPING_RULE,
    }
    return mapped, description
