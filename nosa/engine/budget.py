"""The engine's memory accounting: how many device rows and host pages a configuration gets.

`device_bytes` is what one row and the fixed workspace cost on the device; `plan_memory` turns the user's
budgets into rows (`gpu_memory_budget`) and a host-store cap (`host_memory_budget`), refusing budgets that
cannot hold one sequence with a message that says what to change. Benchmarks that give several
configurations the same budget read `device_bytes`, so they use the engine's own accounting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nosa import ops
from nosa.engine.block_cache import BlockCache
from nosa.engine.host_store import HostStore

# Prompt tokens of one sequence per step (`LLM(prefill_chunk=...)`) and across sequences
# (`max_prefill_tokens`): a 512-token chunk's matmuls are already compute-bound at the 8B shape, and four of
# them let short prompts share a step with a long one (docs/engine.md, "Batched, interleaved prefill").
DEFAULT_PREFILL_CHUNK = 512
DEFAULT_MAX_PREFILL_TOKENS = 2048


@dataclass(frozen=True)
class MemoryPlan:
    """rows: device rows (running sequences at once); host_pages: the host store's cap in pages (it grows to
    it as requests are admitted); row_bytes, workspace_bytes: what `gpu_memory_budget` is charged per row
    and once; page_bytes: one host page (one block of one sequence, K and V, all layers); workspace_tokens:
    prompt tokens the prefill workspace holds at once (the prompts being prefilled share it)."""

    rows: int
    host_pages: int
    row_bytes: int
    workspace_bytes: int
    page_bytes: int
    workspace_tokens: int


def _positive_bytes(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive number of bytes, got {value!r}")


def prefill_workspace_tokens(max_model_len: int, max_prefill_tokens: int) -> int:
    """Prompt tokens the prefill workspace holds at once: one prompt of max_model_len plus one step's budget
    of others (at most another max_model_len), so short prompts can be prefilled beside even the longest."""
    return max_model_len + min(max_prefill_tokens, max_model_len)


def device_bytes(config, dtype: torch.dtype, offload: bool, max_model_len: int,
                 device_cache_blocks: int | None = None,
                 max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS) -> tuple[int, int]:
    """(bytes per row, fixed workspace bytes) that `gpu_memory_budget` is charged: the engine admits
    min(max_num_seqs, (budget - workspace) // row) rows. A device cache beyond the selection
    (device_cache_blocks > topk_blocks) is charged per row like the selection slots (with offload on; off,
    every block is on the device and it allocates nothing). The workspace is the prefill's
    (`prefill_workspace_tokens` of K/V and eviction scores; max_prefill_tokens as given to the LLM)."""
    cfg, L = config.sparse, config.num_hidden_layers
    H, D = config.num_key_value_heads, config.head_dim
    elem = torch.empty((), dtype=dtype).element_size()
    row_bytes = BlockCache.row_bytes(L, H, D, dtype, cfg, max_model_len, device_cache_blocks, in_place=not offload)["total"]
    # Prefill keeps the K/V (and eviction scores) of every layer of the prompts it is prefilling on the
    # device until their install; the scheduler admits a prompt only while their sum fits.
    workspace = L * prefill_workspace_tokens(max_model_len, max_prefill_tokens) * H * (2 * D * elem + 4)
    if not offload:
        # The store lives on the device and is the one copy of the KV (attention reads it in place): a
        # full sequence per row, and once the scratch page the padded decode step's free rows write into.
        page = HostStore.page_bytes(L, H, cfg.block_size, D, dtype)
        row_bytes += ops.num_blocks(max_model_len, cfg.block_size) * page
        workspace += page
    return row_bytes, workspace


# `device_cache_blocks="auto"`: the largest device cache, up to this many times topk_blocks, that still leaves
# the budget room for max_num_seqs rows. 2x (128 blocks at the spec's topk 64) is the largest size measured on
# the GPU: faster than 64 and 96 in every 64K trace-driven run (docs/engine.md, "Device cache beyond the
# selection"); the spill kernels also take at most 128 spill slots.
AUTO_CACHE_MAX_FACTOR = 2


def resolve_device_cache_blocks(config, dtype: torch.dtype, offload: bool, max_model_len: int, max_num_seqs: int,
                                gpu_memory_budget: int | None, device_cache_blocks,
                                max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS) -> int | None:
    """The device cache size the engine allocates: `device_cache_blocks` itself, or for "auto" the largest
    size (at most AUTO_CACHE_MAX_FACTOR x topk_blocks, and no more than max_model_len's blocks) whose rows
    still fit max_num_seqs of them in gpu_memory_budget, so the cache only takes memory no row would use.
    "auto" gives None (the selection only) where there is nothing to spare: dense mode, offload off (every
    block is on the device already), no gpu_memory_budget (the engine then allocates exactly what
    max_num_seqs rows need), or a budget that max_num_seqs rows already fill."""
    if device_cache_blocks != "auto":
        return device_cache_blocks
    cfg = config.sparse
    if not cfg.is_sparse or not offload or gpu_memory_budget is None:
        return None
    _positive_bytes("gpu_memory_budget", gpu_memory_budget)
    ceiling = min(AUTO_CACHE_MAX_FACTOR * cfg.topk_blocks, ops.num_blocks(max_model_len, cfg.block_size))
    for blocks in range(ceiling, cfg.topk_blocks, -1):
        row_bytes, workspace = device_bytes(config, dtype, offload, max_model_len, blocks, max_prefill_tokens)
        if (gpu_memory_budget - workspace) // row_bytes >= max_num_seqs:
            return blocks
    return None


def plan_memory(config, dtype: torch.dtype, offload: bool, max_model_len: int, max_num_seqs: int,
                gpu_memory_budget: int | None, host_memory_budget: int | None,
                device_cache_blocks: int | None = None,
                max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS) -> MemoryPlan:
    cfg, L = config.sparse, config.num_hidden_layers
    H, D = config.num_key_value_heads, config.head_dim
    page_bytes = HostStore.page_bytes(L, H, cfg.block_size, D, dtype)
    max_blocks = ops.num_blocks(max_model_len, cfg.block_size)
    row_bytes, workspace = device_bytes(config, dtype, offload, max_model_len, device_cache_blocks, max_prefill_tokens)
    rows = max_num_seqs
    if gpu_memory_budget is not None:
        _positive_bytes("gpu_memory_budget", gpu_memory_budget)
        rows = min(rows, (gpu_memory_budget - workspace) // row_bytes)
        if rows < 1:
            raise ValueError(
                f"gpu_memory_budget={gpu_memory_budget} bytes is too small: one sequence of max_model_len="
                f"{max_model_len} tokens needs {row_bytes} bytes of device state plus {workspace} bytes of "
                f"prefill workspace ({row_bytes + workspace} in all); raise the budget or lower max_model_len"
            )
    # The rows never hold more than rows * max_blocks pages at once: a larger budget is capped there.
    pages = rows * max_blocks
    if offload and host_memory_budget is not None:
        _positive_bytes("host_memory_budget", host_memory_budget)
        if host_memory_budget // page_bytes < 1:
            raise ValueError(
                f"host_memory_budget={host_memory_budget} bytes is too small: one block of {cfg.block_size} "
                f"tokens needs {page_bytes} bytes (K and V of {L} layers)"
            )
        pages = min(pages, host_memory_budget // page_bytes)
    return MemoryPlan(rows=rows, host_pages=pages, row_bytes=row_bytes, workspace_bytes=workspace, page_bytes=page_bytes,
                      workspace_tokens=prefill_workspace_tokens(max_model_len, max_prefill_tokens))
