"""Triton decode attention over device slots against the reference, on CPU under the interpreter."""

import functools

import pytest
import torch

from nosa.ops import reference as ref
from nosa.ops.kernels import decode as kd


@pytest.mark.parametrize("fused", [True, False], ids=["fused-merge", "merge-kernel"])
@pytest.mark.parametrize("batch,hq,h,d,slots,splits,bias,dtype", [
    (3, 4, 4, 64, 40, 1, True, torch.float32),     # GQA 1, one chunk
    (2, 12, 4, 128, 130, 3, True, torch.float32),  # GQA 3, uneven chunks
    (1, 16, 1, 64, 96, 2, False, torch.float16),   # GQA 16, no bias
    (2, 8, 2, 64, 300, 3, True, torch.float16),    # GQA 4, three chunks of 128
])
def test_decode_attention_matches_reference(batch, hq, h, d, slots, splits, bias, dtype, fused):
    q = torch.randn(batch, hq, d).to(dtype)
    k = torch.randn(batch, slots, h, d).to(dtype)
    v = torch.randn(batch, slots, h, d).to(dtype)
    b = torch.randn(batch, slots, h) if bias else None
    valid = torch.rand(batch, slots, h) > 0.3
    valid[0, :, 0] = False  # a head with no valid slot returns zeros, as the reference does
    got = kd.decode_attention(q, k, v, b, valid, splits=splits, fused_merge=fused)
    want = ref.decode_attention(q.float(), k.float(), v.float(), b, valid)
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


def test_decode_shape_errors():
    with pytest.raises(ValueError, match="valid must be"):
        kd.decode_attention(torch.randn(1, 2, 64), torch.randn(1, 8, 1, 64), torch.randn(1, 8, 1, 64), None,
                            torch.ones(1, 8, 2, dtype=torch.bool))


def _paged_case(batch, h, d, slots, block, pages_count, dtype, seed=0):
    """A store of pages, a block table naming some of them (-1 for a few slots), and the same blocks
    gathered into slots: the two layouts `decode_attention` takes, holding the same values."""
    g = torch.Generator().manual_seed(seed)
    pages_k = torch.randn(pages_count, h, block, d, generator=g).to(dtype)
    pages_v = torch.randn(pages_count, h, block, d, generator=g).to(dtype)
    table = torch.randint(0, pages_count, (batch, h, slots), generator=g, dtype=torch.int32)
    table[0, 0, 1] = -1  # a slot without a page is not attended
    valid = torch.rand(batch, slots * block, h, generator=g) > 0.2
    bias = torch.randn(batch, slots * block, h, generator=g)
    # The slot path's layout, built independently of `paged_slots`: slot j of head h is page table[b, h, j].
    k_slots = torch.stack([torch.stack([pages_k[table[b, hh].clamp(min=0).long(), hh] for hh in range(h)], 2)
                           for b in range(batch)]).reshape(batch, slots * block, h, d)
    v_slots = torch.stack([torch.stack([pages_v[table[b, hh].clamp(min=0).long(), hh] for hh in range(h)], 2)
                           for b in range(batch)]).reshape(batch, slots * block, h, d)
    return pages_k, pages_v, table, valid, bias, k_slots, v_slots


@pytest.mark.parametrize("kernel,slots,splits,dtype", [
    (False, 5, None, torch.float32), (True, 5, None, torch.float32),
    (True, 20, 3, torch.float16),  # 320 slot tokens in three chunks of 128: chunks cut through blocks
], ids=["reference", "triton", "triton-fp16-splits"])
def test_paged_decode_reads_the_slots_in_place(kernel, slots, splits, dtype):
    """The one-copy path (offload off): reading the store's pages through a block table gives the slot
    path's result over the same values, bit for bit (same tokens, same order), in both implementations."""
    pages_k, pages_v, table, valid, bias, k_slots, v_slots = _paged_case(2, 2, 64, slots, 16, 7, dtype)
    q = torch.randn(2, 4, 64).to(dtype)
    fn = functools.partial(kd.decode_attention, splits=splits) if kernel else ref.decode_attention
    slot_valid = ref.paged_valid(valid, table, 16)
    want = fn(q, k_slots, v_slots, bias, slot_valid)
    got = fn(q, pages_k, pages_v, bias, valid, table)
    assert torch.equal(got, want)
    if kernel:
        tol = 2e-5 if dtype == torch.float32 else 2e-3
        exact = ref.decode_attention(q.float(), pages_k.float(), pages_v.float(), bias, valid, table)
        torch.testing.assert_close(got.float(), exact, atol=tol, rtol=tol)


def test_paged_decode_shape_errors():
    pages = torch.randn(4, 2, 8, 64)
    with pytest.raises(ValueError, match="block_table"):
        kd.decode_attention(torch.randn(1, 4, 64), pages, pages, None, torch.ones(1, 24, 2, dtype=torch.bool),
                            torch.zeros(1, 3, 3, dtype=torch.int32))


def test_decode_autotuning_never_changes_the_key_tile():
    """The tile sets the online softmax's rescaling points, so tuning it would let the paged (offload off) and
    slot (offload on) kernels, tuned apart, round differently: seen as different bf16 tokens on the H200."""
    from nosa.ops.kernels.decode import PARTIAL_BLOCK_S, _partial_configs

    for interpret in (False, True):
        configs = _partial_configs(interpret)
        assert configs and {c.kwargs["BLOCK_S"] for c in configs} == {PARTIAL_BLOCK_S}
    assert len(_partial_configs(False)) > 1  # warps and stages are still tuned
