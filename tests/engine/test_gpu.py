"""The engine on a CUDA device (run through the device tool): the Triton gather reading pinned host memory,
exactness against the model with the gather/diff kernels on, CUDA graphs == eager, device footprint."""

import gc

import pytest
import torch

from tests.helpers import engine_model as tiny_model, reference_logits
from nosa import ops
from nosa.engine import LLM, SamplingParams
from nosa.ops import block_ops

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def prompts(lengths=(9, 14, 3, 21)):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture
def triton_block_ops():
    with ops.use_backend("triton", only=ops.BLOCK_OPS):
        yield


def test_gather_reads_pinned_host_memory(triton_block_ops):
    from nosa.ops.kernels import gather as kernels

    g = torch.Generator().manual_seed(0)
    host_k = torch.randn(64, 2, 64, 128, generator=g).to(torch.bfloat16).pin_memory()
    host_v = torch.randn(64, 2, 64, 128, generator=g).to(torch.bfloat16).pin_memory()
    src = torch.randint(-1, 64, (100,), generator=g, dtype=torch.int32)
    dst = torch.arange(100, dtype=torch.int32)
    head = torch.randint(0, 2, (100,), generator=g, dtype=torch.int32)
    slots_k = torch.zeros(100, 64, 2, 128, dtype=torch.bfloat16, device="cuda")
    slots_v = torch.zeros_like(slots_k)
    kernels.gather_blocks(host_k, host_v, slots_k.transpose(1, 2), slots_v.transpose(1, 2), src.cuda(), dst.cuda(), head.cuda())
    want_k, want_v = torch.zeros(100, 64, 2, 128, dtype=torch.bfloat16), torch.zeros(100, 64, 2, 128, dtype=torch.bfloat16)
    block_ops.gather_blocks(host_k, host_v, want_k.transpose(1, 2), want_v.transpose(1, 2), src, dst, head)
    assert torch.equal(slots_k.cpu(), want_k) and torch.equal(slots_v.cpu(), want_v)


@pytest.mark.parametrize("mode", ["nosa", "dense", "infllmv2", "dma"])
@pytest.mark.parametrize("offload", [True, False])
def test_cuda_engine_equals_model_forward(mode, offload, triton_block_ops):
    """fp32, reference attention ops (so the comparison is exact up to rounding), Triton gather + diff,
    CUDA graphs on."""
    model = tiny_model(mode).cuda()
    with ops.use_backend("reference"):
        llm = LLM(model, device="cuda", offload=offload, max_model_len=80, max_num_seqs=4, prefill_chunk=5)
        assert llm.store.k.is_pinned() == offload == llm.store.pinned and llm.graphed is not None
        outs = llm.generate(prompts(), GREEDY, use_tqdm=False, return_logits=True)
        for prompt, out in zip(prompts(), outs):
            ref = reference_logits(model, prompt, out.token_ids)
            torch.testing.assert_close(out.logits, ref, atol=1e-4, rtol=1e-4)
            assert out.token_ids == ref.argmax(-1).tolist()
    assert llm.graphed.graph is not None  # the decode step really ran as a replayed graph


@pytest.mark.parametrize("mode", ["nosa", "dense"])
def test_cuda_graphs_equal_eager_with_the_default_kernels(mode):
    """bf16 with every op on its default CUDA path (Triton kernels where registered)."""
    model = tiny_model(mode, dtype=torch.bfloat16).cuda()
    results = {}
    for graphs in (False, True):
        for offload in (True, False):
            llm = LLM(model, device="cuda", offload=offload, cuda_graphs=graphs, max_model_len=80, max_num_seqs=4)
            results[graphs, offload] = [o.token_ids for o in llm.generate(prompts(), GREEDY, use_tqdm=False)]
            if graphs:
                assert llm.graphed.graph is not None
    assert results[True, True] == results[False, True]
    assert results[True, False] == results[False, False]
    assert results[True, True] == results[True, False]


