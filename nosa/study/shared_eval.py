"""Retrieval of the shared phases' weights, measured right after the shared phases of the quality study.

The study trains one dense model through its shared phases (nosa/study/presets.py) before the modes part;
this scores each shared phase's final weights on the evaluation's own tasks (passkey and multikey_niah as
defined in nosa/data/tasks.py, one query, answer-only scoring) at the phase's own length and at the
lengths `shared_eval.lengths` names, so a run shows where retrieval forms, transfers or is lost.
Per (phase, task, length): accuracy (every answer token the argmax) and the teacher-forced answer NLL
(nats per answer token; ln 10 = 2.30 is guessing a digit).

    python -m nosa.study.shared_eval --checkpoints JSON --spec JSON --out FILE [--deadline UNIX_TIME]

--checkpoints: [{"phase": k, "seq_len": n, "path": dir}, ...]. Results are written after every cell, so
a run cut by its deadline keeps what it measured; cells not reached are listed as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback

import numpy as np
import torch

DEFAULTS = {"tasks": ["passkey", "multikey_niah"], "lengths": [], "depths": [0.0, 0.5, 1.0], "samples": 8,
            "batch_size": 8, "seed": 1234}


@torch.no_grad()
def score(model, samples, device, autocast) -> tuple[int, int, float, int]:
    """(answers correct, answers, NLL sum over answer tokens, answer tokens) of equal-length samples."""
    ids = torch.tensor([s.input_ids for s in samples], dtype=torch.long, device=device)
    first = min(s.answer_spans[0][0] for s in samples)
    keep = ids.shape[1] - first + 1  # logits from the token before the first answer onwards
    with autocast:
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    offset = ids.shape[1] - keep + 1  # logits[:, j] predicts token offset + j
    correct = answers = tokens = 0
    nll = 0.0
    for row, sample in enumerate(samples):
        for start, end in sample.answer_spans:
            target = ids[row, start:end]
            guess = logp[row, start - offset:end - offset]
            correct += bool((guess.argmax(-1) == target).all())
            answers += 1
            nll -= float(guess.gather(-1, target[:, None]).sum())
            tokens += end - start
    return correct, answers, nll, tokens


def lengths_of(spec: dict, seq_len: int) -> list[int]:
    return sorted({int(seq_len), *(int(n) for n in spec.get("lengths", []))})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nosa.study.shared_eval")
    p.add_argument("--checkpoints", required=True)
    p.add_argument("--spec", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--deadline", type=float, default=0.0)
    p.add_argument("--device")
    args = p.parse_args(argv)
    spec = {**DEFAULTS, **{k: v for k, v in json.loads(args.spec).items() if k != "time_limit_s"}}
    checkpoints = json.loads(args.checkpoints)

    from nosa.data.tasks import generate_task
    from nosa.data.tokenization import load_tokenizer
    from nosa.models import NosaForCausalLM

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    began = time.time()
    result = {"device": str(device), "spec": spec, "phases": [], "skipped": [], "errors": {}}

    def save():
        result["wall_s"] = round(time.time() - began, 1)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.out)

    for ck in checkpoints:
        entry = {"phase": ck["phase"], "seq_len": ck["seq_len"], "checkpoint": ck["path"], "tasks": {}}
        result["phases"].append(entry)
        try:
            model = NosaForCausalLM.from_pretrained(ck["path"], dtype=torch.float32, local_files_only=True).to(device).eval()
            tok = load_tokenizer(ck["path"])
        except Exception as err:
            result["errors"][f"phase{ck['phase']}"] = f"{type(err).__name__}: {err}"
            save()
            continue
        for t_index, task in enumerate(spec["tasks"]):
            for length in lengths_of(spec, ck["seq_len"]):
                cell = f"phase{ck['phase']}/{task}/{length}"
                if args.deadline and time.time() > args.deadline:
                    result["skipped"].append(f"{cell}: deadline")
                    continue
                try:
                    samples = [generate_task(task, tok, np.random.default_rng([spec["seed"], 7, t_index, length, d, i]), length, depth)
                               for d, depth in enumerate(spec["depths"]) for i in range(spec["samples"])]
                except ValueError as err:  # the task does not fit this length
                    result["skipped"].append(f"{cell}: {err}")
                    continue
                try:
                    totals = [0, 0, 0.0, 0]
                    bs = max(1, spec["batch_size"] * 2048 // max(length, 2048))  # rows of batch_size x 2K tokens at most
                    for start in range(0, len(samples), bs):
                        for j, v in enumerate(score(model, samples[start:start + bs], device, autocast)):
                            totals[j] += v
                    entry["tasks"].setdefault(task, {})[str(length)] = {
                        "accuracy": totals[0] / totals[1], "correct": totals[0], "answers": totals[1],
                        "answer_nll": totals[2] / totals[3]}
                except Exception as err:
                    result["errors"][cell] = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=4)}"
                save()
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
