"""Decode attention that loads the step's misses itself (`slot_src`, the engine's FUSE_GATHER): the same
result and the same slots afterwards as the gather followed by the attention, in the reference and in the
Triton kernel (CPU: interpreter), bit for bit; plan_step's slot_src names exactly its gather entries."""

import pytest
import torch

from nosa import ops
from nosa.ops import block_ops
from nosa.ops import kernels
from nosa.ops import reference as ref
from nosa.ops.kernels import decode as kd


def _case(batch, h, d, num_slots, block, pages, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, 4 * h, d, generator=g).to(dtype)
    slot_k = torch.randn(batch * num_slots, block, h, d, generator=g).to(dtype)  # the engine's slot layout
    slot_v = torch.randn(batch * num_slots, block, h, d, generator=g).to(dtype)
    host_k = torch.randn(pages, h, block, d, generator=g).to(dtype)
    host_v = torch.randn(pages, h, block, d, generator=g).to(dtype)
    # about a third of the slots load this step, each from its own host page
    slot_src = torch.full((batch, h, num_slots), -1, dtype=torch.int32)
    loads = torch.rand(batch, h, num_slots, generator=g) < 0.35
    slot_src[loads] = torch.randperm(pages, generator=g)[: int(loads.sum())].int()
    bias = torch.randn(batch, num_slots * block, h, generator=g)
    valid = torch.rand(batch, num_slots * block, h, generator=g) > 0.2
    return q, slot_k, slot_v, host_k, host_v, slot_src, bias, valid


def _rows(slot, batch, num_slots, block):
    return slot.view(batch, num_slots * block, slot.shape[2], slot.shape[3])


def _entries(slot_src, num_slots):
    """slot_src as the gather's entry lists (src page, dst slot page, head)."""
    b, h, j = (slot_src >= 0).nonzero(as_tuple=True)
    return slot_src[b, h, j], (b * num_slots + j).int(), h.int()


@pytest.mark.parametrize("impl,splits,fused_merge", [("reference", None, None), ("kernel", None, True),
                                                     ("kernel", 3, True), ("kernel", 3, False)])
@pytest.mark.parametrize("batch,h,d,num_slots,block,dtype", [
    (2, 2, 64, 6, 16, torch.float32),
    (3, 1, 32, 5, 8, torch.float16),   # one KV head, GQA 4
    (1, 2, 32, 20, 24, torch.float32),  # 480 slot tokens: with 3 splits, chunks of 256 cut a block in two
])
def test_loading_inside_the_attention_equals_gather_then_attend(impl, splits, fused_merge, batch, h, d, num_slots, block, dtype):
    import functools

    q, slot_k, slot_v, host_k, host_v, slot_src, bias, valid = _case(batch, h, d, num_slots, block, 40, dtype, 3)
    attend = ref.decode_attention if impl == "reference" else functools.partial(kd.decode_attention, splits=splits,
                                                                                fused_merge=fused_merge)
    # the gather path
    k1, v1 = slot_k.clone(), slot_v.clone()
    src, dst, head = _entries(slot_src, num_slots)
    block_ops.gather_blocks(host_k, host_v, k1.transpose(1, 2), v1.transpose(1, 2), src, dst, head)
    want = attend(q, _rows(k1, batch, num_slots, block), _rows(v1, batch, num_slots, block), bias, valid)
    # loading inside
    k2, v2 = slot_k.clone(), slot_v.clone()
    got = attend(q, _rows(k2, batch, num_slots, block), _rows(v2, batch, num_slots, block), bias, valid,
                 host_k=host_k, host_v=host_v, slot_src=slot_src)
    assert torch.equal(got, want)
    assert torch.equal(k2, k1) and torch.equal(v2, v1)  # the loaded blocks stay in their slots
    assert not torch.equal(k2, slot_k)  # something was loaded


