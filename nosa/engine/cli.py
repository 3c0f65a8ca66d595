"""`nosa generate`: generate text (or token ids) from a model saved with save_pretrained."""

from __future__ import annotations

import json
import sys

from nosa.command import DEVICE_CACHE_HELP, MICRO_BATCHES_HELP, device_cache_blocks_arg


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate with the NOSI offloading engine")
    p.add_argument("model", help="directory saved with save_pretrained (a nosa tokenizer beside it for text)")
    p.add_argument("prompts", nargs="*", help="prompts (text); none: read one prompt per line from stdin")
    p.add_argument("--token-ids", action="store_true", help="prompts are comma-separated token ids")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-offload", action="store_true", help="keep the whole KV cache on the device")
    p.add_argument("--gpu-memory-budget", type=int, default=None, help="bytes of device memory for KV state")
    p.add_argument("--host-memory-budget", type=int, default=None, help="bytes of host memory for the KV store")
    p.add_argument("--device-cache-blocks", type=device_cache_blocks_arg, default=None, help=DEVICE_CACHE_HELP)
    p.add_argument("--micro-batches", type=int, default=1, help=MICRO_BATCHES_HELP)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object per request and the engine stats")
    p.add_argument("--quiet", action="store_true", help="no progress bars (generation and weight loading)")
    p.set_defaults(func=main)


def main(args) -> int:
    from dataclasses import asdict

    from nosa.engine import LLM, SamplingParams

    from nosa.command import quiet_transformers, read_prompts, resolve_device

    try:
        prompts = read_prompts(args.prompts, sys.stdin, args.token_ids)
        device = resolve_device(args.device)
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                max_tokens=args.max_tokens, stop=args.stop, ignore_eos=args.ignore_eos)
        with quiet_transformers(args.quiet):  # --quiet: no weight-loading bar either
            llm = LLM(args.model, device=device, offload=not args.no_offload, gpu_memory_budget=args.gpu_memory_budget,
                      host_memory_budget=args.host_memory_budget, max_model_len=args.max_model_len,
                      max_num_seqs=args.max_num_seqs, cuda_graphs=not args.no_cuda_graphs,
                      device_cache_blocks=args.device_cache_blocks,
                      micro_batches=args.micro_batches)
        outputs = llm.generate(prompts, params, use_tqdm=not args.quiet)
    except ValueError as err:
        print(f"nosa generate: {err}", file=sys.stderr)
        return 2
    for out in outputs:
        if args.json:
            print(json.dumps({"request_id": out.request_id, "token_ids": out.token_ids, "text": out.text,
                              "finish_reason": out.finish_reason, "stats": out.stats}))
        else:
            print(out.text if out.text is not None else ",".join(map(str, out.token_ids)))
    stats = llm.stats()
    summary = asdict(stats) | {"decode_tokens_per_s": stats.decode_tokens_per_s}
    print(json.dumps(summary) if args.json else f"[{stats.decode_tokens} tokens decoded at {stats.decode_tokens_per_s:.1f} tok/s, "
          f"hit rate {['%.3f' % h for h in stats.hit_rate_per_layer]}]", file=sys.stdout if args.json else sys.stderr)
    return 0