def test_the_decode_bench_times_each_graph_replay_on_the_device():
    """`time_decode` splits each graphed step into its replay (CUDA events) and the host's rest."""
    from nosa.bench import decode

    model = tiny_model("nosa", dtype=torch.bfloat16).cuda()
    llm = LLM(model, device="cuda", offload=True, cuda_graphs=True, max_model_len=128, max_num_seqs=3)
    ids = decode.synthetic_install(llm, [40, 40, 40], torch.Generator(device="cuda").manual_seed(0))
    run = decode.time_decode(llm, ids, warmup=3, steps=6)
    assert 0 < run["graph_ms_median"] < run["step_ms_median"]
    assert run["host_ms_median"] > 0 and llm.graphed.timed_replays is None  # switched off again


def test_cuda_graphs_survive_the_host_store_growing_between_steps():
    """Requests admitted one after another, each longer than the last, grow the offload store after the
    decode graphs were captured (as a server's traffic does): the graphs are captured again in a new pool and
    the tokens stay those of eager decoding. Before the fix the second capture failed an allocator assert."""
    model = tiny_model("nosa", dtype=torch.bfloat16).cuda()
    lengths = (3, 5, 30, 60)
    results, versions = {}, {}
    for graphs in (False, True):
        llm = LLM(model, device="cuda", offload=True, cuda_graphs=graphs, max_model_len=128, max_num_seqs=1)
        results[graphs] = [o.token_ids for o in llm.generate(prompts(lengths), GREEDY, use_tqdm=False)]
        versions[graphs] = llm.store.version
    assert versions[True] >= 2, "the store did not grow between requests: the test lost its point"
    assert results[True] == results[False]
    events = llm.graph_events  # the graphed engine's (the last one built): the growths dropped its graphs
    assert events["dropped_by_store_growth"] >= 1 and events["eager_warmups"] >= events["captures"] >= 1


def test_device_kv_does_not_grow_with_context_on_cuda():
    model = tiny_model("nosa").cuda()
    sizes = []
    for max_len in (64, 256):
        # Engines hold reference cycles: one collected while the next is built would free device memory
        # inside the measured span (and make it look negative).
        gc.collect()
        before = torch.cuda.memory_allocated()
        llm = LLM(model, device="cuda", max_model_len=max_len, max_num_seqs=2)
        sizes.append((llm.cache.allocated_bytes(), torch.cuda.memory_allocated() - before))
        assert llm.store.k.device.type == "cpu" and llm.store.k.is_pinned() and llm.store.pinned
        del llm
    assert sizes[0][0]["kv_slots"] == sizes[1][0]["kv_slots"]
    # Everything the engine put on the device is its listed parts (plus small counters and allocator rounding).
    assert all(0 <= total - parts["total"] < 2**20 for parts, total in sizes)


def test_offload_off_allocates_one_copy_on_cuda():
    """Offload off: what the engine puts on the device is the store (the one copy of the KV, read in
    place), the cache's small state and nothing for slots: LLM.device_bytes' charge less the prefill
    workspace, within allocator rounding and small counters."""
    model = tiny_model("dense").cuda()
    row, workspace = LLM.device_bytes(model.config, model.dtype, False, 256)
    gc.collect()  # as above: no earlier engine freed inside the measured span
    before = torch.cuda.memory_allocated()
    llm = LLM(model, device="cuda", offload=False, max_model_len=256, max_num_seqs=3)
    total = torch.cuda.memory_allocated() - before
    assert llm.cache.slot_k is None and llm.store.k.is_cuda
    prefill = workspace - llm.store.bytes_per_page
    assert 0 <= total - (3 * row + workspace - prefill) < 2**20


