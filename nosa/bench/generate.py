"""`nosa bench generate`: decode tokens/s of transformers' `model.generate` with the model's NosaCache
against the engine (`LLM.generate`) on the same model and prompt, at batch 1, greedy; the old cache path
(DynamicCache: selection over the whole cache at every step) is timed too, on fewer tokens, and so is a plain
greedy loop over the model's forward with a NosaCache (the same decode step without generate's own
per-token work: logits processors, stopping criteria, mask and input bookkeeping), which splits the gap to
the engine into the step and generate's overhead.

On CUDA generate's decode step replays a CUDA graph per (batch, capacity) (nosa/models/decode_step.py);
--eager times it without graphs. The file records how many graphs were captured and replayed.

Decode rate = (new_tokens - 1) / (time of a run of new_tokens - time of a run of 1 token): the prefill and
fixed costs cancel, so the figure is the steady per-token cost of each path. Each timing is the median of
--repeats runs after one warm-up run (which also captures the engine's CUDA graphs). The greedy tokens of
generate and of the engine are compared (on a float model they should agree; bf16 may break near-ties).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from nosa.bench.common import write_result
from nosa.bench.shapes import SHAPES, build_model


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="model.generate (NosaCache) vs the engine at batch 1: decode tokens/s")
    p.add_argument("--shape", default="demo", choices=sorted(SHAPES))
    p.add_argument("--attn-mode", default="nosa")
    p.add_argument("--prompt", type=int, default=4096, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--dynamic-new-tokens", type=int, default=16, help="tokens for the slow DynamicCache path (0: skip)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--device", default=None)
    p.add_argument("--eager", action="store_true", help="generate's decode step without CUDA graphs")
    p.add_argument("--offload", action="store_true", help="the engine offloads its KV store (default: all on the device)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="generate_vs_engine")
    p.add_argument("--out-dir", default=None, help="where the JSON goes (default bench/results)")
    p.set_defaults(func=main)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> tuple[float, object]:
    """Median seconds of `fn()` over `repeats` calls after one warm-up call, and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def decode_rate(run, tokens: int, device, repeats: int) -> dict:
    """run(n) generates n tokens; -> steady decode tokens/s from the difference of n = tokens and n = 1."""
    one_s, _ = timed(lambda: run(1), device, repeats)
    all_s, out = timed(lambda: run(tokens), device, repeats)
    decode_s = max(all_s - one_s, 1e-9)
    return {"first_token_s": one_s, "run_s": all_s, "tokens": tokens, "decode_tokens_per_s": (tokens - 1) / decode_s,
            "step_ms": decode_s / (tokens - 1) * 1e3, "token_ids": out}


