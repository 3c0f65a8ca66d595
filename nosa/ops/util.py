"""Small arithmetic shared by the ops, the engine and the benchmarks, written once."""

from __future__ import annotations


def ceil_div(numerator: int, denominator: int) -> int:
    """The smallest integer >= numerator / denominator (positive denominator)."""
    return -(-numerator // denominator)


def num_blocks(num_tokens: int, block_size: int) -> int:
    """Key blocks that `num_tokens` tokens occupy: the last one may be partial."""
    return ceil_div(num_tokens, block_size)
