"""Before a long GPU run: do the Triton kernels give the reference's loss and gradients for the run's
model shape, and how fast is one training step with each? Writes JSON; exit status 1 when the kernels
fail or disagree, so a launcher can fall back (`... || export NOSA_BACKEND=reference`).

    python -m nosa.train.backend_check --config gpu_small --out backend_check.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import torch


def _step(model, ids, backend):
    from nosa import ops

    model.zero_grad(set_to_none=True)
    with ops.use_backend(backend), torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    return float(loss), grads


def check(cfg, batch: int, seq_len: int, loss_rtol: float, min_cosine: float) -> dict:
    from nosa import NosaConfig, NosaForCausalLM

    torch.manual_seed(0)
    model = NosaForCausalLM(NosaConfig(vocab_size=264, **cfg.model)).cuda()
    with torch.no_grad():  # a non-zero eviction bias, as after some training
        for layer in model.model.layers:
            if layer.self_attn.eviction is not None:
                layer.self_attn.eviction.A.fill_(0.5)
    ids = torch.randint(0, 256, (batch, seq_len), device="cuda")
    result = {"batch": batch, "seq_len": seq_len}
    out = {}
    for backend in ("reference", "triton"):
        try:
            _step(model, ids, backend)  # warm-up (compiles the kernels)
            torch.cuda.synchronize()
            t0 = time.time()
            out[backend] = _step(model, ids, backend)
            torch.cuda.synchronize()
            result[f"{backend}_step_s"] = time.time() - t0
        except Exception:  # report any kernel failure and let the caller fall back to the reference
            result[f"{backend}_error"] = traceback.format_exc()[-2000:]
    if "reference" not in out or "triton" not in out:
        result["ok"] = False
        return result
    (loss_r, grad_r), (loss_t, grad_t) = out["reference"], out["triton"]
    cosine = float(torch.nn.functional.cosine_similarity(grad_r, grad_t, dim=0))
    result.update(loss_reference=loss_r, loss_triton=loss_t, loss_rel_diff=abs(loss_r - loss_t) / abs(loss_r),
                  grad_cosine=cosine, grad_rel_norm_diff=float((grad_r - grad_t).norm() / grad_r.norm()))
    result["ok"] = result["loss_rel_diff"] <= loss_rtol and cosine >= min_cosine
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--loss-rtol", type=float, default=1e-2)
    parser.add_argument("--min-cosine", type=float, default=0.99)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    from nosa.train.config import make_config

    if not torch.cuda.is_available():
        raise RuntimeError("backend_check compares the Triton kernels with the reference on a CUDA device; none is visible")
    result = check(make_config(args.config), args.batch, args.seq_len, args.loss_rtol, args.min_cosine)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_error")}))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
