"""`nosa study ...`: studies on models trained for the purpose (nosa.study.quality)."""

from __future__ import annotations

import os


QUALITY_DESCRIPTION = (
    "Train dense, InfLLM-v2, DMA and NOSA with the same model, data, token budget, schedule and seed (as "
    "concurrent processes or back to back), evaluate each (held-out perplexity by position, synthetic task "
    "accuracy by length, locality of decoding through the engine), and write summary.json, loss.png, "
    "accuracy.png, locality.png, traces_<mode>.npz and logs.tar.gz to --out-dir. Time-boxed by the preset's "
    "budget_s. See nosa/study/quality.py and docs/quality.md.")


def register(subparsers) -> None:
    p = subparsers.add_parser("study", help="studies on trained models (quality and locality of the attention modes)")
    sub = p.add_subparsers(dest="study_command", metavar="STUDY", required=True)
    q = sub.add_parser("quality", help="train dense, InfLLM-v2, DMA and NOSA alike; evaluate quality and locality",
                       description=QUALITY_DESCRIPTION)
    q.add_argument("--config", default=None, help="a preset (h200, tiny) or a YAML file merged over its `preset` (default h200)")
    q.add_argument("--preset", dest="config_preset", help="same as --config with a preset name")
    q.add_argument("--out-dir", default="results/quality", help="where summary.json, plots, traces and logs.tar.gz go")
    q.add_argument("--work-dir", help="checkpoints and per-mode files (default: <out-dir>/../study_work; deleted first unless --resume)")
    q.add_argument("--modes", help="comma list of attn_modes (default: the preset's four)")
    q.add_argument("--stop-after-phase", type=int, metavar="K",
                   help="train phases 0..K, write logs.tar.gz and stop, keeping --work-dir for a call with --resume")
    q.add_argument("--seed", type=int, default=None,
                   help="replace the config's data seed (model initialisation and rows, the same for every mode): "
                        "another run of the same recipe")
    q.add_argument("--resume", action="store_true",
                   help="continue the study in --work-dir (same config): train only its unfinished phases, then evaluate")
    q.set_defaults(func=_run)
    r = sub.add_parser("report", help="markdown tables from a study's summary.json (optionally into the README)",
                       description="Training, accuracy and locality tables from a quality study's summary.json.")
    r.add_argument("--summary", default=os.path.join("results", "quality", "summary.json"))
    r.add_argument("--readme", default=None, help="rewrite the README's quality-report section in place")
    r.set_defaults(func=_report)


def _run(args) -> int:
    config = args.config or args.config_preset
    modes = [m.strip() for m in args.modes.split(",")] if args.modes else None
    if modes:
        from nosa.config import ATTN_MODES

        bad = sorted(set(modes) - set(ATTN_MODES))
        if bad:
            raise ValueError(f"--modes names unknown attn_modes {bad}; known: {list(ATTN_MODES)}")
    from nosa.study.quality import run_study

    run_study(config, args.out_dir, args.work_dir, modes, stop_after_phase=args.stop_after_phase, resume=args.resume,
              seed=args.seed)
    return 0


def _report(args) -> int:
    from nosa.study.report import run

    return run(args)


def main(argv=None) -> int:
    """`python -m nosa.study.cli quality ...` runs `nosa study quality ...` without the other subcommands."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="nosa")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["study", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
