"""The slot-table diff and the block gather: reference semantics, and the Triton kernels (interpreter on
CPU) equal to the reference."""

import pytest
import torch

from nosa import ops
from nosa.ops import block_ops
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


# ------------------------------------------------------------------------------------------------------
# The decode step's bookkeeping kernels (interpreter on CPU) equal to their references, bit for bit.
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_eviction", [True, False])
def test_stage_and_commit_window_kernels_equal_reference(with_eviction):
    g = torch.Generator().manual_seed(7)
    R, H, D, kernel, stride, T = 5, 2, 24, 4, 2, 40
    num_windows = (T - kernel) // stride + 1
    positions = torch.tensor([0, 3, 4, 17, 39])  # before the first window, at window ends, in between
    k, v = torch.randn(R, H, D, generator=g), torch.randn(R, H, D, generator=g)
    c = torch.randn(R, H, generator=g) if with_eviction else None
    ring0 = torch.randn(R, kernel, H, D, generator=g)
    eviction0 = torch.randn(R, T, H, generator=g) if with_eviction else None
    compressed0 = torch.randn(R, num_windows, H, D, generator=g)
    agnostic0 = torch.randn(R, num_windows, H, generator=g) if with_eviction else None
    new_key = torch.randn(R, 1, H, D, generator=g)
    new_score = torch.randn(R, 1, H, generator=g) if with_eviction else None
    bs, NB = 4, 10
    blocks0 = None
    if with_eviction:
        blocks0 = torch.randn(R, H, NB, generator=g)
        blocks0[:, :, 6:] = float("-inf")  # blocks with no complete window yet
    outs = []
    for impl in (block_ops, kernels):
        ring, eviction = ring0.clone(), None if eviction0 is None else eviction0.clone()
        window_k = torch.full((R, kernel, H, D), float("nan"))
        window_c = torch.full((R, kernel, H), float("nan")) if with_eviction else None
        impl.stage_window(k, c, positions, ring, eviction, window_k, window_c)
        compressed, agnostic = compressed0.clone(), None if agnostic0 is None else agnostic0.clone()
        pooled = None if blocks0 is None else blocks0.clone()
        impl.commit_window(positions, new_key, new_score, compressed, agnostic, pooled, kernel, stride, bs)
        outs.append([t for t in (ring, eviction, window_k, window_c, compressed, agnostic, pooled) if t is not None])
    for got, want in zip(outs[1], outs[0]):
        assert torch.equal(got, want)
    # Rows whose position ends a window (3, 17, 39) took the new key; the others kept theirs.
    compressed = outs[0][4] if with_eviction else outs[0][-1]
    assert torch.equal(compressed[1, 0], new_key[1, 0])
    assert torch.equal(compressed[0], compressed0[0])
    if with_eviction:
        # Row 3 (position 17): window 7 = tokens 14..17 overlaps blocks 3 and 4 only.
        pooled = outs[0][-1]
        assert torch.equal(pooled[3, :, 3], torch.maximum(blocks0[3, :, 3], new_score[3, 0]))
        assert torch.equal(pooled[3, :, 4], torch.maximum(blocks0[3, :, 4], new_score[3, 0]))
        assert torch.equal(pooled[3, :, :3], blocks0[3, :, :3]) and torch.equal(pooled[3, :, 5:], blocks0[3, :, 5:])
        assert torch.equal(pooled[0], blocks0[0]) and torch.equal(pooled[2], blocks0[2])  # no window ended