@pytest.mark.parametrize("mode", ["nosa", "infllmv2"])
@pytest.mark.parametrize("same_position", [True, False])
def test_decode_selection_with_cached_agnostic_pooling_equals_select_for_queries(mode, same_position):
    """The decode step selects from agnostic scores pooled incrementally (`agnostic_blocks`) with the
    fused query-aware score kernel; that must be `ops.select_for_queries` on the same state, exactly."""
    from nosa.ops import reference

    model = tiny_model(mode).cuda()
    llm = LLM(model, device="cuda", max_model_len=80, max_num_seqs=4)
    cfg, R, H, NB = model.config.sparse, 4, model.config.num_key_value_heads, llm.cache.max_blocks
    g = torch.Generator(device="cuda").manual_seed(3)
    positions = torch.full((R,), 57, device="cuda") if same_position else torch.tensor([9, 30, 57, 79], device="cuda")
    num_windows = int(reference.num_complete_windows(int(positions.max()) + 1, cfg.compress_kernel, cfg.compress_stride))
    compressed = torch.randn(R, num_windows, H, model.config.head_dim, generator=g, device="cuda")
    agnostic = torch.randn(R, num_windows, H, generator=g, device="cuda") if cfg.uses_eviction_head else None
    q = torch.randn(R, 1, model.config.num_attention_heads, model.config.head_dim, generator=g, device="cuda")
    pooled = None
    if agnostic is not None:
        # Each row pooled at its own position, as the engine keeps it.
        pooled = torch.cat([reference.pool_to_blocks(agnostic[r : r + 1].transpose(1, 2)[:, None], positions[r : r + 1], NB, cfg)
                            for r in range(R)])
    got = ops.select_rows(q[:, 0], compressed, None if pooled is None else pooled[:, 0], positions, NB, cfg)
    want = torch.cat([ops.select_for_queries(q[r : r + 1], compressed[r : r + 1], None if agnostic is None else agnostic[r : r + 1],
                                             positions[r : r + 1], NB, cfg)[:, 0] for r in range(R)])
    assert torch.equal(got, want)


@pytest.mark.parametrize("on_device", [True, False])
@pytest.mark.parametrize("offload", [True, False])
def test_cuda_device_cache_and_trace_replay_under_graphs(offload, on_device, triton_block_ops):
    """The spill slots (device_cache_blocks) and a replayed selection source run inside the captured graph:
    equal to the model forward (reference attention, fp32), and replaying the recorded selections with graphs
    (picked on the device inside the graph, or copied from the host each step) gives the recorded run's
    tokens and loads."""
    from nosa.engine.selection_source import ReplaySelections

    model = tiny_model("nosa").cuda()
    size = model.config.topk_blocks + 3
    with ops.use_backend("reference", only=[n for n in ("decode_attention", "nosa_attention", "select_blocks")]):
        llm = LLM(model, device="cuda", offload=offload, max_model_len=80, max_num_seqs=4, device_cache_blocks=size)
        outs = llm.generate(prompts(), GREEDY, use_tqdm=False, return_logits=True, record_selections=True)
        for prompt, out in zip(prompts(), outs):
            ref = reference_logits(model, prompt, out.token_ids)
            torch.testing.assert_close(out.logits, ref, atol=1e-4, rtol=1e-4)
        recorded = llm.decode_counters()
        replay = LLM(model, device="cuda", offload=offload, max_model_len=80, max_num_seqs=4, device_cache_blocks=size)
        source = ReplaySelections(model.config.block_size, model.config.topk_blocks, on_device=on_device)
        for i, out in enumerate(outs):
            source.add(i, out.selections, out.selection_first_position)
        replay.set_selection_source(source)
        again = replay.generate(prompts(), GREEDY, use_tqdm=False)
        assert [o.token_ids for o in again] == [o.token_ids for o in outs]
        assert replay.graphed.graph is not None
        counters = replay.decode_counters()
        assert torch.equal(counters["loaded"], recorded["loaded"]) and int(counters["spill_hits"].sum()) > 0


