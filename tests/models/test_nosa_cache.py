"""NosaCache, the incremental decoding state behind `generate`: token for token equal to the full forward
in every attn_mode, for single rows, batches and left padding; and it really is incremental (each decode
step compresses at most the windows that step completed)."""

import pytest
import torch
from transformers import DynamicCache

from nosa import ops
from nosa.models import NosaCache
from nosa.models.modeling_nosa import _CACHE_FIELD
from tests.helpers import tiny_model

MODES = ["dense", "infllmv2", "dma", "nosa"]


def model_of(attn_mode, **kw):
    """float64: the cache and the full forward compute the same sums in different shapes (one token's
    projection vs the whole prompt's), which differ in the last bits; in float32 that can flip a near-tie
    of two block scores. In float64 such flips need a near-tie within ~1e-15, so equality is the test."""
    return tiny_model(attn_mode, **kw).double()


def dynamic_cache() -> dict:
    """generate's keyword for a DynamicCache (the reference path) under this transformers' naming."""
    return {_CACHE_FIELD: DynamicCache()}


def _step(model, ids, cache, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("attn_mode", MODES)
def test_prefill_then_token_by_token_equals_the_full_forward(attn_mode):
    model = model_of(attn_mode)
    ids = torch.randint(0, 97, (2, 110), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
    cache = NosaCache(model.config)
    pieces = [_step(model, ids[:, :21], cache)]
    for t in range(21, 110):
        pieces.append(_step(model, ids[:, t : t + 1], cache))
    assert cache.get_seq_length() == 110 and cache.row_lengths(0) == [110, 110]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("attn_mode", ["dense", "nosa"])
def test_chunked_prefill_and_decode_from_one_token(attn_mode):
    model = model_of(attn_mode)
    ids = torch.randint(0, 97, (1, 77), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
    cache = NosaCache(model.config)
    pieces = [_step(model, ids[:, :1], cache)]  # decode from the very first token
    pieces += [_step(model, ids[:, s : s + 11], cache) for s in range(1, 45, 11)]  # chunks of 11 after it
    pieces += [_step(model, ids[:, t : t + 1], cache) for t in range(45, 77)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("attn_mode", MODES)
def test_generate_uses_nosa_cache_and_equals_dynamic_cache_and_the_full_forward(attn_mode):
    """Left-padded batch of odd lengths: generate's default cache is a NosaCache; its tokens and logits are
    the full forward's, and the same as with the DynamicCache path."""
    model = model_of(attn_mode)
    g = torch.Generator().manual_seed(3)
    lengths = [61, 23, 1, 40]
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    prompts = [torch.randint(0, 97, (n,), generator=g) for n in lengths]
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    kw = dict(attention_mask=mask, max_new_tokens=33, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)
    out = model.generate(ids, **kw)
    assert isinstance(getattr(out, _CACHE_FIELD), NosaCache)
    assert getattr(out, _CACHE_FIELD).decode_steps == 32  # every token after the first: the decode step
    reference = model.generate(ids, **dynamic_cache(), **kw)
    assert torch.equal(out.sequences, reference.sequences)
    step_logits = torch.stack(out.logits, dim=1)
    for row, prompt in enumerate(prompts):
        generated = out.sequences[row, width:]
        with torch.no_grad():
            full = model(torch.cat([prompt, generated])[None]).logits[0]
        n = len(prompt)
        assert torch.equal(full[n - 1 : -1].argmax(-1), generated)
        torch.testing.assert_close(step_logits[row], full[n - 1 : -1].float(), rtol=1e-6, atol=1e-6)  # generate returns float32 logits


def test_sampling_and_beam_search_run_with_the_cache():
    model = model_of("nosa")
    ids = torch.randint(1, 97, (2, 30), generator=torch.Generator().manual_seed(4))  # no pad (0) inside
    torch.manual_seed(0)
    sampled = model.generate(ids, max_new_tokens=12, do_sample=True, top_k=20, pad_token_id=0, num_return_sequences=2)
    torch.manual_seed(0)
    again = model.generate(ids, max_new_tokens=12, do_sample=True, top_k=20, pad_token_id=0, num_return_sequences=2,
                           **dynamic_cache())
    assert torch.equal(sampled, again)
    beams = model.generate(ids, max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0)
    beams_ref = model.generate(ids, max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0, **dynamic_cache())
    assert torch.equal(beams, beams_ref)


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "engine_ops"])
def test_decode_steps_compress_only_the_window_ending_at_their_token(monkeypatch, lean):
    """The point of the cache: a decode step compresses at most one window (the kernel keys ending at its
    token), never the whole history (what the DynamicCache path does every step). The engine's ops (CUDA)
    compress that window every step, masked where it is incomplete; the CPU step only when one completes."""
    model = model_of("nosa")
    model.model.decode_step.lean_cpu = lean
    cfg = model.config.sparse
    ids = torch.randint(0, 97, (1, 90), generator=torch.Generator().manual_seed(5))
    compressed_lengths = []
    original = ops.compress_keys

    def counting(k, kernel, stride):
        compressed_lengths.append(k.shape[1])
        return original(k, kernel, stride)

    cache = NosaCache(model.config)
    _step(model, ids[:, :40], cache)
    monkeypatch.setattr(ops, "compress_keys", counting)
    for t in range(40, 90):
        _step(model, ids[:, t : t + 1], cache)
    assert cache.decode_steps == 50
    completed = sum(1 for t in range(41, 91) if t >= cfg.compress_kernel and (t - cfg.compress_kernel) % cfg.compress_stride == 0)
    assert len(compressed_lengths) == model.config.num_hidden_layers * (completed if lean else 50)
    assert set(compressed_lengths) == {cfg.compress_kernel}


def test_mask_that_disagrees_with_the_cache_is_refused():
    model = model_of("nosa")
    cache = NosaCache(model.config)
    ids = torch.randint(0, 97, (2, 10))
    _step(model, ids, cache)
    with pytest.raises(ValueError, match="attention_mask"):
        _step(model, ids[:, :1], cache, mask=torch.ones(2, 5, dtype=torch.long))
