"""NOSA ops with backend dispatch (`nosa.ops.dispatch`): Triton kernels on CUDA tensors, the PyTorch
reference elsewhere.

Every public op here has the signature of its reference: the model's ops in `nosa.ops.reference`, the
decode step's block-cache ops (slot-table diff, gather, window staging and commit, slot plan, attention
inputs, and `spill_step`, the device cache beyond the selection) in `nosa.ops.block_ops`. `plan_in_place` is
`plan_step` of the one-copy path (offload off), where nothing is copied. `use_backend("reference" | "triton" | "auto", only=None)` overrides
the choice (tests compare both paths). `select_rows` is the engine's one selection entry point
(`nosa.ops.selection`), built on the dispatched scoring and selection ops. `launch_share(f)` makes the
kernels that split their work for occupancy size it for a share f of the SMs (`nosa.ops.occupancy`).
"""

from __future__ import annotations

from nosa.ops import block_ops, reference
from nosa.ops.block_ops import HostPages, LayerSlots, LoadPlan, SpillSlots, StepTokens, all_visible, slot_table
from nosa.ops.occupancy import launch_share
from nosa.ops.dispatch import BACKENDS, current_backend, dispatched, dispatched_without_grad, register_kernel, resolve, use_backend
from nosa.ops.util import ceil_div, num_blocks

compress_keys = dispatched("compress_keys")
agnostic_chunk_scores = dispatched("agnostic_chunk_scores")
query_aware_chunk_scores = dispatched("query_aware_chunk_scores")
pool_to_blocks = dispatched("pool_to_blocks")
query_aware_block_scores = dispatched("query_aware_block_scores")
select_blocks = dispatched("select_blocks")
select_for_queries = dispatched("select_for_queries")
sparse_attention = dispatched("sparse_attention")
nosa_attention = dispatched("nosa_attention")
decode_attention = dispatched("decode_attention")
# Inference-time kernels without a backward: the autograd reference wherever a gradient is kept.
eviction_scores = dispatched_without_grad("eviction_scores")
rms_norm = dispatched_without_grad("rms_norm")
apply_rotary = dispatched_without_grad("apply_rotary")

# The decode step's block-cache ops (references in `block_ops`, kernels in `kernels.gather` and `kernels.spill`).
diff_slot_tables = dispatched("diff_slot_tables")
gather_blocks = dispatched("gather_blocks")
stage_window = dispatched("stage_window")
commit_window = dispatched("commit_window")
plan_step = dispatched("plan_step")
plan_in_place = dispatched("plan_in_place")
attention_inputs = dispatched("attention_inputs")
spill_step = dispatched("spill_step")
BLOCK_OPS = block_ops.DISPATCHED

from nosa.ops.selection import select_rows  # noqa: E402  (built on the dispatched ops above)

__all__ = [
    "BACKENDS", "BLOCK_OPS", "register_kernel", "use_backend", "current_backend", "resolve", "reference", "block_ops",
    "compress_keys", "agnostic_chunk_scores", "query_aware_chunk_scores", "pool_to_blocks", "query_aware_block_scores",
    "select_blocks", "select_for_queries", "sparse_attention", "nosa_attention", "decode_attention",
    "eviction_scores", "rms_norm", "apply_rotary", "diff_slot_tables", "gather_blocks", "stage_window", "commit_window", "plan_step", "attention_inputs", "all_visible",
    "HostPages", "LayerSlots", "LoadPlan", "StepTokens", "SpillSlots", "spill_step", "plan_in_place", "slot_table", "select_rows", "ceil_div", "num_blocks",
    "launch_share",
]
