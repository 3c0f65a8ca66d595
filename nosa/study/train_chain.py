"""Train several phases one after another in ONE process: `python -m nosa.study.train_chain A.yaml B.yaml ...`.

The study's shared phases are short (20-60 s of training each on an H200), and a fresh `nosa train`
process spends ~14 s on each before its first step (interpreter, torch and transformers imports, CUDA
context, corpus, model build): a fifth of the shared phases' wall time in run 3. Chained here, that cost
is paid once. Each phase is exactly what `nosa train --config FILE` runs (nosa.train.loop.train, its own
out_dir, metrics and checkpoints); a phase whose file leaves `init_path` empty with `init_from: nosa`
starts from the previous phase's final checkpoint, which is known only once that phase has ended.

Prints one JSON line per phase ({"config", "summary"}). A phase that raises, or that a signal stopped,
ends the chain with a non-zero exit status: the phases after it are not started (they would start from
weights the chain did not finish)."""

from __future__ import annotations

import argparse
import json
import sys


def run_chain(paths: list[str], device: str | None = None) -> int:
    from nosa.train.config import make_config, read_config_file
    from nosa.train.loop import train

    previous = None
    for k, path in enumerate(paths):
        values = read_config_file(path)
        init_path = None
        if values.get("init_from") == "nosa" and not values.get("init_path"):
            if previous is None:
                raise ValueError(f"{path}: init_from nosa with no init_path, and no earlier phase in the chain to start from")
            init_path = previous
        cfg = make_config(path, init_path=init_path)
        summary = train(cfg, device=device)
        print(json.dumps({"config": path, "summary": summary}), flush=True)
        if summary.get("stopped_by_signal"):
            print(f"train_chain: {path} was stopped by {summary['stopped_by_signal']}; "
                  f"{len(paths) - k - 1} later phase(s) not started", file=sys.stderr)
            return 1
        previous = summary["final_checkpoint"]
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nosa.study.train_chain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", help="training config files, trained in this order")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    args = p.parse_args(argv)
    return run_chain(args.configs, args.device)


if __name__ == "__main__":
    sys.exit(main())
