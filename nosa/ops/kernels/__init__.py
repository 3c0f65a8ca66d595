"""Triton kernels for the NOSA ops. `KERNELS` lists them by op name; `nosa.ops.dispatch` reads it on first
use (this package imports nothing of the dispatcher, so there is no import loop between them).

Importing needs triton but no GPU: kernels compile at their first launch, so a CPU-only machine can import
this and run them under TRITON_INTERPRET=1 (the tests do).
"""

from nosa.ops.kernels.attention import sparse_attention
from nosa.ops.kernels.decode import decode_attention
from nosa.ops.kernels.eviction import eviction_scores
from nosa.ops.kernels.norm_rope import apply_rotary, rms_norm
from nosa.ops.kernels.pipeline import nosa_attention
from nosa.ops.kernels.selection import (
    agnostic_chunk_scores, compress_keys, query_aware_block_scores, query_aware_chunk_scores, select_blocks,
    select_for_queries,
)
from nosa.ops.kernels.gather import (
    attention_inputs, commit_window, diff_slot_tables, gather_blocks, plan_in_place, plan_step, stage_window,
)
from nosa.ops.kernels.spill import spill_step

KERNELS = dict((
    ("compress_keys", compress_keys),
    ("agnostic_chunk_scores", agnostic_chunk_scores),
    ("query_aware_chunk_scores", query_aware_chunk_scores),
    ("query_aware_block_scores", query_aware_block_scores),
    ("select_blocks", select_blocks),
    ("select_for_queries", select_for_queries),
    ("sparse_attention", sparse_attention),
    ("nosa_attention", nosa_attention),
    ("decode_attention", decode_attention),
    ("eviction_scores", eviction_scores),
    ("rms_norm", rms_norm),
    ("apply_rotary", apply_rotary),
    ("diff_slot_tables", diff_slot_tables),
    ("gather_blocks", gather_blocks),
    ("stage_window", stage_window),
    ("commit_window", commit_window),
    ("plan_step", plan_step),
    ("plan_in_place", plan_in_place),
    ("attention_inputs", attention_inputs),
    ("spill_step", spill_step),
))

__all__ = [
    "compress_keys", "agnostic_chunk_scores", "query_aware_chunk_scores", "query_aware_block_scores", "select_blocks",
    "select_for_queries",
    "sparse_attention", "nosa_attention", "decode_attention", "eviction_scores", "rms_norm", "apply_rotary",
    "diff_slot_tables", "gather_blocks", "stage_window", "commit_window", "plan_step", "plan_in_place",
    "attention_inputs", "spill_step", "KERNELS",
]
