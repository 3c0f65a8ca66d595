"""The pooled device cache (`LayerSlots.pool_map`): the selection slots and spill slots of a (row, KV head)
share C = K + E pages, and `spill_step` moves blocks by swapping page entries instead of copying K/V.
What it must keep: every live block's K/V, seen through the map, equals the copying cache's, with the same
tables; the map stays a permutation; the Triton plan kernel (the interpreter on CPU) makes the same swaps as
the reference; and over a run of steps (spill, plan with host loads, the token appended) the selection's
pages hold what the copying cache's slots hold."""

import pytest
import torch

from nosa import ops
from nosa.ops import block_ops
from nosa.ops.kernels import gather as gather_kernels
from nosa.ops.kernels import spill as spill_kernels
from tests.ops.test_spill import CASES, make_state


def pooled_state(state, g):
    """The copying state's slot and spill pages laid into one pool of C pages per row, in a random order per
    (row, head): pool page r*C + map[r, h, x] holds logical page x (slots 0..K-1, then spill slots)."""
    R, H, K = state["table"].shape
    E = state["spill_table"].shape[-1]
    C = K + E
    bs, D = state["slot_k"].shape[1], state["slot_k"].shape[3]
    pool_map = torch.stack([torch.randperm(C, generator=g) for _ in range(R * H)]).int().view(R, H, C)
    pools = []
    for slot, spill in (("slot_k", "spill_k"), ("slot_v", "spill_v")):
        pool = torch.randn(R * C, bs, H, D, generator=g)  # pages no logical slot names stay garbage
        for r in range(R):
            for h in range(H):
                for x in range(C):
                    src = state[slot][r * K + x] if x < K else state[spill][r * E + x - K]
                    pool[r * C + pool_map[r, h, x], :, h] = src[:, h]
        pools.append(pool)
    return {**{n: t for n, t in state.items() if n not in ("slot_k", "slot_v", "spill_k", "spill_v")},
            "pool_k": pools[0], "pool_v": pools[1], "pool_map": pool_map}


def logical(x, side, r, h, pos):
    """The K or V block at logical page `pos` (slot, then spill slot) of (r, h) in a pooled state."""
    C = x["pool_map"].shape[-1]
    return x[f"pool_{side}"][r * C + x["pool_map"][r, h, pos], :, h]


def run_pooled(impl, state):
    x = {name: t.clone() for name, t in state.items()}
    slots = ops.LayerSlots(x["table"], x["pool_k"], x["pool_v"], None, x["pool_map"])
    spill = ops.SpillSlots(x["spill_table"], x["stamp"], None, None, x["hits"])
    impl.spill_step(slots, x["selection"], x["positions"], x["active"], spill)
    return x


def run_copying(state):
    x = {name: t.clone() for name, t in state.items()}
    slots = ops.LayerSlots(x["table"], x["slot_k"], x["slot_v"], None)
    spill = ops.SpillSlots(x["spill_table"], x["stamp"], x["spill_k"], x["spill_v"], x["hits"])
    block_ops.spill_step(slots, x["selection"], x["positions"], x["active"], spill)
    return x


def assert_live_blocks_equal(pooled, copying):
    """Tables equal; each slot whose block is selected and each occupied spill slot holds the same K/V."""
    for name in ("table", "spill_table", "stamp", "hits"):
        assert torch.equal(pooled[name], copying[name]), name
    R, H, K = copying["table"].shape
    E = copying["spill_table"].shape[-1]
    checked = 0
    for r in range(R):
        for h in range(H):
            selected = set(copying["selection"][r, h].tolist()) - {-1}
            for j in range(K):
                if int(copying["table"][r, h, j]) in selected:
                    for side in ("k", "v"):
                        assert torch.equal(logical(pooled, side, r, h, j), copying[f"slot_{side}"][r * K + j, :, h]), (r, h, j)
                    checked += 1
            for e in range(E):
                if int(copying["spill_table"][r, h, e]) >= 0:
                    for side in ("k", "v"):
                        assert torch.equal(logical(pooled, side, r, h, K + e), copying[f"spill_{side}"][r * E + e, :, h]), (r, h, e)
                    checked += 1
            assert sorted(pooled["pool_map"][r, h].tolist()) == list(range(K + E))  # still a permutation
    assert checked > 0