@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_paged_loading_into_a_pool_equals_the_slot_path(impl):
    """The pooled device cache: the selection slots' pages scattered over a pool of C pages per row (a random
    map), read through a block table, misses loaded into those pages. The result is the slot path's bit for
    bit, and each loaded block lands in its slot's page."""
    batch, h, d, num_slots, block, C = 2, 2, 32, 5, 8, 9
    q, slot_k, slot_v, host_k, host_v, slot_src, bias, valid = _case(batch, h, d, num_slots, block, 40, torch.float32, 6)
    attend = ref.decode_attention if impl == "reference" else kd.decode_attention
    g = torch.Generator().manual_seed(2)
    pool_map = torch.stack([torch.randperm(C, generator=g)[:num_slots] for _ in range(batch * h)]).view(batch, h, num_slots)
    table = (torch.arange(batch)[:, None, None] * C + pool_map).int()
    pools = [torch.randn(batch * C, block, h, d, generator=g) for _ in range(2)]
    for b in range(batch):
        for head in range(h):
            for j in range(num_slots):
                for pool, slot in zip(pools, (slot_k, slot_v)):
                    pool[table[b, head, j], :, head] = slot[b * num_slots + j, :, head]
    k1, v1 = slot_k.clone(), slot_v.clone()
    want = attend(q, _rows(k1, batch, num_slots, block), _rows(v1, batch, num_slots, block), bias, valid,
                  host_k=host_k, host_v=host_v, slot_src=slot_src)
    pool_k, pool_v = pools
    got = attend(q, pool_k.transpose(1, 2), pool_v.transpose(1, 2), bias, valid, table,
                 host_k=host_k, host_v=host_v, slot_src=slot_src)
    assert torch.equal(got, want)
    for b in range(batch):
        for head in range(h):
            for j in range(num_slots):
                assert torch.equal(pool_k[table[b, head, j], :, head], k1[b * num_slots + j, :, head])
                assert torch.equal(pool_v[table[b, head, j], :, head], v1[b * num_slots + j, :, head])


def test_the_kernel_loading_misses_equals_the_reference_loading_them():
    q, slot_k, slot_v, host_k, host_v, slot_src, bias, valid = _case(2, 2, 64, 6, 16, 40, torch.float32, 4)
    outs = []
    for attend in (ref.decode_attention, kd.decode_attention):
        k, v = slot_k.clone(), slot_v.clone()
        out = attend(q, _rows(k, 2, 6, 16), _rows(v, 2, 6, 16), bias, valid, host_k=host_k, host_v=host_v, slot_src=slot_src)
        outs.append((out, k, v))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=2e-5, rtol=2e-5)
    assert torch.equal(outs[1][1], outs[0][1]) and torch.equal(outs[1][2], outs[0][2])


def test_loading_misses_refuses_what_it_cannot_write_into():
    q, slot_k, slot_v, host_k, host_v, slot_src, bias, valid = _case(2, 2, 64, 6, 16, 40, torch.float32, 5)
    k, v = _rows(slot_k, 2, 6, 16), _rows(slot_v, 2, 6, 16)
    with pytest.raises(ValueError, match="go together"):
        kd.decode_attention(q, k, v, bias, valid, host_k=host_k, slot_src=slot_src)
    with pytest.raises(ValueError, match="slot_src must be contiguous int32"):
        kd.decode_attention(q, k, v, bias, valid, host_k=host_k, host_v=host_v, slot_src=slot_src.long())
    with pytest.raises(ValueError, match="must be torch.float32 with a contiguous last dim"):
        kd.decode_attention(q, k.half(), v.half(), bias, valid, host_k=host_k, host_v=host_v, slot_src=slot_src)
    with pytest.raises(ValueError, match="do not fit slots"):
        kd.decode_attention(q, k, v, bias, valid, host_k=host_k[:, :1], host_v=host_v[:, :1], slot_src=slot_src)


@pytest.mark.parametrize("impl", [block_ops, kernels], ids=["reference", "kernel"])
def test_plan_steps_slot_src_names_exactly_its_gather_entries(impl):
    from tests.ops.test_block_ops import _plan_inputs

    g = torch.Generator().manual_seed(11)
    x = _plan_inputs(False, g)
    R, H, K = x["table"].shape
    plan = ops.LoadPlan.allocate(R, H, K, "cpu")
    plan.slot_src.fill_(-7)
    impl.plan_step(ops.LayerSlots(x["table"], x["slot_k"], x["slot_v"], x["page_table"]), x["selection"],
                   ops.StepTokens(x["positions"], x["active"], x["k"], x["v"]), ops.HostPages(x["store_k"], x["store_v"]), plan)
    want = torch.full((R, H, K), -1, dtype=torch.int32)
    take = plan.src_page >= 0
    rows, slot = torch.div(plan.dst_page[take], K, rounding_mode="floor"), torch.remainder(plan.dst_page[take], K)
    want[rows.long(), plan.head[take].long(), slot.long()] = plan.src_page[take]
    assert int(take.sum()) > 0 and torch.equal(plan.slot_src, want)


