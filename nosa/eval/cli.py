"""`nosa eval`: held-out perplexity by position, synthetic-task accuracy by length and depth, decode
locality per layer; one JSON file (with the machine header) and one plot."""

from __future__ import annotations

import json
import os
import time


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be a comma list of integers, got {text!r}") from None


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be a comma list of numbers, got {text!r}") from None


def check_args(args) -> dict:
    """Every flag checked before anything is loaded or evaluated, so a bad value fails at once with its
    flag's name instead of deep inside a part, after the earlier parts ran. Returns the parsed values."""
    from nosa.data.tasks import TASKS

    for flag in ("batch_size", "ppl_rows", "ppl_buckets", "samples"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.ppl_len < 2:
        raise ValueError(f"--ppl-len must be >= 2 (one prediction needs two tokens), got {args.ppl_len}")
    if args.ppl_buckets > args.ppl_len - 1:
        raise ValueError(f"--ppl-buckets ({args.ppl_buckets}) must be <= --ppl-len - 1 ({args.ppl_len - 1})")
    if args.locality_prompt < 0:
        raise ValueError(f"--locality-prompt must be >= 0 (0 skips locality), got {args.locality_prompt}")
    if args.locality_prompt and args.locality_steps < 2:
        raise ValueError(f"--locality-steps must be >= 2 (overlap compares consecutive steps), got {args.locality_steps}")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"--tasks names unknown tasks {unknown}; known: {sorted(TASKS)}")
    lengths = _ints(args.lengths, "--lengths")
    depths = _floats(args.depths, "--depths")
    if tasks:
        if not lengths or min(lengths) < 2:
            raise ValueError(f"--lengths must hold context lengths >= 2 when --tasks is not empty, got {args.lengths!r}")
        if not depths or not all(0.0 <= d <= 1.0 for d in depths):
            raise ValueError(f"--depths must hold numbers in [0, 1] when --tasks is not empty, got {args.depths!r}")
    try:
        task_params = json.loads(args.task_params)
    except json.JSONDecodeError as err:
        raise ValueError(f"--task-params must be JSON: {err}") from None
    if not isinstance(task_params, dict) or not all(isinstance(v, dict) for v in task_params.values()):
        raise ValueError(f"--task-params must be a JSON object of task -> object of generator arguments, e.g. "
                         f"'{{\"mqar\": {{\"num_pairs\": 16}}}}'; got {args.task_params!r}")
    unknown = sorted(set(task_params) - set(TASKS))
    if unknown:
        raise ValueError(f"--task-params names unknown tasks {unknown}; known: {sorted(TASKS)}")
    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"--model {args.model!r} is not a directory: give a local NOSA model directory "
                                "(e.g. runs/x/checkpoints/step_001000); nothing is downloaded")
    if not os.path.exists(os.path.join(args.model, "config.json")):
        raise FileNotFoundError(f"--model {args.model!r} holds no config.json: it is not a saved model directory")
    # Lengths against the model's position limit, read from its config.json before anything is loaded.
    from nosa.models.loading import check_model_directory

    check_model_directory(args.model)
    with open(os.path.join(args.model, "config.json")) as f:
        max_positions = json.load(f).get("max_position_embeddings")
    if isinstance(max_positions, int):
        limits = [("--ppl-len", args.ppl_len, bool(args.corpus_dir)),
                  ("--locality-prompt + --locality-steps", args.locality_prompt + args.locality_steps, bool(args.locality_prompt))]
        if tasks:
            limits.append(("--lengths", max(lengths), True))
        for flag, tokens, used in limits:
            if used and tokens > max_positions:
                raise ValueError(f"{flag} {tokens} exceeds the model's max_position_embeddings={max_positions} "
                                 f"({os.path.join(args.model, 'config.json')}); use at most {max_positions} tokens")
    if args.corpus_dir and not os.path.isdir(os.path.join(args.corpus_dir, "val")):
        raise FileNotFoundError(f"--corpus-dir {args.corpus_dir!r} has no val split (build it with `nosa train --build-corpus`)")
    return {"tasks": tasks, "lengths": lengths, "depths": depths, "task_params": task_params}


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

    from nosa.results.header import machine_header
    from nosa.models import NosaForCausalLM
    from nosa.data.corpus import TokenCorpus
    from nosa.data.packing import CorpusRows
    from nosa.data.tokenization import load_tokenizer

    from nosa.eval.locality import decode_locality
    from nosa.eval.perplexity import perplexity_by_position
    from nosa.results.plots import plot_eval
    from nosa.eval.tasks import evaluate_tasks
    from nosa.data.tasks import generate_task
    import numpy as np

    from nosa.command import resolve_device

    device = resolve_device(args.device)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")

    def autocast():
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    parsed = check_args(args)
    tasks, lengths, depths, task_params = parsed["tasks"], parsed["lengths"], parsed["depths"], parsed["task_params"]
    # local_files_only: a path that is not a model directory must fail here, not become a Hub download.
    model = NosaForCausalLM.from_pretrained(args.model, dtype=torch.float32, local_files_only=True).to(device).eval()
    tok = load_tokenizer(args.model)
    results = {"machine": machine_header(), "parameters": {k: v for k, v in vars(args).items() if k != "func"},
               "model_config": {k: v for k, v in model.config.to_dict().items() if not k.startswith("_")},
               "skipped": {}}
    timings = {}

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        results["timings_s"] = timings
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)

    # Checks that need the model, the tokenizer or the corpus, still before any part runs.
    for task in tasks:
        for length in lengths:
            try:
                generate_task(task, tok, np.random.default_rng(0), length, 0.5, **task_params.get(task, {}))
            except (ValueError, TypeError) as err:
                raise ValueError(f"task {task!r} cannot be generated at --lengths {length} with --task-params "
                                 f"{task_params.get(task, {})}: {err}") from None
    corpus = None
    if args.corpus_dir:
        corpus = TokenCorpus(os.path.join(args.corpus_dir, "val"))
        corpus.check_tokenizer(tok)
        if corpus.num_tokens < args.ppl_len:
            raise ValueError(f"the val split of --corpus-dir {args.corpus_dir!r} holds {corpus.num_tokens} tokens, fewer "
                             f"than --ppl-len {args.ppl_len}; lower --ppl-len or use a larger corpus")
    else:
        results["skipped"]["perplexity"] = "no --corpus-dir (perplexity needs held-out text)"
    if not tasks:
        results["skipped"]["tasks"] = "--tasks is empty"
    locality_ids = None
    total = args.locality_prompt + args.locality_steps
    if not args.locality_prompt:
        results["skipped"]["locality"] = "--locality-prompt 0"
    elif not model.config.sparse.is_sparse:
        results["skipped"]["locality"] = f"attn_mode {model.config.sparse.attn_mode!r} selects no blocks; locality needs nosa, dma or infllmv2"
    elif corpus is not None:
        if corpus.num_tokens < total:
            raise ValueError(f"--locality-prompt + --locality-steps = {total} tokens, but the val split of --corpus-dir "
                             f"holds {corpus.num_tokens}; lower them or use a larger corpus")
        locality_ids = torch.from_numpy(CorpusRows(corpus, total, isolate_documents=False, pad_id=tok.pad_id).row(0)[0])[None]
        text_source = "held-out corpus"
    else:
        try:
            sample = generate_task("passkey", tok, np.random.default_rng(args.seed), total, 0.5)
        except ValueError as err:
            raise ValueError(f"--locality-prompt + --locality-steps = {total} tokens is too short for the passkey text "
                             f"used when no --corpus-dir is given ({err}); raise them or pass --corpus-dir") from None
        locality_ids = torch.tensor([sample.input_ids])
        text_source = "passkey sample"

    if corpus is not None:
        t0 = time.time()
        val_rows = CorpusRows(corpus, args.ppl_len, isolate_documents=False, pad_id=tok.pad_id)
        results["perplexity"] = perplexity_by_position(model, val_rows, args.ppl_rows, args.batch_size, args.ppl_buckets, device, autocast())
        timings["perplexity"] = time.time() - t0
        save()
    if tasks:
        t0 = time.time()
        # Sparse models: by_length also says whether the selection held each answer's source block.
        results["tasks"] = evaluate_tasks(model, tok, tasks, lengths, depths, args.samples, device,
                                          autocast(), args.batch_size, args.seed, task_params,
                                          check_sources=model.config.sparse.is_sparse)
        timings["tasks"] = time.time() - t0
        save()
    if locality_ids is not None:
        t0 = time.time()
        results["locality"] = decode_locality(model, locality_ids, args.locality_prompt, device, autocast())
        results["locality"]["text"] = text_source
        timings["locality"] = time.time() - t0
    save()
    plot = args.plot or os.path.splitext(args.out)[0] + ".png"
    try:
        plot_eval(results, plot)
        results["plot"] = plot
    except ImportError as err:
        results["plot_error"] = str(err)
    except ValueError as err:  # every part was skipped: nothing to draw, and the JSON says why
        results["plot_error"] = f"{err}; see 'skipped'"
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
    from nosa.command import main_for

    return main_for(register, "eval", argv)


if __name__ == "__main__":
    raise SystemExit(main())