@pytest.mark.parametrize("case", range(len(CASES)))
def test_pooled_spill_moves_what_the_copying_spill_copies(case):
    R, H, K, E, bs, D, kinds = CASES[case]
    g = torch.Generator().manual_seed(31 + case)
    state = make_state(R, H, K, E, bs, D, g, kinds)
    pooled = pooled_state(state, g)
    want = run_copying(state)
    ref = run_pooled(block_ops, pooled)
    assert_live_blocks_equal(ref, want)
    assert torch.equal(ref["pool_k"], pooled["pool_k"])  # no K/V moved: only the map changed
    assert not torch.equal(ref["pool_map"], pooled["pool_map"])
    ker = run_pooled(spill_kernels, pooled)
    for name in ("table", "spill_table", "stamp", "hits", "pool_map", "pool_k", "pool_v"):
        assert torch.equal(ker[name], ref[name]), name


def _plan(R, H, K, pooled):
    return ops.LoadPlan.allocate(R, H, K, "cpu", pooled=pooled)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_pooled_cache_over_many_steps_holds_what_the_copying_cache_holds(impl):
    """Steps of spill_step + plan_step (host loads, the token appended, a full tail block written back) on the
    copying cache and on the pooled one: after each step the selection's pages hold the copying slots' K/V,
    the plans load the same host pages, the host store is written the same, and `plan.slot_page` names the
    pages the map gives."""
    spill_impl, plan_impl = (block_ops, block_ops) if impl == "reference" else (spill_kernels, gather_kernels)
    g = torch.Generator().manual_seed(17)
    R, H, K, E, bs, D, num_blocks = 3, 2, 5, 4, 4, 8, 15
    C, P = K + E, R * num_blocks + 1
    page_table = torch.arange(R * num_blocks, dtype=torch.int32).view(R, num_blocks)
    store = {side: torch.randn(P, H, bs, D, generator=g) for side in ("k", "v")}
    copy = dict(table=torch.full((R, H, K), -1, dtype=torch.int32), spill_table=torch.full((R, H, E), -1, dtype=torch.int32),
                stamp=torch.zeros((R, H, E), dtype=torch.int32), hits=torch.zeros((R, H), dtype=torch.int64),
                slot_k=torch.zeros(R * K, bs, H, D), slot_v=torch.zeros(R * K, bs, H, D),
                spill_k=torch.zeros(R * E, bs, H, D), spill_v=torch.zeros(R * E, bs, H, D),
                store_k=store["k"].clone(), store_v=store["v"].clone())
    pool = dict(table=copy["table"].clone(), spill_table=copy["spill_table"].clone(), stamp=copy["stamp"].clone(),
                hits=copy["hits"].clone(), pool_k=torch.zeros(R * C, bs, H, D), pool_v=torch.zeros(R * C, bs, H, D),
                pool_map=torch.stack([torch.randperm(C, generator=g) for _ in range(R * H)]).int().view(R, H, C),
                store_k=store["k"].clone(), store_v=store["v"].clone())
    plans = {"copy": _plan(R, H, K, False), "pool": _plan(R, H, K, True)}
    active = torch.tensor([True, False, True])
    start = 3 * bs
    for step in range(14):
        position = start + step
        positions = torch.full((R,), position)
        own = position // bs
        sel = torch.full((R, H, K), -1, dtype=torch.int32)
        for n in range(R * H):
            others = torch.randperm(own, generator=g)[: K - 1].int()  # blocks before the own block: they churn
            sel.view(R * H, K)[n, : len(others)] = others
            sel.view(R * H, K)[n, K - 1] = own
        token_k, token_v = torch.randn(R, H, D, generator=g), torch.randn(R, H, D, generator=g)
        for name, x in (("copy", copy), ("pool", pool)):
            pooled = name == "pool"
            slots = ops.LayerSlots(x["table"], x["pool_k" if pooled else "slot_k"], x["pool_v" if pooled else "slot_v"],
                                   page_table, x["pool_map"] if pooled else None)
            spill = ops.SpillSlots(x["spill_table"], x["stamp"], None if pooled else x["spill_k"],
                                   None if pooled else x["spill_v"], x["hits"])
            (spill_impl if pooled else block_ops).spill_step(slots, sel, positions, active, spill)
            (plan_impl if pooled else block_ops).plan_step(slots, sel, ops.StepTokens(positions, active, token_k, token_v),
                                                           ops.HostPages(x["store_k"], x["store_v"]), plans[name])
            if plans[name].src_page.ge(0).any():
                block_ops.gather_blocks(x["store_k"], x["store_v"], *(t.transpose(1, 2) for t in (slots.k, slots.v)),
                                        plans[name].src_page, plans[name].dst_page, plans[name].head)
        assert torch.equal(pool["table"], copy["table"]) and torch.equal(pool["spill_table"], copy["spill_table"])
        assert torch.equal(plans["pool"].src_page, plans["copy"].src_page)
        assert torch.equal(pool["store_k"], copy["store_k"]) and torch.equal(pool["store_v"], copy["store_v"])
        want_pages = torch.arange(R)[:, None, None] * C + pool["pool_map"][:, :, :K]
        assert torch.equal(plans["pool"].slot_page, want_pages.int())
        for r in range(R):
            for h in range(H):
                for j in range(K):
                    block = int(copy["table"][r, h, j])
                    if block >= 0:
                        # The tokens written so far (a new tail block's later tokens are not yet anything).
                        tokens = min(bs, position - block * bs + 1)
                        for side in ("k", "v"):
                            assert torch.equal(logical(pool, side, r, h, j)[:tokens],
                                               copy[f"slot_{side}"][r * K + j, :tokens, h]), (step, r, h, j)
    assert int(copy["hits"].sum()) > 5  # blocks did come back from the spill slots
    assert not torch.equal(copy["store_k"], store["k"])  # a tail block was written back


