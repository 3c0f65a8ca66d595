"""NosaCache's decode step (nosa/models/decode_step.py): the engine's decode ops over the cache's workspace,
eager on the CPU and graph-replayed on CUDA. Equal to the general path (which runs the full forward's op
over the cached keys) in every attn_mode, for left-padded batches of odd lengths, across window, block and
capacity boundaries; its workspace and graphs are pooled per model; graph replay equals eager on a GPU."""

import gc

import pytest
import torch

from nosa.models import NosaCache
from nosa.models.modeling_nosa import _CACHE_FIELD
from tests.helpers import tiny_model

MODES = ["dense", "infllmv2", "dma", "nosa"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def left_padded(lengths, seed, vocab=97):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(1, vocab, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids, mask


def run_steps(model, cache, ids, mask, tokens):
    """Prompt `ids` (left padded by `mask`), then one token per row per column of `tokens` [B, S]."""
    with torch.no_grad():
        logits = [model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1:]]
        for t in range(tokens.shape[1]):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits.append(model(input_ids=tokens[:, t : t + 1], attention_mask=mask, past_key_values=cache,
                                use_cache=True).logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "engine_ops"])
@pytest.mark.parametrize("attn_mode", MODES)
def test_decode_step_equals_the_general_path(attn_mode, lean):
    """Rows of 37, 5 and 20 prompt tokens, then 45 steps: windows and blocks complete at different steps in
    each row, the rows' positions differ, and the capacity (64 tokens at first)
    doubles mid-decode. The state the two paths leave is the same too. Both CPU variants of the step: the
    lean one (the CPU default) and the engine's ops at full capacity (what CUDA runs and captures)."""
    model = tiny_model(attn_mode).double()
    model.model.decode_step.lean_cpu = lean
    ids, mask = left_padded([37, 5, 20], seed=1)
    tokens = torch.randint(1, 97, (3, 45), generator=torch.Generator().manual_seed(2))
    fast, general = NosaCache(model.config), NosaCache(model.config)
    general.use_decode_step = False
    got = run_steps(model, fast, ids, mask, tokens)
    want = run_steps(model, general, ids, mask, tokens)
    assert fast.decode_steps == 45 and general.decode_steps == 0
    assert fast.capacity == 128  # 64, doubled when row 0 passed 64 tokens
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert fast.row_lengths(0) == general.row_lengths(0) == [82, 50, 65]
    cfg = model.config.sparse
    for l in range(model.config.num_hidden_layers):
        a, b = fast.ws, general.ws
        for row, n in enumerate(fast.row_lengths(l)):
            torch.testing.assert_close(a.keys[l][row, :n], b.keys[l][row, :n], rtol=0, atol=0)
            if a.eviction is not None:
                torch.testing.assert_close(a.eviction[l][row, :n], b.eviction[l][row, :n], rtol=0, atol=0)
            if cfg.is_sparse:
                windows = fast._windows[l][row]
                assert windows == general._windows[l][row] > 0
                torch.testing.assert_close(a.compressed[l][row, :windows], b.compressed[l][row, :windows], rtol=1e-12, atol=1e-12)
            if a.agnostic_blocks is not None:
                blocks = -(-n // cfg.block_size)
                torch.testing.assert_close(a.agnostic_blocks[l][row, :, :blocks], b.agnostic_blocks[l][row, :, :blocks],
                                           rtol=0, atol=0)


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "engine_ops"])
@pytest.mark.parametrize("attn_mode", ["infllmv2", "nosa"])
def test_decode_step_logs_the_selection_the_general_path_logs(attn_mode, lean):
    model = tiny_model(attn_mode).double()
    model.model.decode_step.lean_cpu = lean
    ids, mask = left_padded([30, 17], seed=3)
    tokens = torch.randint(1, 97, (2, 20), generator=torch.Generator().manual_seed(4))
    logs = {}
    for name, use in (("fast", True), ("general", False)):
        cache = NosaCache(model.config)
        cache.use_decode_step = use
        for layer in model.model.layers:
            layer.self_attn.selection_log = []
        run_steps(model, cache, ids, mask, tokens)
        logs[name] = [list(layer.self_attn.selection_log) for layer in model.model.layers]
        for layer in model.model.layers:
            layer.self_attn.selection_log = None
        assert cache.decode_steps == (20 if use else 0)
    for fast, general in zip(logs["fast"], logs["general"]):
        # Prefill logs one entry per row group; every decode step one [B, 1, H, K] entry (the general path:
        # one per row, since the rows' lengths differ).
        steps = fast[-20:]
        assert all(step.shape[:2] == (2, 1) for step in steps)
        per_row = general[len(general) - 40:]
        for t, step in enumerate(steps):
            for row in range(2):
                want = per_row[2 * t + row][0, 0]
                assert torch.equal(step[row, 0].sort(-1).values.long(), want.sort(-1).values.long())


