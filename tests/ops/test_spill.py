"""The spill step's Triton kernel (`nosa.ops.kernels.spill`, the interpreter on CPU) equals the reference
`block_ops.spill_step` bit for bit: slot table, spill table, stamps, hit counters and the K/V contents of
both slot caches, at odd shapes and on states built to reach every branch (hits into empty and into freed
slots, refills of the spill slots read this step, replacement by stamp with ties, dropped blocks, rows with
no change, rows of all-new blocks, free rows, inactive rows)."""

import pytest
import torch

from nosa import ops
from nosa.ops import block_ops
from nosa.ops.kernels import spill as kernels


def _row_state(kind, K, E, num_blocks, g):
    """One (row, head): slot table [K], spill table [E], stamps [E], selection [K]; blocks unique, and a
    block never both in a slot and a spill slot (the engine's invariant)."""
    t = torch.full((K,), -1, dtype=torch.int32)
    st = torch.full((E,), -1, dtype=torch.int32)
    stamp = torch.randint(0, 6, (E,), generator=g, dtype=torch.int32)  # few values: ties in the LRU order
    sel = torch.full((K,), -1, dtype=torch.int32)
    if kind == "free":  # a free row: nothing held, (any) selection of new blocks
        chosen = torch.randperm(num_blocks, generator=g)[:K]
        sel[: len(chosen)] = chosen.int()
        return t, st, torch.full((E,), -1, dtype=torch.int32), sel
    blocks = torch.randperm(num_blocks, generator=g)
    n_table = int(torch.randint(K // 2, K + 1, (1,), generator=g))
    n_spill = int(torch.randint(0, E + 1, (1,), generator=g)) if kind == "mixed" else E
    held, spilled, fresh = blocks[:n_table], blocks[n_table : n_table + n_spill], blocks[n_table + n_spill :]
    t[torch.randperm(K, generator=g)[:n_table]] = held.int()
    st[torch.randperm(E, generator=g)[:n_spill]] = spilled.int()
    if kind == "same":  # the selection is what the slots hold: nothing moves
        chosen = held
    elif kind == "new":  # every selected block is neither resident nor spilled
        chosen = fresh[:K]
    else:
        n_keep = int(torch.randint(0, n_table + 1, (1,), generator=g))
        n_hit = int(torch.randint(0, min(len(spilled), K - n_keep) + 1, (1,), generator=g))
        n_new = int(torch.randint(0, K - n_keep - n_hit + 1, (1,), generator=g))
        chosen = torch.cat([held[torch.randperm(n_table, generator=g)[:n_keep]],
                            spilled[torch.randperm(len(spilled), generator=g)[:n_hit]], fresh[:n_new]])
    if kind == "shuffled":  # selections need not be sorted nor padded at the end
        where = torch.randperm(K, generator=g)[: len(chosen)]
        sel[where] = chosen[torch.randperm(len(chosen), generator=g)].int()
    else:
        sel[: len(chosen)] = chosen.sort().values.int()
    return t, st, stamp, sel


def make_state(R, H, K, E, bs, D, g, kinds):
    """kinds: per row, cycled ("free": the whole row, inactive; otherwise its heads cycle through the
    other kinds from the row's)."""
    tables, spills, stamps, sels = [], [], [], []
    held = [k for k in kinds if k != "free"]
    for r in range(R):
        for h in range(H):
            kind = kinds[r % len(kinds)]
            if kind != "free":
                kind = held[(held.index(kind) + h) % len(held)]
            t, st, stamp, sel = _row_state(kind, K, E, 3 * (K + E) + 5, g)
            tables.append(t), spills.append(st), stamps.append(stamp), sels.append(sel)
    shape = lambda xs, n: torch.stack(xs).view(R, H, n)  # noqa: E731
    return dict(table=shape(tables, K), spill_table=shape(spills, E), stamp=shape(stamps, E), selection=shape(sels, K),
                positions=torch.randint(100, 1000, (R,), generator=g),
                active=(torch.rand(R, generator=g) < 0.7) & torch.tensor([kinds[r % len(kinds)] != "free" for r in range(R)]),
                hits=torch.randint(0, 5, (R, H), generator=g),
                slot_k=torch.randn(R * K, bs, H, D, generator=g), slot_v=torch.randn(R * K, bs, H, D, generator=g),
                spill_k=torch.randn(R * E, bs, H, D, generator=g), spill_v=torch.randn(R * E, bs, H, D, generator=g))


def run_step(impl, state, copies=True):
    x = {name: t.clone() for name, t in state.items()}
    slots = ops.LayerSlots(x["table"], x["slot_k"] if copies else None, x["slot_v"] if copies else None, None)
    spill = ops.SpillSlots(x["spill_table"], x["stamp"], x["spill_k"] if copies else None,
                           x["spill_v"] if copies else None, x["hits"])
    impl.spill_step(slots, x["selection"], x["positions"], x["active"], spill)
    return x


OUTPUTS = ("table", "spill_table", "stamp", "hits", "slot_k", "slot_v", "spill_k", "spill_v")


def branches(before, after):
    """Which of the reference's cases a state reached (from the states alone, so it checks the test inputs)."""
    seen = set()
    R, H, K = before["table"].shape
    for r in range(R):
        for h in range(H):
            t, sel = before["table"][r, h].tolist(), set(before["selection"][r, h].tolist()) - {-1}
            st0, st1 = before["spill_table"][r, h].tolist(), after["spill_table"][r, h].tolist()
            leaving = {b for b in t if b >= 0 and b not in sel}
            if any(b in sel for b in st0 if b >= 0):
                seen.add("hit")
            for b0, b1 in zip(st0, st1):
                if b0 >= 0 and b0 in sel and b1 >= 0:
                    seen.add("refill")  # a spill slot read this step takes a leaving block
                if b0 >= 0 and b0 not in sel and b1 != b0:
                    seen.add("replaced")  # the least recently selected block gives way
            if leaving - set(st1):
                seen.add("dropped")
            for b0, b1 in zip(t, after["table"][r, h].tolist()):
                if b0 in leaving and b1 != b0 and b0 in st1:
                    seen.add("saved_from_a_slot_taking_a_hit")
            if -1 in t and any(b in sel for b in st0 if b >= 0):
                seen.add("hit_with_empty_slot")
    return seen


CASES = [  # R, H, K, E, bs, D, kinds
    (5, 2, 6, 3, 4, 8, ("mixed", "same", "mixed", "new", "free")),
    (3, 1, 7, 5, 5, 12, ("mixed", "shuffled", "full")),
    (4, 2, 5, 9, 3, 16, ("full", "mixed", "shuffled", "same")),
    (2, 2, 8, 1, 2, 4, ("mixed", "full")),
    (3, 1, 16, 16, 6, 24, ("full", "mixed", "free")),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_spill_kernel_equals_reference(case):
    R, H, K, E, bs, D, kinds = CASES[case]
    g = torch.Generator().manual_seed(31 + case)
    state = make_state(R, H, K, E, bs, D, g, kinds)
    want, got = run_step(block_ops, state), run_step(kernels, state)
    for name in OUTPUTS:
        assert torch.equal(got[name], want[name]), name
    assert not torch.equal(want["spill_k"], state["spill_k"]) and not torch.equal(want["slot_v"], state["slot_v"])


def test_spill_cases_reach_every_branch():
    """The states above reach every case of the reference (else the equality above proves little)."""
    seen = set()
    for case, (R, H, K, E, bs, D, kinds) in enumerate(CASES):
        state = make_state(R, H, K, E, bs, D, torch.Generator().manual_seed(31 + case), kinds)
        seen |= branches(state, run_step(block_ops, state))
    assert seen == {"hit", "refill", "replaced", "dropped", "hit_with_empty_slot", "saved_from_a_slot_taking_a_hit"}


def test_spill_kernel_tables_only_without_copies():
    """spill.k None (one copy, offload off): the same tables, stamps and hits as with the copies."""
    g = torch.Generator().manual_seed(7)
    state = make_state(4, 2, 6, 4, 3, 8, g, ("mixed", "full", "free"))
    want, got = run_step(block_ops, state), run_step(kernels, state, copies=False)
    for name in ("table", "spill_table", "stamp", "hits"):
        assert torch.equal(got[name], want[name]), name
    for name in ("slot_k", "slot_v", "spill_k", "spill_v"):
        assert torch.equal(got[name], state[name]), name  # nothing copied


def test_spill_kernel_over_many_steps_equals_reference():
    """A run of steps on one state (each step's output the next one's input): selections drawn from a small
    block range, so blocks leave, come back from the spill slots and are replaced in LRU order."""
    g = torch.Generator().manual_seed(3)
    R, H, K, E, bs, D, num_blocks = 3, 2, 5, 4, 2, 4, 14
    state = make_state(R, H, K, E, bs, D, g, ("free",))
    state["active"] = torch.tensor([True, False, True])
    ref, ker = dict(state), dict(state)
    total_hits = 0
    for step in range(12):
        sel = torch.stack([torch.randperm(num_blocks, generator=g)[:K].sort().values for _ in range(R * H)]).int().view(R, H, K)
        sel[0, 0, K - 1] = -1  # a shorter selection
        positions = torch.full((R,), 10 + step)
        ref = run_step(block_ops, {**ref, "selection": sel, "positions": positions})
        ker = run_step(kernels, {**ker, "selection": sel, "positions": positions})
        for name in OUTPUTS:
            assert torch.equal(ker[name], ref[name]), (step, name)
        # What `plan_step` then does to the table: the selection resident (misses stand in for host loads).
        new_table, _, _ = block_ops.diff_slot_tables(ref["table"].view(R * H, K), sel.view(R * H, K))
        ref["table"], ker["table"] = new_table.view(R, H, K).clone(), new_table.view(R, H, K).clone()
        total_hits = int(ref["hits"].sum())
    assert total_hits > int(state["hits"].sum()) + 10


def test_spill_kernel_dispatch_and_fallback():
    """ops.spill_step takes the kernel under the triton backend; tables wider than the kernel's limit take
    the reference (with the gather kernel for its copies) and give the same result."""
    with ops.use_backend("triton", only=("spill_step",)):
        assert ops.resolve("spill_step") is kernels.spill_step
    with ops.use_backend("reference"):
        assert ops.resolve("spill_step") is block_ops.spill_step
    g = torch.Generator().manual_seed(5)
    state = make_state(1, 1, 3, kernels.MAX_SPILL_SLOTS + 1, 2, 4, g, ("full",))
    want, got = run_step(block_ops, state), run_step(kernels, state)
    for name in OUTPUTS:
        assert torch.equal(got[name], want[name]), name


def test_spill_kernel_refuses_bad_buffers():
    g = torch.Generator().manual_seed(1)
    state = make_state(2, 1, 4, 2, 2, 4, g, ("mixed",))
    x = {name: t.clone() for name, t in state.items()}
    spill = ops.SpillSlots(x["spill_table"], x["stamp"].long(), x["spill_k"], x["spill_v"], x["hits"])
    with pytest.raises(ValueError, match="spill.stamp"):
        kernels.spill_step(ops.LayerSlots(x["table"], x["slot_k"], x["slot_v"], None), x["selection"], x["positions"],
                           x["active"], spill)


def _spill_args(x, copies=True):
    slots = ops.LayerSlots(x["table"], x["slot_k"] if copies else None, x["slot_v"] if copies else None, None)
    spill = ops.SpillSlots(x["spill_table"], x["stamp"], x["spill_k"] if copies else None,
                           x["spill_v"] if copies else None, x["hits"])
    return slots, x["selection"], x["positions"], x["active"], spill


@pytest.mark.gpu
@pytest.mark.parametrize("num_spill", [32, 64])
def test_spill_kernel_on_cuda_equals_reference_eager_and_in_a_cuda_graph(num_spill):
    """The engine's shape at 64K (K = 64 selection slots, 32 or 64 spill slots, bs 64, D 128, bf16): the
    kernel on CUDA equals the reference on CUDA, eager and replayed from a captured graph with new states
    copied into its static buffers (no host sync, no data-dependent shape)."""
    R, H, K, bs, D = 4, 4, 64, 64, 128
    kinds = ("mixed", "full", "shuffled", "same", "new", "free", "full")

    def state(seed):
        x = make_state(R, H, K, num_spill, bs, D, torch.Generator().manual_seed(seed), kinds)
        return {n: (t.to(torch.bfloat16) if t.is_floating_point() else t).cuda() for n, t in x.items()}

    first = state(0)
    want, got = run_step(block_ops, first), run_step(kernels, first)
    for name in OUTPUTS:
        assert torch.equal(got[name], want[name]), name
    static = {n: t.clone() for n, t in first.items()}
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernels.spill_step(*_spill_args(static))
    for seed in (1, 2):
        x = state(seed)
        for n, t in x.items():
            static[n].copy_(t)
        graph.replay()
        want = run_step(block_ops, x)
        for name in OUTPUTS:
            assert torch.equal(static[name], want[name]), (seed, name)
        assert int(want["hits"].sum()) > int(x["hits"].sum())