def test_pooled_plan_step_refuses_a_plan_without_slot_pages():
    R, H, K, E = 1, 1, 2, 2
    slots = ops.LayerSlots(torch.full((R, H, K), -1, dtype=torch.int32), torch.zeros(R * (K + E), 2, H, 4),
                           torch.zeros(R * (K + E), 2, H, 4), torch.zeros((R, 4), dtype=torch.int32),
                           torch.arange(K + E, dtype=torch.int32).view(R, H, K + E))
    token = ops.StepTokens(torch.tensor([1]), torch.tensor([True]), torch.zeros(R, H, 4), torch.zeros(R, H, 4))
    host = ops.HostPages(torch.zeros(4, H, 2, 4), torch.zeros(4, H, 2, 4))
    with pytest.raises(ValueError, match="plan.slot_page"):
        gather_kernels.plan_step(slots, torch.tensor([[[0, -1]]], dtype=torch.int32), token, host, _plan(R, H, K, False))


@pytest.mark.parametrize("impl", [block_ops, spill_kernels], ids=["reference", "kernel"])
def test_pooled_spill_refuses_separate_spill_pages(impl):
    """With pooled slots the spill slots live in the pool: spill pages given beside it would be ignored."""
    g = torch.Generator().manual_seed(2)
    state = pooled_state(make_state(2, 1, 4, 2, 2, 4, g, ("mixed",)), g)
    slots = ops.LayerSlots(state["table"], state["pool_k"], state["pool_v"], None, state["pool_map"])
    spill = ops.SpillSlots(state["spill_table"], state["stamp"], torch.zeros(2 * 2, 2, 1, 4), torch.zeros(2 * 2, 2, 1, 4),
                           state["hits"])
    with pytest.raises(ValueError, match="spill.k and spill.v must be None"):
        impl.spill_step(slots, state["selection"], state["positions"], state["active"], spill)
