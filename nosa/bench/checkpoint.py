"""`nosa bench decode --model DIR`: a saved NosaForCausalLM end to end through the engine (issue 10 item 4).

Unlike the synthetic 8B-shape runs of `nosa bench decode`, nothing is installed by hand: the checkpoint is
loaded with `LLM(DIR)`, `--batch` prompts of `--prompt` tokens (the tokenized `--prompt-text` file,
repeated to length, or seeded random token ids) are added at once and prefilled by the engine (batched,
interleaved prefill), then `--warmup` untimed and `--steps` timed decode steps run. Reported per offload
setting: time to first token of each request (from the moment all were added), prefill tokens/s, decode
tokens/s, and memory: on CUDA the device's allocated and peak bytes, the host store's bytes; on CPU the
process's peak resident memory. Works with `--device cpu` (CI runs it on a tiny saved model).
"""

from __future__ import annotations

import os
import resource
import time

import torch

from nosa.bench.common import write_result


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, metavar="DIR",
                   help="benchmark this saved NosaForCausalLM end to end (real prefill through the engine) instead "
                        "of the synthetic 8B shape; --prompt, --batch, --steps, --warmup apply")
    p.add_argument("--device", default=None, help="with --model: cuda or cpu (default: cuda if available)")
    p.add_argument("--prompt-text", default=None, metavar="FILE",
                   help="with --model: prompts are this text, tokenized with the model's tokenizer and repeated to --prompt tokens")
    p.add_argument("--offload", default="on", help="with --model: on, off, or on,off")
    p.add_argument("--prefill-chunk", type=int, default=None, help="with --model: LLM(prefill_chunk=...)")
    p.add_argument("--max-prefill-tokens", type=int, default=None, help="with --model: LLM(max_prefill_tokens=...)")
    p.add_argument("--out-dir", default=None, help="where the JSON goes (default bench/results)")


