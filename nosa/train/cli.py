"""`nosa train`: configuration from a YAML/JSON file, `--set key=value` and the flags below (in that
order of precedence, flags last). Multi-GPU: `torchrun --nproc_per_node=N -m nosa.cli train ...`.
`nosa train --build-corpus` only tokenizes the corpus (no training)."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a NOSA model (scratch, NOSA checkpoint or dense Llama)",
                              description=__doc__)
    p.add_argument("--config", help="YAML or JSON file of training options (a path, or a packaged config name: tiny_cpu, gpu_small, llama_continue)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one option, e.g. --set lr=1e-3 --set model.hidden_size=128 (repeatable)")
    p.add_argument("--out-dir")
    p.add_argument("--init-from", choices=("scratch", "nosa", "llama"))
    p.add_argument("--init-path", help="checkpoint directory for --init-from nosa|llama")
    p.add_argument("--tokenizer", help="'byte' or a local tokenizer directory")
    p.add_argument("--corpus-dir")
    p.add_argument("--corpus-source", help="'stdlib', a folder of text files or a .jsonl file")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--micro-batch-size", type=int)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"))
    p.add_argument("--parallel", choices=("ddp", "fsdp"))
    p.add_argument("--activation-checkpointing", action="store_true", default=None)
    p.add_argument("--isolate-documents", action="store_true", default=None)
    p.add_argument("--save-every", type=int)
    p.add_argument("--time-limit-s", type=float)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument("--resume", nargs="?", const="latest", help="continue from a checkpoint dir (default: the latest in out-dir)")
    p.add_argument("--overwrite", action="store_true",
                   help="a new run (no --resume) in an out-dir that holds checkpoints deletes them first (refused otherwise)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--build-corpus", action="store_true", help="only tokenize the corpus into --corpus-dir and exit")
    p.set_defaults(func=run)


def run(args) -> int:
    from nosa.train.config import make_config

    flags = {name: getattr(args, name) for name in (
        "out_dir", "init_from", "init_path", "tokenizer", "corpus_dir", "corpus_source", "seq_len", "max_steps",
        "micro_batch_size", "grad_accum", "lr", "warmup_steps", "seed", "precision", "parallel",
        "activation_checkpointing", "isolate_documents", "save_every", "time_limit_s", "progress")}
    cfg = make_config(args.config, args.overrides, **flags)
    if args.build_corpus:
        from nosa.data.corpus import build_corpus
        from nosa.train.loop import resolve_tokenizer

        metas = build_corpus(cfg.corpus_dir, cfg.corpus_source, resolve_tokenizer(cfg), max_tokens=cfg.corpus_max_tokens, seed=cfg.seed)
        print(json.dumps({s: {k: m[k] for k in ("num_documents", "num_tokens", "stopped_early")} for s, m in metas.items()}))
        return 0
    from nosa.train.loop import train

    import os

    if args.device:
        from nosa.command import resolve_device

        resolve_device(args.device)  # refused here with what to do, not as an AssertionError inside torch
    summary = train(cfg, resume=args.resume, device=args.device, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary))
    if summary.get("stopped_by_signal"):
        import signal
        import sys

        name = summary["stopped_by_signal"]
        print(f"nosa train: stopped by {name} after step {summary['step']}; saved {summary['final_checkpoint']}; "
              f"continue with the same command and --resume", file=sys.stderr)
        number = getattr(signal, name, None) if isinstance(name, str) and name.startswith("SIG") else None
        return 128 + int(number) if number is not None else 1
    return 0


def main(argv=None) -> int:
    """`python -m nosa.train.cli ...` runs `nosa train ...` without loading the other subcommands."""
    from nosa.command import main_for

    return main_for(register, "train", argv)


if __name__ == "__main__":
    raise SystemExit(main())