def main(args) -> int:
    from nosa.engine import LLM, SamplingParams
    from nosa.models.modeling_nosa import _CACHE_FIELD
    from transformers import DynamicCache

    if args.new_tokens < 2 or args.prompt < 1 or args.repeats < 1 or args.dynamic_new_tokens in (1,) or args.dynamic_new_tokens < 0:
        print("nosa bench generate: --new-tokens >= 2, --prompt >= 1, --repeats >= 1, --dynamic-new-tokens 0 or >= 2", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    model = build_model(args.shape, args.attn_mode, args.seed).to(device=device, dtype=dtype)
    total = args.prompt + args.new_tokens
    if total > model.config.max_position_embeddings:
        print(f"nosa bench generate: prompt + new tokens = {total} exceeds the shape's {model.config.max_position_embeddings}", file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, 256, (args.prompt,), generator=g).tolist()
    ids = torch.tensor([prompt], device=device)

    def hf(n, cache=None):
        extra = {} if cache is None else {_CACHE_FIELD: cache()}
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=model.config.pad_token_id, **extra)
        return out[0, args.prompt:].tolist()

    from nosa.models import NosaCache

    def loop(n):
        """Greedy decoding by hand: prefill, then n - 1 one-token forwards with a NosaCache."""
        cache = NosaCache(model.config, capacity=total)
        mask = torch.ones((1, total), dtype=torch.long, device=device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask[:, : args.prompt], past_key_values=cache, use_cache=True).logits
            token = logits[:, -1:].argmax(-1)
            tokens = [token]
            for i in range(n - 1):
                token = model(input_ids=token, attention_mask=mask[:, : args.prompt + i + 1], past_key_values=cache,
                              use_cache=True).logits[:, -1:].argmax(-1)
                tokens.append(token)
        return torch.cat(tokens, dim=1)[0].tolist()

    step = model.model.decode_step
    step.use_graphs = not args.eager
    llm = LLM(model, device=device, offload=args.offload, max_model_len=total, max_num_seqs=1)

    def engine(n):
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        return llm.generate([prompt], params, use_tqdm=False)[0].token_ids

    results = {"engine": decode_rate(engine, args.new_tokens, device, args.repeats)}
    captures, replays = step.captures, step.replays
    results["generate_nosa_cache"] = decode_rate(hf, args.new_tokens, device, args.repeats)
    graphs = {"cuda_graphs": device.type == "cuda" and step.use_graphs, "captured": step.captures - captures,
              "replayed": step.replays - replays}
    results["loop_nosa_cache"] = decode_rate(loop, args.new_tokens, device, args.repeats)
    if args.dynamic_new_tokens:
        results["generate_dynamic_cache"] = decode_rate(lambda n: hf(n, DynamicCache), args.dynamic_new_tokens, device,
                                                        max(1, args.repeats // 2))
    engine_ids = results["engine"].pop("token_ids")
    hf_ids = results["generate_nosa_cache"].pop("token_ids")
    loop_ids = results["loop_nosa_cache"].pop("token_ids")
    results.get("generate_dynamic_cache", {}).pop("token_ids", None)
    agree = next((i for i, (a, b) in enumerate(zip(engine_ids, hf_ids)) if a != b), min(len(engine_ids), len(hf_ids)))
    summary = {
        "ratio_engine_over_generate": results["engine"]["decode_tokens_per_s"] / results["generate_nosa_cache"]["decode_tokens_per_s"],
        "target_ratio_at_most": 3.0,
        "tokens_equal_prefix": agree, "tokens_compared": min(len(engine_ids), len(hf_ids)),
        "loop_tokens_equal_generate": loop_ids == hf_ids,
        "generate_overhead_ms_per_token": (results["generate_nosa_cache"]["step_ms"] - results["loop_nosa_cache"]["step_ms"]),
        "generate_decode_step": graphs,
    }
    if "generate_dynamic_cache" in results:
        summary["speedup_nosa_cache_over_dynamic_cache"] = (results["generate_nosa_cache"]["decode_tokens_per_s"]
                                                            / results["generate_dynamic_cache"]["decode_tokens_per_s"])
    parameters = {k: v for k, v in vars(args).items() if k != "func"} | {"device_used": str(device),
                                                                        "engine_cuda_graphs": llm.uses_cuda_graphs}
    path = write_result(args.name, parameters, {"runs": results, "summary": summary}, **({"directory": args.out_dir} if args.out_dir else {}))
    print(f"wrote {path}")
    print(f"{'path':<24} {'decode tok/s':>13} {'step ms':>9} {'first token s':>14}")
    for name, r in results.items():
        print(f"{name:<24} {r['decode_tokens_per_s']:13.1f} {r['step_ms']:9.3f} {r['first_token_s']:14.3f}")
    print(f"engine / generate(NosaCache) = {summary['ratio_engine_over_generate']:.2f}x (target <= 3x); "
          f"greedy tokens equal for the first {agree} of {summary['tokens_compared']}; generate's own overhead "
          f"{summary['generate_overhead_ms_per_token']:.3f} ms/token; decode step graphs: {graphs}")
    return 0
