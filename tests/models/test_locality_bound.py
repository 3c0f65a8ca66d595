"""`SparseAttentionConfig.has_locality_bound` (spec sec. 5): the condition as stated, the bound observed
while decoding step by step where it holds, and exceeded where it does not."""

import warnings

import pytest
import torch

from nosa.config import SparseAttentionConfig
from nosa.eval.locality import decode_locality
from tests.helpers import tiny_model

# Geometries without the bound warn when built (tested below): expected here.
pytestmark = pytest.mark.filterwarnings("ignore:this .* geometry has no locality bound")


def condition_by_enumeration(cfg: SparseAttentionConfig, blocks: int = 64) -> bool:
    """Spec sec. 5 read literally: for every block j, every compression window [s*i, s*i + kernel - 1]
    that overlaps block j ends at or before the first token of block j + 1 + window_blocks."""
    B, s, k = cfg.block_size, cfg.compress_stride, cfg.compress_kernel
    for j in range(blocks):
        first, last = j * B, (j + 1) * B - 1
        ends = [i * s + k - 1 for i in range(last // s + 1) if i * s + k - 1 >= first]
        if max(ends) > (j + 1 + cfg.window_blocks) * B:
            return False
    return True


@pytest.mark.parametrize("B", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("W", [0, 1, 2])
@pytest.mark.parametrize("k,s", [(1, 1), (4, 2), (5, 3), (8, 4), (8, 8), (12, 5), (16, 4), (7, 7)])
def test_property_matches_the_condition(B, W, k, s):
    cfg = SparseAttentionConfig(block_size=B, topk_blocks=W + 4, sink_blocks=1, window_blocks=W, query_blocks=1,
                                compress_kernel=k, compress_stride=s, attn_mode="nosa")
    assert cfg.has_locality_bound == condition_by_enumeration(cfg)
    if B % s == 0:  # the closed form the spec gives when the stride divides the block size
        assert cfg.has_locality_bound == (k - s <= W * B + 1)


def test_only_nosa_and_dma_have_the_bound():
    geometry = dict(block_size=8, topk_blocks=6, sink_blocks=1, window_blocks=2, query_blocks=2, compress_kernel=8, compress_stride=4)
    assert [SparseAttentionConfig(attn_mode=m, **geometry).has_locality_bound for m in ("nosa", "dma", "infllmv2", "dense")] \
        == [True, True, False, False]
    assert SparseAttentionConfig().has_locality_bound  # the defaults: 16 <= 1025


FAILING = dict(block_size=4, topk_blocks=4, sink_blocks=1, window_blocks=0, compress_kernel=8, compress_stride=4)


def test_a_geometry_without_the_bound_warns_once_naming_the_fields():
    from nosa import config

    geometry = dict(FAILING, compress_kernel=12)
    config._WARNED_GEOMETRIES.clear()  # whatever this process built before
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SparseAttentionConfig(attn_mode="dma", **geometry)
        SparseAttentionConfig(attn_mode="dma", **geometry)
        SparseAttentionConfig(attn_mode="infllmv2", **geometry)  # no bound to lose: no warning
    messages = [str(w.message) for w in caught if "locality bound" in str(w.message)]
    assert len(messages) == 1
    assert all(f in messages[0] for f in ("window_blocks=0", "compress_kernel=12", "compress_stride=4", "block_size=4"))


def _decode(attn_mode, geometry, seed, prompt=30, steps=90):
    model = tiny_model(attn_mode, seed=seed, **geometry)
    ids = torch.randint(0, 97, (2, prompt + steps), generator=torch.Generator().manual_seed(seed))
    return model, decode_locality(model, ids, prompt, "cpu")


@pytest.mark.parametrize("attn_mode", ["nosa", "dma"])
@pytest.mark.parametrize("geometry", [
    dict(block_size=4, topk_blocks=6, sink_blocks=1, window_blocks=1, query_blocks=2, compress_kernel=8, compress_stride=4),
    dict(block_size=4, topk_blocks=6, sink_blocks=1, window_blocks=1, query_blocks=1, compress_kernel=6, compress_stride=3),
    dict(block_size=3, topk_blocks=6, sink_blocks=0, window_blocks=2, query_blocks=2, compress_kernel=7, compress_stride=2),
])
def test_the_bound_holds_where_the_condition_does(attn_mode, geometry):
    if attn_mode == "dma":
        geometry = dict(geometry, query_blocks=0)
    assert SparseAttentionConfig(attn_mode=attn_mode, **geometry).has_locality_bound
    for seed in (0, 1):
        model, result = _decode(attn_mode, geometry, seed)
        assert result["visible_blocks_first_step"] > geometry["topk_blocks"]  # really sparse
        assert result["violations"] == 0 and result["has_locality_bound"], result["per_layer"]
        assert result["new_blocks_max"] >= 1  # the selection did move: the bound was exercised


@pytest.mark.parametrize("attn_mode, query_blocks", [("dma", 0), ("nosa", 1)])
def test_the_bound_fails_where_the_condition_does_not(attn_mode, query_blocks):
    geometry = dict(FAILING, query_blocks=query_blocks, topk_blocks=4 + query_blocks)
    assert not SparseAttentionConfig(attn_mode=attn_mode, **geometry).has_locality_bound
    results = [_decode(attn_mode, geometry, seed)[1] for seed in (0, 1)]
    assert not any(r["has_locality_bound"] for r in results)
    violations = sum(r["violations"] for r in results)
    assert violations > 0
