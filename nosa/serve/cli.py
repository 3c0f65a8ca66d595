"""`nosa serve MODEL_DIR`: the OpenAI-compatible server (needs the `serve` extra: fastapi, uvicorn)."""

from __future__ import annotations

import argparse
import os
import sys

from nosa.command import DEVICE_CACHE_HELP, MICRO_BATCHES_HELP, device_cache_blocks_arg


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    p.add_argument("model", help="directory saved with save_pretrained, with its tokenizer beside it")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the directory name)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--offload", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the KV store in host memory (default); --no-offload keeps it all on the device")
    p.add_argument("--gpu-memory-budget", type=int, default=None, help="bytes of device memory for KV state")
    p.add_argument("--host-memory-budget", type=int, default=None, help="bytes of host memory for the KV store")
    p.add_argument("--device-cache-blocks", type=device_cache_blocks_arg, default=None, help=DEVICE_CACHE_HELP)
    p.add_argument("--micro-batches", type=int, default=1, help=MICRO_BATCHES_HELP)
    p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + generation (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=16, help="sequences decoded together at most")
    p.add_argument("--max-queue", type=int, default=None, help="choices that may wait for a row (default: no bound)")
    p.add_argument("--queue-full", choices=("reject", "wait"), default="reject",
                   help="a request over --max-queue gets HTTP 429 (reject) or waits for room (wait)")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=main)


def build_server(args):
    """(EngineService, app, tokenizer) for parsed arguments; ValueError names what is wrong."""
    from nosa.engine import LLM
    from nosa.serve.app import create_app
    from nosa.serve.engine_service import EngineService
    from nosa.serve.text import load_tokenizer

    if not os.path.isdir(args.model):
        raise ValueError(f"model directory {args.model!r} does not exist")
    tokenizer = load_tokenizer(args.model)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer (nosa_tokenizer.json or a transformers tokenizer); the server needs one")
    llm = LLM(args.model, device=args.device, offload=args.offload, gpu_memory_budget=args.gpu_memory_budget,
              host_memory_budget=args.host_memory_budget, max_model_len=args.max_model_len,
              max_num_seqs=args.max_num_seqs, tokenizer=tokenizer, cuda_graphs=not args.no_cuda_graphs,
              device_cache_blocks=args.device_cache_blocks, micro_batches=args.micro_batches)
    service = EngineService(llm, max_queue=args.max_queue, queue_full=args.queue_full)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    return service, create_app(service, tokenizer, name), tokenizer


def main(args) -> int:
    try:
        import uvicorn
    except ImportError:
        print("nosa serve: needs the serve extra: pip install 'nosa[serve]'", file=sys.stderr)
        return 2
    if not 0 < args.port < 65536:
        print(f"nosa serve: --port must lie in [1, 65535], got {args.port}", file=sys.stderr)
        return 2
    try:
        _, app, _ = build_server(args)
    except ValueError as err:
        print(f"nosa serve: {err}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
