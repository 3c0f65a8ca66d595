"""`nosa eval`: held-out perplexity by position, synthetic-task accuracy by length and depth, decode
locality per layer; one JSON file (with the machine header) and one plot."""

from __future__ import annotations

import json
import os
import time


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a NOSA checkpoint: perplexity, synthetic tasks, locality",
                              description=__doc__)
    p.add_argument("--model", required=True, help="a NOSA model directory (e.g. runs/x/checkpoints/step_001000)")
    p.add_argument("--corpus-dir", help="corpus built by `nosa train` (its val split is the held-out text)")
    p.add_argument("--ppl-len", type=int, default=1024, help="tokens per held-out row")
    p.add_argument("--ppl-rows", type=int, default=16)
    p.add_argument("--ppl-buckets", type=int, default=8)
    p.add_argument("--tasks", default="passkey,multikey_niah,mqar,variable_tracking", help="comma list; '' skips")
    p.add_argument("--lengths", default="1024", help="comma list of context lengths")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    p.add_argument("--samples", type=int, default=4, help="samples per (task, length, depth)")
    p.add_argument("--task-params", default="{}", help="JSON: task -> generator keyword arguments")
    p.add_argument("--locality-prompt", type=int, default=1024, help="prompt tokens before decoding (0 skips)")
    p.add_argument("--locality-steps", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", default="runs/eval/results.json")
    p.add_argument("--plot", help="PNG path (default: beside --out)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from nosa.bench.common import machine_header
    from nosa.models import NosaForCausalLM
    from nosa.train.corpus import TokenCorpus
    from nosa.train.packing import CorpusRows
    from nosa.train.tokenization import load_tokenizer

    from nosa.eval.locality import decode_locality
    from nosa.eval.perplexity import perplexity_by_position
    from nosa.eval.plots import plot_eval
    from nosa.eval.tasks import evaluate_tasks

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")

    def autocast():
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    try:
        task_params = json.loads(args.task_params)
    except json.JSONDecodeError as err:
        raise ValueError(f"--task-params must be JSON: {err}") from None
    model = NosaForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device).eval()
    tok = load_tokenizer(args.model)
    results = {"machine": machine_header(), "parameters": {k: v for k, v in vars(args).items() if k != "func"},
               "model_config": {k: v for k, v in model.config.to_dict().items() if not k.startswith("_")}}
    timings = {}

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        results["timings_s"] = timings
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)

    val_rows = None
    if args.corpus_dir:
        corpus = TokenCorpus(os.path.join(args.corpus_dir, "val"))
        corpus.check_tokenizer(tok)
        t0 = time.time()
        val_rows = CorpusRows(corpus, args.ppl_len, isolate_documents=False, pad_id=tok.pad_id)
        results["perplexity"] = perplexity_by_position(model, val_rows, args.ppl_rows, args.batch_size, args.ppl_buckets, device, autocast())
        timings["perplexity"] = time.time() - t0
        save()
    tasks = [t for t in args.tasks.split(",") if t.strip()]
    if tasks:
        t0 = time.time()
        results["tasks"] = evaluate_tasks(model, tok, tasks, _ints(args.lengths), _floats(args.depths), args.samples, device,
                                          autocast(), args.batch_size, args.seed, task_params)
        timings["tasks"] = time.time() - t0
        save()
    if args.locality_prompt and model.config.sparse.is_sparse:
        total = args.locality_prompt + args.locality_steps
        if val_rows is not None:
            rows = CorpusRows(val_rows.corpus, total, isolate_documents=False, pad_id=tok.pad_id)
            token_ids = torch.from_numpy(rows.row(0)[0])[None]
            text_source = "held-out corpus"
        else:
            from nosa.train.tasks import generate_task
            import numpy as np

            token_ids = torch.tensor([generate_task("passkey", tok, np.random.default_rng(args.seed), total, 0.5).input_ids])
            text_source = "passkey sample"
        t0 = time.time()
        results["locality"] = decode_locality(model, token_ids, args.locality_prompt, device, autocast())
        results["locality"]["text"] = text_source
        timings["locality"] = time.time() - t0
    save()
    plot = args.plot or os.path.splitext(args.out)[0] + ".png"
    try:
        plot_eval(results, plot)
        results["plot"] = plot
    except ImportError as err:
        results["plot_error"] = str(err)
    save()
    summary = {"out": args.out}
    if "perplexity" in results:
        summary["ppl"] = results["perplexity"]["ppl"]
    for task, table in results.get("tasks", {}).items():
        summary[f"acc_{task}"] = table["accuracy"]
    if "locality" in results:
        summary["overlap_mean"] = results["locality"]["overlap_mean"]
        summary["locality_violations"] = results["locality"].get("violations")
    print(json.dumps(summary))
    return 0


def main(argv=None) -> int:
    """`python -m nosa.eval.cli ...` runs `nosa eval ...` without loading the other subcommands."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="nosa")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
