"""Where a sparse model's selection holds the blocks its answers copy from: the source of each answer, the
counts against hand-made selections, and the real selection at geometries whose outcome is known."""

import numpy as np
import pytest
import torch

from nosa import NosaConfig, NosaForCausalLM
from nosa.data.tasks import generate_task
from nosa.data.tokenization import load_tokenizer
from nosa.eval.source_selection import SourceCounts, answer_sources, count_sources, source_start
from nosa.eval.tasks import answer_hits_and_sources, evaluate_tasks

TOK = load_tokenizer("byte")


@pytest.mark.parametrize("task", ["passkey", "multikey_niah", "mqar"])
def test_source_is_the_needles_copy_of_the_answer(task):
    for seed in range(5):
        sample = generate_task(task, TOK, np.random.default_rng(seed), 700, seed / 4)
        for span in sample.answer_spans:
            src = source_start(sample, span)
            width = span[1] - span[0]
            assert src is not None and src + width <= sample.context_end()
            assert sample.input_ids[src : src + width] == sample.input_ids[span[0] : span[1]]
            # token by token: the query before answer token j, and j's own copy (not j - 1's)
            queries, sources = answer_sources(sample, span)
            ids = torch.tensor(sample.input_ids)
            assert torch.equal(queries + 1, torch.arange(*span)) and torch.equal(ids[sources], ids[queries + 1])
            assert not torch.equal(ids[sources], ids[queries])
    passkey = generate_task("passkey", TOK, np.random.default_rng(0), 700, 0.5)
    # the pass key stands in its needle, right after "The pass key is "
    assert source_start(passkey, passkey.answer_spans[0]) == passkey.needle_starts[0] + len("The pass key is ")


def test_counts_against_a_hand_made_selection():
    cfg = NosaConfig(block_size=8, topk_blocks=4, sink_blocks=1, window_blocks=1, query_blocks=1,
                     compress_kernel=8, compress_stride=4, attn_mode="nosa").sparse
    sample = generate_task("passkey", TOK, np.random.default_rng(3), 400, 0.3)
    (start, end), = sample.answer_spans
    src = source_start(sample, (start, end))
    needed = [(src + j - start) // 8 for j in range(start, end)]
    length, heads = len(sample.input_ids), 2
    # layer 0: KV head 0 selects every needed block, head 1 none; layer 1: nobody
    layer0 = torch.full((1, length, heads, 4), -1, dtype=torch.int32)
    layer1 = torch.full((1, length, heads, 4), -1, dtype=torch.int32)
    for j, blk in zip(range(start, end), needed):
        layer0[0, j - 1, 0, 0] = blk
    counts = count_sources([sample], [[False]], [layer0, layer1], cfg)
    got = counts.as_dict()
    n = end - start
    assert got["answer_tokens"] == n and got["answers_without_source"] == 0
    assert got["forced"] == 0.0  # the needle is far from the answer's window and is not the sink
    assert got["selected_by_layer"] == [0.5, 0.0]
    assert got["selected"] == 0.25
    assert got["selected_in_correct_answers"] is None and got["selected_in_wrong_answers"] == 0.25
    # merging keeps counts, so fractions of merged cells weigh each token once
    again = count_sources([sample], [[True]], [layer0, layer0], cfg)
    counts.merge(again)
    merged = counts.as_dict()
    assert merged["answer_tokens"] == 2 * n and merged["selected_by_layer"] == [0.5, 0.25]
    assert merged["selected_in_correct_answers"] == 0.5 and merged["selected_in_wrong_answers"] == 0.25


def _model(topk, query_blocks, window_blocks=1, layers=2, attn_mode="nosa"):
    torch.manual_seed(0)
    config = NosaConfig(vocab_size=264, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, block_size=8, topk_blocks=topk, sink_blocks=1,
                        window_blocks=window_blocks, query_blocks=query_blocks, compress_kernel=8, compress_stride=4, attn_mode=attn_mode)
    return NosaForCausalLM(config).eval()


def test_only_forced_blocks_selected_means_selected_equals_forced():
    # topk = sink + own + window: the selection is the forced blocks alone, so "selected" must equal
    # "forced" exactly, in every layer and head (the forced rule and the recorded selection agree).
    model = _model(topk=12, query_blocks=0, window_blocks=10)
    samples = [generate_task("passkey", TOK, np.random.default_rng(i), 200, d) for i, d in enumerate([0.0, 0.5, 1.0])]
    _, counts = answer_hits_and_sources(model, samples, "cpu")
    got = counts.as_dict()
    assert got["answer_tokens"] == 15
    assert 0.0 < got["forced"] < 1.0  # the late needle sits in the window, the early ones do not
    assert got["selected_by_layer"] == [got["forced"]] * 2


def test_every_block_selected_when_topk_covers_the_context():
    model = _model(topk=64, query_blocks=4)
    res = evaluate_tasks(model, TOK, ["passkey", "mqar"], [300], [0.0, 1.0], 2, "cpu", check_sources=True)
    for task in ("passkey", "mqar"):
        src = res[task]["by_length"]["300"]["source_selection"]
        assert src["selected"] == 1.0 and src["selected_by_layer"] == [1.0, 1.0]
        assert src["answer_tokens"] == sum(c["source_selection"]["answer_tokens"] for c in res[task]["grid"])
    dense = _model(topk=64, query_blocks=4, attn_mode="dense")
    with pytest.raises(ValueError, match="sparse attn_mode"):
        answer_hits_and_sources(dense, [generate_task("passkey", TOK, np.random.default_rng(0), 160, 0.5)], "cpu")


def test_source_counts_as_dict_without_tokens():
    empty = SourceCounts(num_layers=3, num_kv_heads=2).as_dict()
    assert empty["selected"] is None and empty["selected_by_layer"] == [None] * 3 and empty["answer_tokens"] == 0