def test_wrong_position_ids_or_mask_take_the_general_path():
    """position_ids other than the rows' positions are honoured (the general path runs with them); a mask
    that contradicts the cache is refused as before."""
    model = tiny_model("nosa").double()
    ids, mask = left_padded([12, 9], seed=5)
    caches = [NosaCache(model.config), NosaCache(model.config)]
    caches[1].use_decode_step = False
    token, mask2 = torch.tensor([[5], [6]]), torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    out = []
    with torch.no_grad():
        for cache in caches:
            model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            out.append(model(input_ids=token, attention_mask=mask2, position_ids=torch.tensor([[40], [3]]),
                             past_key_values=cache, use_cache=True).logits)
    assert caches[0].decode_steps == 0
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="attention_mask"), torch.no_grad():
        model(input_ids=token, attention_mask=torch.ones(2, 4, dtype=torch.long), past_key_values=caches[0], use_cache=True)


def test_rows_repeated_and_selected_then_decoded():
    model = tiny_model("nosa").double()
    ids, mask = left_padded([25, 14], seed=6)
    results = []
    for use in (True, False):
        cache = NosaCache(model.config)
        cache.use_decode_step = use
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            cache.batch_repeat_interleave(2)  # rows 0, 0, 1, 1
            cache.batch_select_indices(torch.tensor([3, 0, 1]))  # rows 1, 0, 0
            m = torch.cat([mask[[1, 0, 0]], torch.ones(3, 1, dtype=torch.long)], dim=1)
            results.append(model(input_ids=torch.tensor([[7], [8], [9]]), attention_mask=m, past_key_values=cache,
                                 use_cache=True).logits)
        assert cache.decode_steps == (1 if use else 0) and cache.row_lengths(1) == [15, 26, 26]
    torch.testing.assert_close(results[0], results[1], rtol=1e-9, atol=1e-9)


