"""GPU check and timing of the window-mean kernel after its change (agnostic scores summed by value with
tl.sort; the tile now holds the window along its minor dimension for compress_keys too).

Checks on the device: agnostic scores depend on a window's values only (bit for bit under any arrangement)
and match the reference (relative error); compressed keys match the reference (max abs error, bf16). Times both ops (triton.testing.do_bench,
median ms) at a few lengths of the 8B shape (2 KV heads, head_dim 128, kernel 32, stride 16), with the
bytes moved and the share of the HBM copy rate (4.27 TB/s, docs/gpu-box.md). Writes one JSON file.

python bench/gpu/window_means.py --out FILE [--device cuda] [--lengths 16384 65536 131072]
"""

import argparse
import json
import time

import torch

from nosa.ops import reference as ref
from nosa.ops.kernels import selection as ks

HBM_BYTES_PER_S = 4.27e12


def check(device) -> dict:
    g = torch.Generator().manual_seed(0)
    found = {}
    for kernel in (1, 3, 16, 32):
        windows = (torch.randn(2, 64, 2, kernel, generator=g) * torch.logspace(-3, 3, kernel)).to(device)
        shuffled = windows[..., torch.randperm(kernel, generator=g).to(device)]
        as_tokens = lambda w: w.permute(0, 1, 3, 2).reshape(2, 64 * kernel, 2)  # noqa: E731
        means = ks.agnostic_chunk_scores(as_tokens(windows), kernel, kernel)
        found[f"agnostic_by_value_k{kernel}"] = bool(torch.equal(means, ks.agnostic_chunk_scores(as_tokens(shuffled), kernel, kernel)))
        want = ref.agnostic_chunk_scores(as_tokens(windows), kernel, kernel)
        found[f"agnostic_vs_reference_rel_k{kernel}"] = float(((means - want).abs() / (1 + want.abs())).max())
    k = torch.randn(1, 1000, 2, 128, generator=g).to(device, torch.bfloat16)
    found["compress_vs_reference_bf16"] = float((ks.compress_keys(k, 32, 16).float() - ref.compress_keys(k, 32, 16).float()).abs().max())
    return found


def timing(device, lengths) -> list[dict]:
    import triton.testing

    rows = []
    for length in lengths:
        k = torch.randn(1, length, 2, 128, device=device, dtype=torch.bfloat16)
        c = torch.randn(1, length, 2, device=device)
        for name, fn, x in (("compress_keys", ks.compress_keys, k), ("agnostic_chunk_scores", ks.agnostic_chunk_scores, c)):
            ms = triton.testing.do_bench(lambda: fn(x, 32, 16), warmup=25, rep=100)
            out = fn(x, 32, 16)
            moved = 2 * x.numel() * x.element_size() + out.numel() * out.element_size()  # each token read by 2 windows
            rows.append({"op": name, "tokens": length, "ms": ms, "bytes": moved,
                         "share_of_hbm_rate": moved / (ms * 1e-3) / HBM_BYTES_PER_S})
            print(f"{name:22s} T={length:6d}  {ms:.4f} ms  {rows[-1]['share_of_hbm_rate']:.1%} of HBM rate", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536, 131072])
    args = parser.parse_args()
    result = {"machine": {"torch": torch.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
              "started": time.time(), "checks": check(args.device)}
    print(json.dumps(result["checks"]), flush=True)
    with open(args.out, "w") as f:  # the checks are kept even if the timing is cut short
        json.dump(result, f, indent=1)
    if args.device == "cuda":
        result["timing"] = timing(args.device, args.lengths)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
