"""Cached decoding computes what the full forward computes, for every attn_mode (spec: training, prefill
and decode select the same set)."""

import pytest
import torch
from transformers import DynamicCache

from tests.helpers import tiny_model

MODES = ["dense", "infllmv2", "dma", "nosa"]


def _step(model, ids, cache, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits


@pytest.mark.parametrize("attn_mode", MODES)
def test_token_by_token_decoding_equals_full_forward(attn_mode):
    model = tiny_model(attn_mode)
    ids = torch.randint(0, 97, (2, 110))  # 110 tokens: 13 blocks of 8, 26 windows of stride 4, sparse from block 6
    with torch.no_grad():
        full = model(ids).logits
    cache = DynamicCache()
    pieces = [_step(model, ids[:, :21], cache)]
    for t in range(21, 110):
        pieces.append(_step(model, ids[:, t : t + 1], cache))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attn_mode", ["dense", "nosa"])
def test_chunked_prefill_equals_full_forward(attn_mode):
    model = tiny_model(attn_mode)
    ids = torch.randint(0, 97, (1, 101))
    with torch.no_grad():
        full = model(ids).logits
    cache = DynamicCache()
    pieces = [_step(model, ids[:, s : s + 13], cache) for s in range(0, 101, 13)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attn_mode", MODES)
def test_generate_left_padded_batch_equals_each_sequence_alone(attn_mode):
    model = tiny_model(attn_mode)
    lengths = [60, 23, 41]
    width = max(lengths)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    prompts = [torch.randint(0, 97, (n,)) for n in lengths]
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    out = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    step_logits = torch.stack(out.logits, dim=1)  # [B, new, vocab]
    for row, prompt in enumerate(prompts):
        generated = out.sequences[row, width:]
        alone = torch.cat([prompt, generated])
        with torch.no_grad():
            full = model(alone[None]).logits[0]
        n = len(prompt)
        # Greedy tokens are the argmax of the full forward at every step, and the logits agree.
        assert torch.equal(full[n - 1 : -1].argmax(-1), generated)
        torch.testing.assert_close(step_logits[row], full[n - 1 : -1], rtol=1e-4, atol=1e-4)


def test_right_padded_batch_equals_unpadded_rows():
    model = tiny_model("nosa")
    a, b = torch.randint(0, 97, (70,)), torch.randint(0, 97, (45,))
    ids = torch.zeros(2, 70, dtype=torch.long)
    mask = torch.zeros(2, 70, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, :45], mask[1, :45] = b, 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(batched[0], model(a[None]).logits[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batched[1, :45], model(b[None]).logits[0], rtol=1e-5, atol=1e-5)