def test_generate_reuses_the_workspace_of_a_dropped_cache():
    """generate sizes the cache for the whole call (one workspace, no growth); a cache dropped after its
    call hands its workspace (and graphs) to the next call of the same batch and capacity."""
    model = tiny_model("nosa").double()
    ids, mask = left_padded([19, 30], seed=7)
    kw = dict(attention_mask=mask, max_new_tokens=25, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    first = model.generate(ids, **kw)
    cache = getattr(first, _CACHE_FIELD)
    ws = cache.ws
    assert cache.capacity == 64 and cache.decode_steps == 24  # max_length 55, rounded to blocks of 8, min 64
    del first, cache
    gc.collect()
    second = model.generate(ids, **kw)
    assert getattr(second, _CACHE_FIELD).ws is ws
    third = model.generate(ids, **kw)  # the second still holds it: a new workspace
    assert getattr(third, _CACHE_FIELD).ws is not ws
    assert torch.equal(second.sequences, third.sequences)


def test_reorder_keeps_the_workspace():
    model = tiny_model("nosa").double()
    ids, mask = left_padded([10, 21, 16], seed=8)
    cache = NosaCache(model.config)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    ws, keys = cache.ws, cache.ws.keys[0].clone()
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    assert cache.ws is ws and cache.row_lengths(0) == [16, 16, 10]
    assert torch.equal(ws.keys[0], keys[[2, 2, 0]]) and ws.positions.tolist() == [16, 16, 10]


STEP_KERNELS = ["stage_window", "commit_window", "plan_in_place", "attention_inputs", "decode_attention", "compress_keys",
                "agnostic_chunk_scores", "query_aware_block_scores", "select_blocks"]


@pytest.mark.parametrize("attn_mode", ["nosa", "dense", pytest.param("dma", marks=pytest.mark.slow),
                                       pytest.param("infllmv2", marks=pytest.mark.slow)])
def test_decode_step_through_the_triton_kernels(attn_mode):
    """What CUDA runs and captures, on the CPU: the engine-ops step with every op of it on its Triton kernel
    (the interpreter), over the workspace's strided page views, equal to the general path (reference ops).
    8 steps from rows of 21, 6 and 13 tokens: every row completes a block (at 24, 8 and 16: a different
    block index per row) and two or more compression windows (stride 4) while decoding; the interpreter's
    cost grows with the steps (the lean CPU step's test above runs 45)."""
    from nosa import ops

    pytest.importorskip("triton")
    model = tiny_model(attn_mode)
    model.model.decode_step.lean_cpu = False
    ids, mask = left_padded([21, 6, 13], seed=1)
    tokens = torch.randint(1, 97, (3, 8), generator=torch.Generator().manual_seed(2))
    fast, general = NosaCache(model.config), NosaCache(model.config)
    general.use_decode_step = False
    want = run_steps(model, general, ids, mask, tokens)
    with ops.use_backend("triton", only=STEP_KERNELS):
        got = run_steps(model, fast, ids, mask, tokens)
    assert fast.decode_steps == 8
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("attn_mode", MODES)
def test_graph_replay_equals_eager_on_cuda(attn_mode):
    model = tiny_model(attn_mode).cuda()
    ids, mask = left_padded([40, 23, 9], seed=9)
    ids, mask = ids.cuda(), mask.cuda()
    kw = dict(attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)
    step = model.model.decode_step
    step.use_graphs = False
    eager = model.generate(ids, **kw)
    step.use_graphs, captures, replays = True, step.captures, step.replays
    graphed = model.generate(ids, **kw)
    # 29 decode steps: the first eager (warm-up), the second captured, every one after replayed.
    assert step.captures == captures + 1 and step.replays - replays == 28
    assert torch.equal(eager.sequences, graphed.sequences)
    torch.testing.assert_close(torch.stack(graphed.logits), torch.stack(eager.logits), rtol=1e-5, atol=1e-5)
    sequences = graphed.sequences
    del graphed
    gc.collect()
    again = model.generate(ids, **kw)  # the dropped cache's workspace, with its graph: no new capture
    assert step.captures == captures + 1 and step.replays - replays == 28 + 29
    assert torch.equal(again.sequences, sequences)
    model.double().float()  # new parameter tensors: the pooled graph is stale and captured again
    del again
    gc.collect()
    moved = model.generate(ids, **kw)
    assert step.captures == captures + 2 and torch.equal(moved.sequences, sequences)


def test_graphs_are_dropped_when_the_weights_are_other_tensors():
    """What keeps a pooled graph from replaying freed weights (the CPU part: the check itself)."""
    from nosa.models.decode_step import Workspace

    model = tiny_model("nosa")
    ws = Workspace(model.config, 1, 64, torch.float32, "cpu")
    ws.check_weights(model)
    ws.graph, ws.warm = "graph", True
    ws.verified = False
    ws.check_weights(model)
    assert ws.graph == "graph" and ws.verified
    model.double()
    ws.check_weights(model)
    assert ws.graph is None and not ws.warm and ws.pool is None


def test_a_pooled_workspace_gives_the_logits_of_a_fresh_one():
    """A dropped cache's workspace is cleared for the next call, slot tables included: the plan diffs each
    selection against the table, so a table left from the previous call would put the same blocks in other
    slots and the attention would sum them in another order. Bit-equal scores to a fresh workspace's."""
    model = tiny_model("nosa")
    model.model.decode_step.lean_cpu = False  # the engine's ops over slot tables (what CUDA runs)
    other, other_mask = left_padded([30, 22], seed=3)
    ids, mask = left_padded([19, 30], seed=7)
    kw = dict(max_new_tokens=25, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    fresh = model.generate(ids, attention_mask=mask, **kw)  # holds its workspace: the next call gets another
    warmup = model.generate(other, attention_mask=other_mask, **kw)
    ws = getattr(warmup, _CACHE_FIELD).ws
    del warmup
    gc.collect()
    pooled = model.generate(ids, attention_mask=mask, **kw)
    assert getattr(pooled, _CACHE_FIELD).ws is ws  # it did reuse the other prompt's workspace
    assert torch.equal(fresh.sequences, pooled.sequences)
    for a, b in zip(fresh.scores, pooled.scores):
        assert torch.equal(a, b)
