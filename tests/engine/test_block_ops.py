"""The slot-table diff and the block gather: reference semantics, and the Triton kernels (interpreter on
CPU) equal to the reference."""

import pytest
import torch

from nosa.engine import block_ops
from nosa.ops.kernels import gather as kernels


def random_tables(rows, slots, num_blocks, generator):
    """Random slot tables and selections: unique block ids per row, some -1."""
    tables, selections = [], []
    for _ in range(rows):
        table = torch.randperm(num_blocks, generator=generator)[:slots].int()
        table[torch.rand(slots, generator=generator) < 0.3] = -1
        chosen = torch.randperm(num_blocks, generator=generator)[: int(torch.randint(0, slots + 1, (1,), generator=generator))]
        sel = torch.full((slots,), -1, dtype=torch.int32)
        sel[: len(chosen)] = chosen.sort().values.int()
        tables.append(table)
        selections.append(sel)
    return torch.stack(tables), torch.stack(selections)


@pytest.mark.parametrize("slots", [1, 6, 7, 64])
def test_diff_keeps_resident_blocks_and_fills_freed_slots(slots):
    g = torch.Generator().manual_seed(slots)
    table, selected = random_tables(50, slots, 3 * slots + 2, g)
    new_table, miss_block, miss_slot = block_ops.diff_slot_tables(table, selected)
    for n in range(table.shape[0]):
        want = set(selected[n][selected[n] >= 0].tolist())
        assert set(new_table[n][new_table[n] >= 0].tolist()) == want  # exactly the selection is resident
        assert (new_table[n] >= 0).sum() == len(want)  # no block twice
        for j in range(slots):  # resident blocks never move
            if int(table[n, j]) in want:
                assert new_table[n, j] == table[n, j]
        misses = [(int(b), int(s)) for b, s in zip(miss_block[n], miss_slot[n]) if b >= 0]
        assert sorted(b for b, _ in misses) == sorted(want - set(table[n].tolist()))
        for block, slot in misses:
            assert new_table[n, slot] == block and int(table[n, slot]) not in want


@pytest.mark.parametrize("slots", [1, 6, 7, 64])
def test_diff_kernel_equals_reference(slots):
    g = torch.Generator().manual_seed(100 + slots)
    table, selected = random_tables(37, slots, 2 * slots + 3, g)
    for got, want in zip(kernels.diff_slot_tables(table, selected), block_ops.diff_slot_tables(table, selected)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("block_size,head_dim,dtype", [(4, 16, torch.float32), (5, 24, torch.float16), (64, 128, torch.float16)])
def test_gather_kernel_equals_reference_both_directions(block_size, head_dim, dtype):
    g = torch.Generator().manual_seed(block_size)
    heads, pages, rows_slots = 3, 9, 8
    host_k = torch.randn(pages, heads, block_size, head_dim, generator=g).to(dtype)
    host_v = torch.randn(pages, heads, block_size, head_dim, generator=g).to(dtype)
    src = torch.randint(-1, pages, (20,), generator=g, dtype=torch.int32)
    dst = torch.randperm(rows_slots * heads, generator=g)[:20].int() // heads  # some duplicates: same head?
    head = torch.randint(0, heads, (20,), generator=g, dtype=torch.int32)
    # Make (dst, head) unique so the result does not depend on write order.
    pairs = {}
    for m in range(20):
        pairs[(int(dst[m]), int(head[m]))] = m
    keep = torch.tensor(sorted(pairs.values()))
    src, dst, head = src[keep], dst[keep], head[keep]
    dst[0] = -1  # a skipped entry on the destination side too
    outs = []
    for impl in (block_ops.gather_blocks, kernels.gather_blocks):
        slot_k = torch.zeros(rows_slots, block_size, heads, head_dim, dtype=dtype)
        slot_v = torch.zeros_like(slot_k)
        impl(host_k, host_v, slot_k.transpose(1, 2), slot_v.transpose(1, 2), src, dst, head)
        back_k, back_v = torch.zeros_like(host_k), torch.zeros_like(host_v)
        impl(slot_k.transpose(1, 2), slot_v.transpose(1, 2), back_k, back_v, dst, src, head)  # write-back direction
        outs.append((slot_k, slot_v, back_k, back_v))
    for got, want in zip(outs[1], outs[0]):
        assert torch.equal(got, want)
    slot_k = outs[0][0]
    copied = 0
    for m in range(len(src)):
        if src[m] >= 0 and dst[m] >= 0:
            assert torch.equal(slot_k[dst[m], :, head[m]], host_k[src[m], head[m]])
            copied += 1
    assert copied > 0
