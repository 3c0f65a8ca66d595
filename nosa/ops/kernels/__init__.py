"""Triton kernels for the NOSA ops. Importing this package registers them with `nosa.ops` dispatch.

Importing needs triton but no GPU: kernels compile at their first launch, so a CPU-only machine can import
this and run them under TRITON_INTERPRET=1 (the tests do).
"""

from nosa.ops import register_kernel
from nosa.ops.kernels.attention import sparse_attention
from nosa.ops.kernels.decode import decode_attention
from nosa.ops.kernels.pipeline import nosa_attention
from nosa.ops.kernels.selection import (
    agnostic_chunk_scores, compress_keys, query_aware_block_scores, query_aware_chunk_scores, select_blocks,
    select_for_queries,
)

for _name, _fn in (
    ("compress_keys", compress_keys),
    ("agnostic_chunk_scores", agnostic_chunk_scores),
    ("query_aware_chunk_scores", query_aware_chunk_scores),
    ("query_aware_block_scores", query_aware_block_scores),
    ("select_blocks", select_blocks),
    ("select_for_queries", select_for_queries),
    ("sparse_attention", sparse_attention),
    ("nosa_attention", nosa_attention),
    ("decode_attention", decode_attention),
):
    register_kernel(_name, _fn)

__all__ = [
    "compress_keys", "agnostic_chunk_scores", "query_aware_chunk_scores", "query_aware_block_scores", "select_blocks",
    "select_for_queries",
    "sparse_attention", "nosa_attention", "decode_attention",
]