def prompt_ids(llm, args, generator: torch.Generator) -> list[list[int]]:
    """--batch prompts of --prompt tokens: the text file's tokens repeated (each prompt starting at another
    offset, so they differ), or seeded random ids below the vocabulary the engine samples from."""
    if args.prompt_text is None:
        return [torch.randint(0, llm.sample_vocab, (args.prompt,), generator=generator).tolist() for _ in range(args.batch)]
    if llm.tokenizer is None:
        raise ValueError(f"--prompt-text needs a tokenizer saved beside the model in {args.model}")
    with open(args.prompt_text, encoding="utf-8") as f:
        text = llm.tokenizer.encode(f.read())
    if not text:
        raise ValueError(f"--prompt-text {args.prompt_text} holds no tokens")
    repeated = text * (-(-(args.prompt + args.batch) // len(text)))
    return [repeated[i : i + args.prompt] for i in range(args.batch)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_one(args, offload: bool) -> dict:
    from nosa.engine import LLM, SamplingParams
    from nosa.engine.budget import DEFAULT_MAX_PREFILL_TOKENS, DEFAULT_PREFILL_CHUNK

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    options = {k: v for k, v in (("prefill_chunk", args.prefill_chunk), ("max_prefill_tokens", args.max_prefill_tokens)) if v is not None}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # Requests decode while others still prefill (at least one prompt token per step), so none may finish
    # before the timed steps end: room for the prefill phase's steps, the warm-up and the timed ones.
    chunk = min(args.prefill_chunk or DEFAULT_PREFILL_CHUNK, args.max_prefill_tokens or DEFAULT_MAX_PREFILL_TOKENS)
    max_tokens = args.batch * -(-args.prompt // chunk) + args.warmup + args.steps + 1
    llm = LLM(args.model, device=device, offload=offload, max_model_len=args.prompt + max_tokens, max_num_seqs=args.batch,
              dtype=torch.bfloat16 if device.type == "cuda" else None, **options)
    prompts = prompt_ids(llm, args, torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    ids = [llm.add_request(p, params) for p in prompts]
    first: dict[int, float] = {}
    while len(first) < len(ids):
        for out in llm.step():
            if out.finish_reason == "error":
                raise RuntimeError(f"request {out.request_id} failed: {llm.output(out.request_id).error}")
            first.setdefault(out.request_id, time.perf_counter() - start)
    prefilled_s = max(first.values())
    # Until every prompt is in, steps mixed prefill and decode; from here on each step is one decode step.
    for _ in range(args.warmup):
        llm.step()
    sync(device)
    before = llm.stats()
    timed = time.perf_counter()
    for _ in range(args.steps):
        llm.step()
    sync(device)
    decode_s = time.perf_counter() - timed
    after = llm.stats()
    tokens = after.decode_tokens - before.decode_tokens
    for request_id in ids:
        llm.abort(request_id)
    ttft = sorted(first[i] for i in ids)
    run = {"offload": offload, "attn_mode": llm.config.sparse.attn_mode, "batch": len(ids), "prompt_tokens": args.prompt,
           "prefill_chunk": llm.prefill_chunk, "max_prefill_tokens": llm.max_prefill_tokens,
           "ttft_s": {"min": ttft[0], "p50": ttft[len(ttft) // 2], "max": ttft[-1]},
           "prefill_tokens_per_s": len(ids) * args.prompt / prefilled_s,
           "decode_tokens": tokens, "decode_tokens_per_s": tokens / decode_s, "decode_step_ms": 1e3 * decode_s / args.steps,
           "hit_rate_per_layer": [round(h, 4) for h in after.hit_rate_per_layer],
           "host_store_bytes": llm.store.allocated_bytes if offload else 0,
           "device_state_bytes": llm.cache.allocated_bytes()["total"] + (0 if offload else llm.store.allocated_bytes),
           "weight_bytes": sum(p.numel() * p.element_size() for p in llm.model.parameters())}
    if device.type == "cuda":
        run.update({"device_allocated_bytes": torch.cuda.memory_allocated(), "device_peak_bytes": torch.cuda.max_memory_allocated()})
    # ru_maxrss is in KiB on Linux: the peak of the whole process (the model, the store, the allocator).
    run["process_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del llm
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return run


def main(args) -> int:
    if not os.path.isdir(args.model):
        raise ValueError(f"--model {args.model!r} is not a directory saved with save_pretrained")
    settings = args.offload.split(",")
    if not settings or any(s not in ("on", "off") for s in settings):
        raise ValueError(f"--offload must be on, off or on,off, got {args.offload!r}")
    for flag, value in (("--prompt", args.prompt), ("--batch", args.batch), ("--steps", args.steps)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    # Not decode*.json: `nosa bench report` renders those as synthetic-8B decode tables.
    name = "model_decode" if args.name == "decode_8b" else args.name
    parameters = {"model": os.path.abspath(args.model), "device": args.device, "prompt_tokens": args.prompt,
                  "prompts": f"text of {args.prompt_text}" if args.prompt_text else "seeded random token ids",
                  "batch": args.batch, "timed_steps": args.steps, "warmup_steps": args.warmup, "offload": args.offload,
                  "weights": "the checkpoint's", "prefill": "through the engine (batched, interleaved)",
                  "source_commit": args.commit}
    runs = []
    directory = {"directory": args.out_dir} if args.out_dir else {}
    for setting in settings:
        run = run_one(args, setting == "on")
        runs.append(run)
        print(f"{run['attn_mode']:9s} offload={setting:3s} batch {run['batch']:3d}  TTFT p50 {1e3 * run['ttft_s']['p50']:.1f} ms "
              f"(max {1e3 * run['ttft_s']['max']:.1f})  prefill {run['prefill_tokens_per_s']:.0f} tok/s  "
              f"decode {run['decode_tokens_per_s']:.1f} tok/s", flush=True)
        write_result(name, parameters, {"complete": False, "runs": runs}, **directory)
    path = write_result(name, parameters, {"complete": True, "runs": runs}, **directory)
    print(f"wrote {path}")
    return 0
