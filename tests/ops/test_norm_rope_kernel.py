"""The fused RMSNorm and rotary kernels (nosa.ops.kernels.norm_rope) against the reference arithmetic, on CPU
under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU), and the layers' dispatch:
the kernels only where no gradient is kept, and not for CPU tensors under 'auto'."""

import pytest
import torch

from nosa import ops
from nosa.layers import RMSNorm, apply_rotary
from nosa.ops import reference as ref

kernels = pytest.importorskip("nosa.ops.kernels.norm_rope")


def _angles(B, T, D, g):
    freqs = torch.rand(B, T, D // 2, generator=g, dtype=torch.float64) * 40
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("shape", [(1, 1, 40), (3, 5, 96), (2, 100), (7, 1, 1, 8), (3, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rms_norm_equals_reference_at_odd_shapes(shape, dtype):
    g = torch.Generator().manual_seed(shape[-1] * 10 + len(shape))
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    weight = torch.randn(shape[-1], generator=g, dtype=torch.float64).to(dtype)
    got, want = kernels.rms_norm(x, weight, 1e-6), ref.rms_norm(x, weight, 1e-6)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    # The variance is float32 in both (x.float()): they differ by the sum's order, an ulp or two of float32.
    torch.testing.assert_close(got, want, atol=1e-6, rtol=2e-6)


def test_rms_norm_bf16_promotion_and_strided_rows():
    # bf16 x with a float32 weight (bf16 autocast training) -> float32; bf16 with bf16 (an inference model)
    # -> bf16. The kernel rounds where the reference does (to bf16 before the weight), so at these shapes
    # (no row's mean an ulp from a rounding boundary) the values are equal bit for bit.
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 5, 100, generator=g) * 2).to(torch.bfloat16)
    w32 = torch.randn(100, generator=g)
    for weight, dtype in ((w32, torch.float32), (w32.to(torch.bfloat16), torch.bfloat16)):
        got, want = kernels.rms_norm(x, weight, 1e-5), ref.rms_norm(x, weight, 1e-5)
        assert got.dtype == want.dtype == dtype
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    # Non-contiguous: a slice of wider rows (row stride 140), and a transposed tensor (last stride not 1).
    wide = torch.randn(4, 6, 140, generator=g)
    torch.testing.assert_close(kernels.rms_norm(wide[..., 20:120], w32, 1e-6), ref.rms_norm(wide[..., 20:120], w32, 1e-6),
                               atol=1e-6, rtol=2e-6)
    tall = torch.randn(40, 6, generator=g).t()
    torch.testing.assert_close(kernels.rms_norm(tall, w32[:40], 1e-6), ref.rms_norm(tall, w32[:40], 1e-6), atol=1e-6, rtol=2e-6)
    # A row's result does not depend on the other rows (prefill and decode round a token alike).
    w140 = torch.randn(140, generator=g)
    assert torch.equal(kernels.rms_norm(wide[2:3, 4:5], w140, 1e-6)[0, 0], kernels.rms_norm(wide, w140, 1e-6)[2, 4])


@pytest.mark.parametrize("B,T,H,D", [(1, 1, 1, 8), (3, 5, 3, 64), (1, 5, 3, 128), (3, 1, 1, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rotary_equals_reference_at_odd_shapes(B, T, H, D, dtype):
    g = torch.Generator().manual_seed(B * 1000 + T * 100 + D)
    x = torch.randn(B, T, H, D, generator=g, dtype=torch.float64).to(dtype)
    cos, sin = (t.to(dtype) for t in _angles(B, T, D, g))
    got, want = kernels.apply_rotary(x, cos, sin), ref.apply_rotary(x, cos, sin)
    assert got.dtype == dtype and got.shape == x.shape
    # Same operations, each rounded where the reference rounds: equal bit for bit.
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("x_dtype,cs_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16),
                                              (torch.bfloat16, torch.float64)])
def test_rotary_promotion_rounds_as_the_reference(x_dtype, cs_dtype):
    # bf16 q, k with float32 cos, sin (autocast training): products and sum in float32, the result bf16;
    # all bf16 (inference): each product and the sum rounded to bf16 as PyTorch's bf16 mul and add do;
    # float16 x with bf16 cos promotes to float32; float64 cos computes in float64 and rounds to bf16 through
    # float32, as PyTorch's double -> BFloat16 does. Equal bit for bit.
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(3, 5, 3, 64, generator=g) * 4).to(x_dtype)
    cos, sin = (t.to(cs_dtype) for t in _angles(3, 5, 64, g))
    got, want = kernels.apply_rotary(x, cos, sin), ref.apply_rotary(x, cos, sin)
    assert got.dtype == want.dtype == x_dtype
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_rotary_non_contiguous_and_broadcast_inputs():
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(3, 5, 7, 64, generator=g)
    x = qkv[:, :, 2:5]  # heads of a fused projection: strided along H and T
    xt = torch.randn(3, 3, 5, 64, generator=g).transpose(1, 2)  # [B, T, H, D] from [B, H, T, D]
    xd = torch.randn(3, 5, 3, 128, generator=g)[..., ::2]  # head_dim stride 2
    cos, sin = _angles(3, 5, 64, g)
    cos, sin = cos.float(), sin.float()
    for v in (x, xt, xd):
        torch.testing.assert_close(kernels.apply_rotary(v, cos, sin), ref.apply_rotary(v, cos, sin), atol=0, rtol=0)
    wide = torch.randn(3, 5, 128, generator=g)
    c2, s2 = wide[..., :64], wide[..., 64:]  # strided cos, sin
    torch.testing.assert_close(kernels.apply_rotary(x, c2, s2), ref.apply_rotary(x, c2, s2), atol=0, rtol=0)
    # One row's cos, sin broadcast over the batch, as cos[:, :, None] broadcasts in the reference.
    torch.testing.assert_close(kernels.apply_rotary(x, cos[:1], sin[:1]), ref.apply_rotary(x, cos[:1], sin[:1]), atol=0, rtol=0)


def test_bad_inputs_are_named():
    x = torch.randn(2, 3, 2, 8)
    cos = sin = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"cos must be \[B, T, D\]"):
        kernels.apply_rotary(x, cos[..., :4], sin)
    with pytest.raises(ValueError, match=r"cos, sin \[B, T, D\]"):
        kernels.apply_rotary(x, cos[:, :, None].expand(2, 3, 2, 8), sin)
    with pytest.raises(ValueError, match="head_dim must be even"):
        kernels.apply_rotary(torch.randn(2, 3, 2, 7), torch.randn(2, 3, 7), torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match="one dtype"):
        kernels.apply_rotary(x, cos, sin.double())
    with pytest.raises(ValueError, match=r"weight \[N\]"):
        kernels.rms_norm(torch.randn(2, 40), torch.ones(41), 1e-6)
    with pytest.raises(ValueError, match="float16, bfloat16"):
        kernels.rms_norm(torch.ones(2, 4, dtype=torch.int32), torch.ones(4), 1e-6)


def test_layers_use_the_kernels_only_without_gradients(monkeypatch):
    calls = {"rms_norm": 0, "apply_rotary": 0}
    for name in calls:
        real = getattr(kernels, name)

        def counting(*args, _real=real, _name=name):
            calls[_name] += 1
            return _real(*args)

        monkeypatch.setitem(ops.dispatch._KERNELS, name, counting)
    norm = RMSNorm(40, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(40))
    h = torch.randn(2, 3, 40)
    x = torch.randn(2, 3, 2, 8)
    cos, sin = (t.float() for t in _angles(2, 3, 8, torch.Generator().manual_seed(0)))
    want_norm, want_rot = ref.rms_norm(h, norm.weight, 1e-5).detach(), ref.apply_rotary(x, cos, sin)
    with torch.no_grad():
        assert torch.equal(norm(h), want_norm) and torch.equal(apply_rotary(x, cos, sin), want_rot)  # CPU, auto: the reference
        assert calls == {"rms_norm": 0, "apply_rotary": 0}
        with ops.use_backend("triton", only=["rms_norm", "apply_rotary"]):
            torch.testing.assert_close(norm(h), want_norm, atol=1e-6, rtol=1e-6)
            assert torch.equal(apply_rotary(x, cos, sin), want_rot)
    assert calls == {"rms_norm": 1, "apply_rotary": 1}
    # Gradients kept: the autograd reference even where the kernels are forced, and the gradients flow.
    xg, hg = x.clone().requires_grad_(), h.clone().requires_grad_()
    with ops.use_backend("triton", only=["rms_norm", "apply_rotary"]):
        out_norm = norm(h)  # only the weight requires grad
        out_rot = apply_rotary(xg, cos, sin)
        out_both = norm(hg)
    assert calls == {"rms_norm": 1, "apply_rotary": 1}
    (out_norm.sum() + out_rot.square().sum() + out_both.square().sum()).backward()
    assert norm.weight.grad.abs().sum() > 0 and xg.grad.abs().sum() > 0 and hg.grad.abs().sum() > 0
    assert torch.equal(out_rot.detach(), want_rot)


def test_engine_with_the_kernels_equals_the_model_with_them(monkeypatch):
    # Under the kernels in both (as on CUDA, where auto picks them for the forward and the engine alike), the
    # engine's prefill and one-token steps still equal the model's full forward.
    from nosa.engine import LLM, SamplingParams
    from tests.helpers import engine_model, reference_logits

    calls = []
    monkeypatch.setitem(ops.dispatch._KERNELS, "rms_norm", lambda *a: calls.append(1) or kernels.rms_norm(*a))
    monkeypatch.setitem(ops.dispatch._KERNELS, "apply_rotary", kernels.apply_rotary)
    model = engine_model("nosa", seed=3)
    prompts = [[5, 17, 200, 3, 9, 9, 9, 9, 41, 2, 7], [9, 1, 44]]
    with ops.use_backend("triton", only=["rms_norm", "apply_rotary"]):
        llm = LLM(model, device="cpu", offload=True, max_model_len=64, max_num_seqs=2)
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False,
                            return_logits=True)
        for prompt, out in zip(prompts, outs):
            torch.testing.assert_close(out.logits, reference_logits(model, prompt, out.token_ids), atol=1e-4, rtol=1e-4)
    assert calls  # the engine ran the kernel


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's inf * 0 in the interpreter
def test_rms_norm_bf16_with_float64_weight_and_non_finite_values():
    # x bf16, weight float64: normalised in float32, rounded to bf16, multiplied in float64. A NaN or inf in a
    # row makes that row NaN in both; the other rows are untouched.
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 96, generator=g).to(torch.bfloat16)
    x[1, 5], x[2, 7] = float("nan"), float("inf")
    weight = torch.randn(96, generator=g, dtype=torch.float64)
    got, want = kernels.rms_norm(x, weight, 1e-6), ref.rms_norm(x, weight, 1e-6)
    assert got.dtype == want.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=0, rtol=0, equal_nan=True)
