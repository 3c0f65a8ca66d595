"""The eviction head's Triton kernel (nosa.ops.kernels.eviction) against the reference arithmetic, on CPU
under the interpreter, and the layer's dispatch: the kernel only where no gradient is kept."""

import pytest
import torch

from nosa import ops
from nosa.layers import EvictionHead
from nosa.ops import reference as ref

kernels = pytest.importorskip("nosa.ops.kernels.eviction")


def _case(B, T, H, D, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(B, T, H, D, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(H, H * D, generator=g, dtype=torch.float64) * scale).to(dtype)
    bias = torch.randn(H, generator=g, dtype=torch.float64).to(dtype)
    A = torch.rand(H, generator=g, dtype=torch.float64).to(dtype) + 0.5
    return v, weight, bias, A


@pytest.mark.parametrize("B,T,H,D", [(1, 1, 1, 8), (3, 5, 2, 16), (2, 3, 3, 100), (1, 7, 2, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_equals_reference_at_odd_shapes(B, T, H, D, dtype):
    args = _case(B, T, H, D, dtype, seed=B * 100 + D)
    got, want = kernels.eviction_scores(*args), ref.eviction_scores(*args)
    assert got.dtype == want.dtype == dtype and got.shape == (B, T, H)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_softplus_tails_and_promotion():
    # raw far below 0 (softplus ~ exp(raw): a naive log(1 + exp) rounds these to 0 or to a few ulps of 1),
    # around the threshold 20, and far above it; bf16 values with float32 parameters promote to float32.
    v, weight, bias, A = _case(2, 4, 2, 8, torch.float32, seed=3)
    for shift in (-40.0, -16.0, -5.0, 19.9, 20.1, 60.0):
        b = bias * 0 + shift
        got, want = kernels.eviction_scores(v * 1e-3, weight, b, A), ref.eviction_scores(v * 1e-3, weight, b, A)
        torch.testing.assert_close(got, want, atol=0, rtol=2e-5)
    got = kernels.eviction_scores(v.to(torch.bfloat16), weight, bias, A)
    want = ref.eviction_scores(v.to(torch.bfloat16), weight, bias, A)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_rows_do_not_depend_on_the_batch_and_strided_input():
    # One token's score is the same alone as among many (the tie rule needs prefill == decode rounding),
    # and a strided v (a slice of a wider tensor) is read as the values it holds.
    v, weight, bias, A = _case(2, 9, 2, 24, torch.float32, seed=5)
    all_rows = kernels.eviction_scores(v, weight, bias, A)
    assert torch.equal(kernels.eviction_scores(v[1:2, 4:5], weight, bias, A)[0, 0], all_rows[1, 4])
    wide = torch.randn(2, 9, 2, 40)
    wide[..., :24] = v
    torch.testing.assert_close(kernels.eviction_scores(wide[..., :24], weight, bias, A), all_rows, atol=0, rtol=0)


def test_bad_shapes_are_named():
    v, weight, bias, A = _case(1, 2, 2, 8, torch.float32)
    with pytest.raises(ValueError, match=r"weight must be \(2, 16\)"):
        kernels.eviction_scores(v, weight[:, :8], bias, A)
    with pytest.raises(ValueError, match=r"v must be \[B, T, H, D\]"):
        kernels.eviction_scores(v[0], weight, bias, A)


def test_layer_uses_the_kernel_only_without_gradients(monkeypatch):
    head = EvictionHead(2, 8, init_std=0.1)
    with torch.no_grad():
        head.A.fill_(0.7)
    v = torch.randn(1, 3, 2, 8)
    calls = []
    real = kernels.eviction_scores

    def counting(*args):
        calls.append(1)
        return real(*args)

    ops.dispatch._load_kernels()  # first, or loading later would keep the patch and teardown would drop the kernel
    monkeypatch.setitem(ops.dispatch._KERNELS, "eviction_scores", counting)
    want = ref.eviction_scores(v, head.delta.weight, head.delta.bias, head.A)
    with torch.no_grad():
        on_cpu = head(v)  # auto on CPU tensors: the reference
        with ops.use_backend("triton", only=["eviction_scores"]):
            fused = head(v)
    assert len(calls) == 1
    torch.testing.assert_close(on_cpu, want, atol=0, rtol=0)
    torch.testing.assert_close(fused, want, atol=1e-6, rtol=1e-6)
    with ops.use_backend("triton", only=["eviction_scores"]):
        out = head(v)  # gradients kept: the autograd reference even where the kernel is forced
    out.sum().backward()
    assert len(calls) == 1 and head.A.grad is not None and head.delta.weight.grad.abs().sum() > 0
    torch.testing.assert_close(out.detach(), want.detach(), atol=0, rtol=0)


def test_engine_with_the_kernel_equals_the_model_with_it():
    # Under the kernel in both (as on CUDA, where auto picks it for the forward and the engine alike), the
    # engine's prefill and one-token steps still equal the model's full forward: a row's score does not
    # depend on how many rows a launch holds.
    from nosa.engine import LLM, SamplingParams
    from tests.helpers import engine_model, reference_logits

    model = engine_model("nosa", seed=2)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.eviction.A.fill_(0.5)  # live scores (A = 0 at init would make them all 0)
    prompts = [[5, 17, 200, 3, 9, 9, 9, 9, 41, 2, 7], [9, 1, 44]]
    with ops.use_backend("triton", only=["eviction_scores"]):
        llm = LLM(model, device="cpu", offload=True, max_model_len=64, max_num_seqs=2)
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False,
                            return_logits=True)
        for prompt, out in zip(prompts, outs):
            torch.testing.assert_close(out.logits, reference_logits(model, prompt, out.token_ids), atol=1e-4, rtol=1e-4)