@pytest.mark.parametrize("offload", [True, False])
def test_cuda_spill_kernel_engine_equals_the_reference_spill_engine_under_graphs(offload):
    """The fused spill step (two launches per layer, captured in the decode graph) against the reference
    spill step (PyTorch ops, also captured) on CUDA, every other op on its default: the same tokens, logits,
    loads and spill hits bit for bit."""
    model = tiny_model("nosa").cuda()
    size = model.config.topk_blocks + 3
    results = []
    for backend in ("reference", "triton"):
        with ops.use_backend(backend, only=("spill_step",)):
            llm = LLM(model, device="cuda", offload=offload, max_model_len=80, max_num_seqs=4, device_cache_blocks=size)
            outs = llm.generate(prompts(), GREEDY, use_tqdm=False, return_logits=True)
            assert llm.graphed.graph is not None
            results.append((outs, llm.decode_counters()))
    (ref, ref_counters), (got, counters) = results
    for a, b in zip(ref, got):
        assert a.token_ids == b.token_ids and torch.equal(a.logits, b.logits)
    for name, counter in ref_counters.items():
        assert torch.equal(counters[name], counter), name
    assert int(counters["spill_hits"].sum()) > 0


# Issue 13, item 1 on the GPU: the geometry whose second row's logits were off by up to 3.9 (block 4, topk 9,
# sink 1, window 1, kernel 8, stride 8, head_dim 8, one KV head), and GQA ratios 1 and 3, with the Triton
# cache ops, offload on, graphs on and off (tests/engine/test_index_layouts.py is the interpreter's twin).
@pytest.mark.parametrize("mode,q_heads,topk", [("infllmv2", 1, 9), ("infllmv2", 3, 9), ("nosa", 1, 4), ("nosa", 3, 4)])
@pytest.mark.parametrize("graphs", [False, True])
def test_cuda_engine_at_one_kv_head_equals_model_forward(triton_block_ops, mode, q_heads, topk, graphs):
    model = tiny_model(mode, seed=4, num_attention_heads=q_heads, num_key_value_heads=1, head_dim=8,
                       hidden_size=8 * q_heads, topk_blocks=topk, block_size=4, sink_blocks=1, window_blocks=1,
                       query_blocks=1, compress_kernel=8, compress_stride=8).cuda()
    batch = [[5, 17, 200, 3], [9, 1, 44, 120, 7], [3] * 11]
    llm = LLM(model, device="cuda", offload=True, max_model_len=64, max_num_seqs=3, cuda_graphs=graphs)
    outs = llm.generate(batch, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False,
                        return_logits=True)
    if topk == 4:
        assert llm.stats().blocks_loaded_per_step > 0  # blocks were evicted and reloaded at decode
    for prompt, out in zip(batch, outs):
        torch.testing.assert_close(out.logits, reference_logits(model, prompt, out.token_ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cache", [None, 9])
def test_cuda_engine_loading_misses_in_decode_attention_equals_the_gather_engine(monkeypatch, dtype, cache):
    """FUSE_GATHER on the GPU (the decode kernel reading pinned host pages inside a CUDA graph, with and
    without the device cache): the gather engine's tokens, logits and loads bit for bit, in fp32 and bf16."""
    import nosa.engine.attention as engine_attention

    model = tiny_model("nosa").to("cuda", dtype)
    runs = []
    for fuse in (False, True):
        monkeypatch.setattr(engine_attention, "FUSE_GATHER", fuse)
        llm = LLM(model, device="cuda", offload=True, max_model_len=80, max_num_seqs=4, device_cache_blocks=cache, dtype=dtype)
        runs.append((llm.generate(prompts(), GREEDY, use_tqdm=False, return_logits=True), llm.decode_counters(), llm))
    (want, want_counters, _), (got, got_counters, llm) = runs
    for a, b in zip(want, got):
        assert a.token_ids == b.token_ids and torch.equal(a.logits, b.logits)
    assert torch.equal(got_counters["loaded"], want_counters["loaded"]) and int(want_counters["loaded"].sum()) > 0
    assert llm.graphed.graph is not None


@pytest.mark.parametrize("mode", ["nosa", "infllmv2"])
@pytest.mark.parametrize("fuse", [False, True])
def test_cuda_pooled_cache_engine_equals_the_copying_cache_engine_under_graphs(monkeypatch, mode, fuse):
    """The pooled device cache (pages read through the page map, misses loaded into them inside the attention
    or by the gather) against the copying cache, bf16, CUDA graphs, every op on its default: the same tokens,
    logits, loads and spill hits bit for bit."""
    import nosa.engine.attention as engine_attention
    import nosa.engine.block_cache as block_cache

    model = tiny_model(mode).to("cuda", torch.bfloat16)
    monkeypatch.setattr(engine_attention, "FUSE_GATHER", fuse)
    runs = []
    for pooled in (False, True):
        monkeypatch.setattr(block_cache, "POOL_DEVICE_CACHE", pooled)
        llm = LLM(model, device="cuda", offload=True, max_model_len=80, max_num_seqs=4,
                  device_cache_blocks=model.config.topk_blocks + 3, dtype=torch.bfloat16)
        assert llm.cache.pooled == pooled
        runs.append((llm.generate(prompts(), GREEDY, use_tqdm=False, return_logits=True), llm.decode_counters(), llm))
    (want, want_counters, _), (got, got_counters, llm) = runs
    for a, b in zip(want, got):
        assert a.token_ids == b.token_ids and torch.equal(a.logits, b.logits)
    for name, counter in want_counters.items():
        assert torch.equal(got_counters[name], counter), name
    assert int(got_counters["spill_hits"].sum()) > 0 and llm.graphed.graph is not None


@pytest.mark.parametrize("offload", [True, False])
@pytest.mark.parametrize("mode", ["nosa", "infllmv2", "dense", "dma"])
def test_cuda_micro_batches_on_two_streams_equal_one_batch(mode, offload, monkeypatch):
    """micro_batches=2 on CUDA (two streams forked from the step's and joined back, the second starting at
    the first's layer-0 attention), eagerly and replayed from a graph, default kernels, fp32, and graphed with
    the launches sized for half the SMs each (SHARE_LAUNCHES): the tokens, loads and spill hits of one batch,
    logits to rounding (the matmuls run over half the rows). One batch's engine equals the model's forward in
    the tests above."""
    import nosa.engine.model_runner as model_runner

    model = tiny_model(mode).cuda()
    cache = model.config.topk_blocks + 3 if mode == "nosa" else None
    runs = {}
    for micro_batches, graphs, share in ((1, True, False), (2, False, False), (2, True, False), (2, True, True)):
        monkeypatch.setattr(model_runner, "SHARE_LAUNCHES", share)
        # 5 rows for 4 prompts: micro-batches of 3 and 2 rows, one of them idle.
        llm = LLM(model, device="cuda", offload=offload, max_model_len=80, max_num_seqs=5, cuda_graphs=graphs,
                  device_cache_blocks=cache, micro_batches=micro_batches)
        assert llm.runner.launch_share == (0.5 if share else 1.0)
        outs = llm.generate(prompts(), GREEDY, use_tqdm=False, return_logits=True)
        if graphs:
            assert llm.graphed.graph is not None
        assert (llm.runner.shard_streams is not None) == (micro_batches > 1)
        for start, stop, attention in llm.runner.shards:  # each micro-batch's attention began on its own rows
            assert attention.positions.data_ptr() == llm.runner.step_inputs[1, start:stop].data_ptr()
        runs[micro_batches, graphs, share] = (outs, llm.decode_counters())
    whole, whole_counters = runs[1, True, False]
    for key in ((2, False, False), (2, True, False), (2, True, True)):
        outs, counters = runs[key]
        for name in whole_counters:
            assert torch.equal(counters[name], whole_counters[name]), (key, name)
        for a, b in zip(whole, outs):
            assert a.token_ids == b.token_ids, key
            torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)