@pytest.mark.parametrize("mode,cache", [("nosa", None), ("infllmv2", None), ("dense", None), ("nosa", 9), ("infllmv2", 9)])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_engine_loading_misses_in_the_attention_equals_the_gather_engine(mode, cache, backend, monkeypatch):
    """The engine with FUSE_GATHER gives the gather engine's tokens, logits and load counts bit for bit,
    on the reference ops and on the Triton kernels (interpreter), through several block boundaries, with and
    without the device cache beyond the selection (its spill step runs before the loads)."""
    import nosa.engine.attention as engine_attention
    from nosa.engine import LLM, SamplingParams

    from tests.helpers import engine_model as tiny_model

    model = tiny_model(mode, seed=5)
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (23, 30)]  # past topk 6 x block 4
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    results, calls = [], []
    real = ops.decode_attention

    def spy(*args, **kwargs):  # which path each decode attention call took
        calls.append(kwargs.get("slot_src") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "decode_attention", spy)
    for fuse in (False, True):
        monkeypatch.setattr(engine_attention, "FUSE_GATHER", fuse)
        calls.clear()
        with ops.use_backend(backend, only=ops.BLOCK_OPS + ("decode_attention",)):
            llm = LLM(model, device="cpu", max_model_len=48, max_num_seqs=2, device_cache_blocks=cache)
            results.append((llm.generate(prompts, params, use_tqdm=False, return_logits=True), llm.stats()))
        assert calls and all(c == fuse for c in calls)  # every decode step took the path asked for
    (ref_out, ref_stats), (got, stats) = results
    for a, b in zip(ref_out, got):
        assert a.token_ids == b.token_ids and torch.equal(a.logits, b.logits)
    assert stats.blocks_loaded_per_step == ref_stats.blocks_loaded_per_step
    if mode != "dense":  # dense selects every block: its slots hold them all, nothing is loaded at decode
        assert ref_stats.blocks_loaded_per_step > 0


def test_dense_plan_step_kernel_takes_a_long_context():
    """Dense mode plans every block of the context (K = all blocks, no cap): its slot_src must not need a
    [K, K] matrix (at K = 1,100 it would pass Triton's tensor size limit)."""
    R, H, K, bs, D, P = 1, 1, 1100, 2, 4, 1200
    g = torch.Generator().manual_seed(3)
    base = dict(table=torch.full((R, H, K), -1, dtype=torch.int32), page_table=torch.randperm(P, generator=g)[:K].int()[None],
                positions=torch.tensor([K * bs - 5]), active=torch.tensor([True]), k=torch.randn(R, H, D, generator=g),
                v=torch.randn(R, H, D, generator=g), slot_k=torch.zeros(R * K, bs, H, D), slot_v=torch.zeros(R * K, bs, H, D),
                store_k=torch.randn(P, H, bs, D, generator=g), store_v=torch.randn(P, H, bs, D, generator=g))
    base["table"][0, 0, :600] = torch.arange(600, dtype=torch.int32)  # 600 blocks resident, the rest to load
    plans = []
    for impl in (block_ops, kernels):
        x = {n: t.clone() for n, t in base.items()}
        plan = ops.LoadPlan.allocate(R, H, K, "cpu")
        impl.plan_step(ops.LayerSlots(x["table"], x["slot_k"], x["slot_v"], x["page_table"]), None,
                       ops.StepTokens(x["positions"], x["active"], x["k"], x["v"]), ops.HostPages(x["store_k"], x["store_v"]), plan)
        plans.append(plan)
    loads = int((plans[0].slot_src >= 0).sum())
    assert torch.equal(plans[1].slot_src, plans[0].slot_src) and loads == int(plans[0].loads.sum()) > 400


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slot_loading_and_paged_calls_share_one_autotuned_config(monkeypatch, dtype):
    """Triton's autotuner keys its cache on the key arguments and on every tensor argument's dtype. The slot
    call, the one that loads misses and the paged one (offload off) must give it the same key, or they tune
    apart, may run with different warps and then round the softmax sums differently (the fused gather's fp32
    logits differed from the gather path's on an H100 for that reason). The interpreter runs one config, so
    this checks the launch arguments rather than the rounding."""
    batch, h, d, num_slots, block = 2, 2, 32, 6, 16
    q, slot_k, slot_v, host_k, host_v, slot_src, bias, valid = _case(batch, h, d, num_slots, block, 40, dtype, 5)
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **constexprs):
                key = [constexprs[k] for k in ("G", "D", "FUSED_MERGE")] + [args[-5], args[-2]]  # S, chunk
                launches.append(key + [str(a.dtype) for a in args if hasattr(a, "dtype")])
            return launch

    monkeypatch.setattr(kd, "_decode_partial_kernel", Recorder())
    rows = (_rows(slot_k, batch, num_slots, block), _rows(slot_v, batch, num_slots, block))
    kd.decode_attention(q, *rows, bias, valid, splits=2, fused_merge=True)
    kd.decode_attention(q, *rows, bias, valid, splits=2, fused_merge=True, host_k=host_k, host_v=host_v, slot_src=slot_src)
    pages = torch.cat([slot_k.transpose(1, 2), slot_v.transpose(1, 2)])  # [P, H, bs, D]
    table = torch.arange(batch * num_slots, dtype=torch.int64).view(batch, 1, num_slots).expand(batch, h, num_slots)
    kd.decode_attention(q, pages, pages, bias, valid, block_table=table, splits=2, fused_merge=True)
    assert len(launches) == 3 and launches[0] == launches[1] == launches[2]