def _plan_inputs(dense, g, R=4, H=2, K=6, bs=4, D=16, NB=12, P=40):
    positions = torch.tensor([8, 11, 23, 5])  # a block start (fresh tail), a block end (write-back), others
    own = positions // bs
    tables, selections = [], []
    for r in range(R):
        for _ in range(H):
            if dense:
                # Dense invariant: block j sits in slot j; the tail block is new at a block start.
                t = torch.full((K,), -1, dtype=torch.int32)
                upto = int(own[r]) - (1 if int(positions[r]) % bs == 0 else 0)
                if r == 1:
                    upto = -1  # an empty table (a row just reset): every visible block is a miss
                t[: upto + 1] = torch.arange(upto + 1, dtype=torch.int32)
                tables.append(t)
                continue
            forced = {0, int(own[r]), max(0, int(own[r]) - 1)}
            if int(positions[r]) % bs != 0:
                resident = set(forced)
            else:
                resident = {0, max(0, int(own[r]) - 1)}
            others = [b for b in torch.randperm(int(own[r]) + 1, generator=g).tolist() if b not in forced]
            resident |= set(others[:2])
            chosen = sorted(forced | set(others[1:4]))[:K]
            t = torch.full((K,), -1, dtype=torch.int32)
            order = torch.randperm(K, generator=g)[: len(resident)]
            t[order] = torch.tensor(sorted(resident), dtype=torch.int32)
            s = torch.full((K,), -1, dtype=torch.int32)
            s[: len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
            tables.append(t)
            selections.append(s)
    table = torch.stack(tables).view(R, H, K)
    selection = None if dense else torch.stack(selections).view(R, H, K)
    page_table = torch.full((R, NB), -1, dtype=torch.int32)
    pages = torch.randperm(P, generator=g)
    for r in range(R - 1):  # the last row is free: no pages, so nothing loaded or written back
        page_table[r] = pages[r * NB // 4 : r * NB // 4 + NB].int() if r * NB // 4 + NB <= P else pages[:NB].int()
    return dict(positions=positions, table=table, selection=selection, page_table=page_table,
                active=torch.tensor([True, True, False, True]),
                k=torch.randn(R, H, D, generator=g), v=torch.randn(R, H, D, generator=g),
                slot_k=torch.randn(R * K, bs, H, D, generator=g), slot_v=torch.randn(R * K, bs, H, D, generator=g),
                store_k=torch.randn(P, H, bs, D, generator=g), store_v=torch.randn(P, H, bs, D, generator=g))


@pytest.mark.parametrize("dense", [False, True])
def test_plan_step_kernel_equals_reference(dense):
    g = torch.Generator().manual_seed(11)
    base = _plan_inputs(dense, g)
    R, H, K = base["table"].shape
    outs = []
    for impl in (block_ops, kernels):
        x = {name: (t.clone() if isinstance(t, torch.Tensor) else t) for name, t in base.items()}
        src, dst = torch.full((R * H * K,), -7, dtype=torch.int32), torch.full((R * H * K,), -7, dtype=torch.int32)
        loads = torch.full((R, H), -7, dtype=torch.int32)
        loaded, selected = torch.full((R, H), 5, dtype=torch.int64), torch.full((R, H), 3, dtype=torch.int64)
        head = torch.arange(H, dtype=torch.int32)[None, :, None].expand(R, H, K).reshape(-1).contiguous()
        slot_src = torch.full((R, H, K), -7, dtype=torch.int32)
        impl.plan_step(ops.LayerSlots(x["table"], x["slot_k"], x["slot_v"], x["page_table"]), x["selection"],
                       ops.StepTokens(x["positions"], x["active"], x["k"], x["v"]), ops.HostPages(x["store_k"], x["store_v"]),
                       ops.LoadPlan(src, dst, head, loads, loaded, selected, slot_src))
        outs.append((x["table"], src, dst, loads, loaded, selected, x["slot_k"], x["slot_v"], x["store_k"], x["store_v"], slot_src))
    for got, want in zip(outs[1], outs[0]):
        assert torch.equal(got, want)
    table, src, dst, loads, loaded, selected, slot_k, _, store_k, _, slot_src = outs[0]
    assert int((slot_src >= 0).sum()) == int((src >= 0).sum())  # every load by its slot, none invented
    assert int(loads.sum()) > 0 and bool((src[dst < 0] < 0).all())
    assert not torch.equal(store_k, base["store_k"])  # the row at a block end wrote its tail block back
    assert torch.equal(loaded[2], torch.full((H,), 5)) and torch.equal(selected[2], torch.full((H,), 3))  # inactive row


@pytest.mark.parametrize("with_bias", [True, False])
def test_attention_inputs_kernel_equals_reference(with_bias):
    g = torch.Generator().manual_seed(13)
    R, H, K, bs, T = 3, 2, 5, 4, 30
    table = torch.randint(-1, 7, (R, H, K), generator=g, dtype=torch.int32)
    positions = torch.tensor([3, 17, 27])
    eviction = torch.randn(R, T, H, generator=g) if with_bias else None
    outs = []
    for impl in (block_ops, kernels):
        valid = torch.ones(R, K * bs, H, dtype=torch.bool)
        bias = torch.full((R, K * bs, H), float("nan")) if with_bias else None
        impl.attention_inputs(table, positions, eviction, valid, bias, bs)
        outs.append((valid, bias))
    assert torch.equal(outs[0][0], outs[1][0]) and outs[0][0].any() and not outs[0][0].all()
    if with_bias:
        assert torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("mode", ["nosa", "dense", "infllmv2"])
def test_engine_with_the_triton_bookkeeping_equals_the_reference_engine(mode):
    """The whole decode step with every block op on its Triton kernel (interpreter) gives the reference
    engine's tokens and logits bit for bit: the kernels change where bookkeeping runs, never a result."""
    from nosa.engine import LLM, SamplingParams

    from tests.helpers import engine_model as tiny_model

    model = tiny_model(mode, seed=5)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (9, 14, 3)]
    params = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    results = []
    for backend in ("reference", "triton"):
        with ops.use_backend(backend, only=ops.BLOCK_OPS):
            llm = LLM(model, device="cpu", max_model_len=48, max_num_seqs=2)
            results.append((llm.generate(prompts, params, use_tqdm=False, return_logits=True), llm.stats()))
    (ref, ref_stats), (tri, tri_stats) = results
    for a, b in zip(ref, tri):
        assert a.token_ids == b.token_ids
        assert torch.equal(a.logits, b.logits)
    assert ref_stats.hit_rate_per_layer == tri_stats.hit_rate_per_layer
    assert ref_stats.blocks_loaded_per_step == tri_stats.blocks_loaded_per_step


def test_one_copy_engine_on_the_triton_kernels_equals_the_offloading_engine():
    """Offload off (the store read in place through the paged decode kernel, the diff kernel in
    `plan_in_place`) gives offload on's tokens and logits (slot decode kernel) bit for bit, the block ops
    and decode attention on their Triton kernels under the interpreter."""
    from nosa.engine import LLM, SamplingParams

    from tests.helpers import engine_model as tiny_model

    model = tiny_model("nosa", seed=5)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (7, 14)]  # crosses blocks 1->2, 3->4
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    with ops.use_backend("triton", only=ops.BLOCK_OPS + ("decode_attention",)):
        want, got = (LLM(model, device="cpu", offload=offload, max_model_len=32, max_num_seqs=2).generate(
            prompts, params, use_tqdm=False, return_logits=True) for offload in (True, False))
    for a, b in zip(want, got):
        assert a.token_ids == b.token_ids and torch.equal(a.logits, b.logits)


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("dense", [False, True])
def test_plan_in_place_leaves_plan_steps_table_and_writes_the_token_into_its_page(dense, impl):
    """The one-copy path's plan (offload off), reference and kernel: the slot table `plan_step` leaves,
    slot_page names the store page of every slot's block, the token lands in its block's page (a free
    row's in the scratch page), nothing is loaded and every other store token is unchanged."""
    g = torch.Generator().manual_seed(11)
    base = _plan_inputs(dense, g)
    R, H, K = base["table"].shape
    P, bs = base["store_k"].shape[0], base["store_k"].shape[2]
    pages_used = set(base["page_table"][base["page_table"] >= 0].tolist())
    scratch = next(p for p in range(P) if p not in pages_used)
    want = {name: (t.clone() if isinstance(t, torch.Tensor) else t) for name, t in base.items()}
    head = torch.arange(H, dtype=torch.int32)[None, :, None].expand(R, H, K).reshape(-1).contiguous()

    def plan(x):
        return ops.LoadPlan(torch.full((R * H * K,), -1, dtype=torch.int32), torch.full((R * H * K,), -1, dtype=torch.int32),
                            head, torch.full((R, H), -7, dtype=torch.int32), torch.full((R, H), 5, dtype=torch.int64),
                            torch.full((R, H), 3, dtype=torch.int64), torch.full((R, H, K), -1, dtype=torch.int32))

    ref_plan = plan(want)
    block_ops.plan_step(ops.LayerSlots(want["table"], want["slot_k"], want["slot_v"], want["page_table"]), want["selection"],
                        ops.StepTokens(want["positions"], want["active"], want["k"], want["v"]),
                        ops.HostPages(want["store_k"], want["store_v"]), ref_plan)
    x = {name: (t.clone() if isinstance(t, torch.Tensor) else t) for name, t in base.items()}
    got_plan, slot_page = plan(x), torch.full((R, H, K), -7, dtype=torch.int32)
    (block_ops if impl == "reference" else kernels).plan_in_place(
                      ops.LayerSlots(x["table"], None, None, x["page_table"]), x["selection"],
                      ops.StepTokens(x["positions"], x["active"], x["k"], x["v"]),
                      ops.HostPages(x["store_k"], x["store_v"]), got_plan, slot_page, scratch)
    assert torch.equal(x["table"], want["table"]) and torch.equal(got_plan.selected, ref_plan.selected)
    assert int(got_plan.loads.abs().sum()) == 0 and torch.equal(got_plan.loaded, torch.full((R, H), 5))
    for r in range(R):
        for h in range(H):
            for j in range(K):
                block = int(x["table"][r, h, j])
                page = int(x["page_table"][r, block]) if block >= 0 else -1
                assert int(slot_page[r, h, j]) == page
    expected_k, expected_v = base["store_k"].clone(), base["store_v"].clone()
    for r in range(R):
        page = int(base["page_table"][r, int(base["positions"][r]) // bs])
        page = scratch if page < 0 else page
        expected_k[page, :, int(base["positions"][r]) % bs] = base["k"][r]
        expected_v[page, :, int(base["positions"][r]) % bs] = base["v"][r]
    assert torch.equal(x["store_k"], expected_k) and torch.equal(x["store_v"], expected_v)
