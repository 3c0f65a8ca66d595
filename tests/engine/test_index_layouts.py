"""Regression (issue 13, item 1): the Triton gather read its head index as a dense array, and the prefill
install built it as a stride-0 view when there is one KV head, so it read past the index (a segfault under
the interpreter, a second row's logits off by up to 3.9 on the GPU). Every kernel wrapper now makes or
checks the layout of its index tensors. The engine with the Triton cache ops (interpreter, float32) equals
the model's forward at one KV head, GQA ratios 1 and 3."""

import pytest
import torch

from nosa import ops
from nosa.engine import LLM, SamplingParams
from tests.helpers import engine_model, reference_logits

pytest.importorskip("triton")

# The failing case of the issue: block 4, topk 9, sink 1, window 1, kernel 8, stride 8, head_dim 8.
# topk 4 (nosa) makes the decode step evict and reload blocks too.
GEOMETRY = dict(block_size=4, sink_blocks=1, window_blocks=1, query_blocks=1, compress_kernel=8, compress_stride=8)


@pytest.mark.parametrize("mode,q_heads,kv_heads,topk", [("infllmv2", 1, 1, 9), ("infllmv2", 3, 1, 9),
                                                         ("nosa", 1, 1, 4)])
def test_engine_with_triton_cache_ops_at_one_kv_head_equals_the_model(mode, q_heads, kv_heads, topk):
    model = engine_model(mode, seed=4, num_attention_heads=q_heads, num_key_value_heads=kv_heads, head_dim=8,
                         hidden_size=8 * q_heads, topk_blocks=topk, **GEOMETRY)
    prompts = [[5, 17, 200, 3], [9, 1, 44, 120, 7]]
    with ops.use_backend("triton", only=ops.BLOCK_OPS):
        llm = LLM(model, device="cpu", offload=True, max_model_len=48, max_num_seqs=2)
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=14, ignore_eos=True),
                            use_tqdm=False, return_logits=True)
    if topk == 4:
        assert llm.stats().blocks_loaded_per_step > 0  # blocks were evicted and reloaded at decode
    for prompt, out in zip(prompts, outs):
        torch.testing.assert_close(out.logits, reference_logits(model, prompt, out.token_ids), atol=1e-4, rtol=1e-4)


def test_gather_kernel_makes_a_stride_zero_index_dense_and_checks_outputs():
    from nosa.ops import block_ops
    from nosa.ops.kernels import gather as kernels

    g = torch.Generator().manual_seed(0)
    host_k, host_v = torch.randn(6, 1, 4, 8, generator=g), torch.randn(6, 1, 4, 8, generator=g)
    src = torch.tensor([3, 0, 5, -1], dtype=torch.int32)
    dst = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    head = torch.zeros(1, dtype=torch.int32).expand(4)  # stride 0, one element behind it
    assert head.stride() == (0,)
    outs = []
    for impl in (block_ops.gather_blocks, kernels.gather_blocks):
        slot_k, slot_v = torch.zeros(4, 4, 1, 8), torch.zeros(4, 4, 1, 8)
        impl(host_k, host_v, slot_k.transpose(1, 2), slot_v.transpose(1, 2), src, dst, head)
        outs.append((slot_k, slot_v))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    with pytest.raises(ValueError, match="head must have 4 elements"):
        kernels.gather_blocks(host_k, host_v, host_k, host_v, src, dst, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="must be an integer tensor"):
        kernels.gather_blocks(host_k, host_v, host_k, host_v, src.float(), dst, head)


def test_plan_step_kernel_refuses_index_outputs_it_cannot_write_in_place():
    from nosa.ops.kernels import gather as kernels

    R, H, K, bs, D = 2, 1, 3, 4, 8
    slots = ops.LayerSlots(torch.full((R, H, K), -1, dtype=torch.int32), torch.zeros(R * K, bs, H, D),
                           torch.zeros(R * K, bs, H, D), torch.full((R, 5), -1, dtype=torch.int32))
    token = ops.StepTokens(torch.tensor([0, 1]), torch.tensor([True, True]), torch.zeros(R, H, D), torch.zeros(R, H, D))
    host = ops.HostPages(torch.zeros(4, H, bs, D), torch.zeros(4, H, bs, D))
    plan = ops.LoadPlan.allocate(R, H, K, "cpu")
    bad = ops.LoadPlan(plan.src_page.to(torch.int64), plan.dst_page, plan.head, plan.loads, plan.loaded, plan.selected,
                       plan.slot_src)
    with pytest.raises(ValueError, match="plan.src_page must be a contiguous torch.int32 tensor of 6 elements"):
        kernels.plan_step(slots, None, token, host, bad)
    bad = ops.LoadPlan(plan.src_page, plan.dst_page, plan.head, plan.loads, plan.loaded, plan.selected,
                       torch.full((R, H, 2 * K), -1, dtype=torch.int32)[..., ::2])  # strided: refused, not read as dense
    with pytest.raises(ValueError, match="plan.slot_src must be a contiguous torch.int32 tensor of 6 elements"):
        kernels.plan_step(slots, None, token, host, bad)
