"""Save/load round trips, and clear errors for bad configurations and bad inputs."""

import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from nosa import NosaConfig, NosaForCausalLM
from nosa.tokenizer import ByteTokenizer
from tests.helpers import tiny_config, tiny_model


@pytest.mark.parametrize("attn_mode", ["dense", "nosa"])
def test_save_and_load_give_identical_logits(tmp_path, attn_mode):
    model = tiny_model(attn_mode)
    ids = torch.randint(0, 97, (2, 70))
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path)
    assert os.path.exists(tmp_path / "model.safetensors")
    for loaded in (NosaForCausalLM.from_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert isinstance(loaded, NosaForCausalLM)
        loaded.eval()
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, before)
    assert AutoConfig.from_pretrained(tmp_path).attn_mode == attn_mode


def test_tied_embeddings_survive_save_load(tmp_path):
    model = tiny_model("nosa", tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path)
    loaded = NosaForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("fields, message", [
    (dict(attn_mode="sparse"), "attn_mode must be one of"),
    (dict(block_size=0), "block_size must be an integer >= 1"),
    (dict(block_size=8.0), "block_size must be an integer"),
    (dict(topk_blocks=3, sink_blocks=1, window_blocks=2), "topk_blocks \\(3\\) must be >="),
    (dict(topk_blocks=6, window_blocks=2, query_blocks=4), "query_blocks \\(4\\) must be <="),
    (dict(compress_kernel=4, compress_stride=8), "compress_stride \\(8\\) must be <= compress_kernel"),
    (dict(num_attention_heads=6, num_key_value_heads=4), "must be a multiple of num_key_value_heads"),
    (dict(sink_blocks=-1), "sink_blocks must be an integer >= 0"),
    (dict(rope_type="yarn"), "rope_type must be one of"),
])
def test_bad_configs_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**fields)


def test_dense_mode_ignores_sparse_quota_constraints():
    assert NosaConfig(attn_mode="dense", topk_blocks=1).sparse.is_sparse is False


def test_bad_inputs_raise_clear_errors():
    model = tiny_model("nosa")
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.rand(1, 10))
    with pytest.raises(ValueError, match="vocab_size=97"):
        model(torch.tensor([[1, 2, 97]]))
    with pytest.raises(ValueError, match="vocab_size=97"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=512"):
        model(torch.zeros(1, 513, dtype=torch.long))
    with pytest.raises(ValueError, match="no tokens"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="contiguous run of ones"):
        model(torch.ones(1, 6, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 0, 1, 1, 1]]))
    with pytest.raises(ValueError, match="attention_mask covers 5 tokens"):
        model(torch.ones(1, 6, dtype=torch.long), attention_mask=torch.ones(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must be \\[batch=2"):
        model(torch.ones(2, 6, dtype=torch.long), attention_mask=torch.ones(1, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="must hold only 0 and 1"):
        model(torch.ones(1, 3, dtype=torch.long), attention_mask=torch.tensor([[0.5, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="position_ids must be"):
        model(torch.ones(2, 6, dtype=torch.long), position_ids=torch.arange(5)[None])
    with pytest.raises(ValueError, match="labels must have shape"):
        model(torch.ones(1, 6, dtype=torch.long), labels=torch.ones(1, 5, dtype=torch.long))


def test_byte_tokenizer_round_trip(tmp_path):
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'héllo ✓'\n"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and tok.decode(ids) == text
    batch = tok(["ab", "abcd"])
    assert batch["input_ids"].shape == (2, 5) and batch["attention_mask"][0].tolist() == [0, 0, 1, 1, 1]
    tok.save_pretrained(tmp_path)
    assert ByteTokenizer.from_pretrained(tmp_path).decode(ids) == text
    with pytest.raises(ValueError, match="outside this tokenizer's vocabulary"):
        tok.decode([300])
    with pytest.raises(ValueError, match="must be integers"):
        tok.decode([1.7])


def test_unknown_config_fields_are_refused_with_a_suggestion():
    with pytest.raises(ValueError, match="'topk_block' \\(did you mean 'topk_blocks'\\?\\)"):
        NosaConfig(topk_block=8)
    with pytest.raises(ValueError, match="'zzz'"):
        tiny_config(zzz=1)


def test_transformers_own_kwargs_still_pass(tmp_path):
    # What transformers hands a config's __init__ when loading or converting: accepted, not refused.
    config = tiny_config(torch_dtype="float32", architectures=["NosaForCausalLM"], name_or_path="x",
                         output_attentions=False, auto_map={}, _commit_hash=None, num_labels=2, return_dict=True)
    assert config.topk_blocks == 6
    config.save_pretrained(tmp_path)
    for loaded in (AutoConfig.from_pretrained(tmp_path), NosaConfig.from_pretrained(tmp_path)):
        assert loaded.to_diff_dict() | {"_name_or_path": None} == config.to_diff_dict() | {"_name_or_path": None}
    assert NosaConfig.from_dict(config.to_dict()).topk_blocks == 6
    import copy

    assert copy.deepcopy(config).block_size == config.block_size
