"""Compare the per-step losses of two training runs (e.g. 2 processes x batch b against 1 process x
batch 2b) and write the numbers as JSON: `python -m nosa.train.compare A/metrics.jsonl B/metrics.jsonl --out x.json`."""

from __future__ import annotations

import argparse
import json
import sys


def step_losses(path: str) -> dict[int, dict]:
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r for r in records if "loss" in r and "event" not in r}


def compare(path_a: str, path_b: str) -> dict:
    a, b = step_losses(path_a), step_losses(path_b)
    if sorted(a) != sorted(b) or not a:
        raise ValueError(f"the runs logged different steps: {sorted(a)} vs {sorted(b)}")
    rows = []
    for step in sorted(a):
        la, lb = a[step]["loss"], b[step]["loss"]
        rows.append({"step": step, "loss_a": la, "loss_b": lb, "abs_diff": abs(la - lb), "rel_diff": abs(la - lb) / abs(la),
                     "grad_norm_a": a[step].get("grad_norm"), "grad_norm_b": b[step].get("grad_norm"),
                     "label_tokens_a": a[step]["label_tokens"], "label_tokens_b": b[step]["label_tokens"]})
    return {"a": path_a, "b": path_b, "steps": rows, "max_rel_diff": max(r["rel_diff"] for r in rows),
            "same_tokens": all(r["label_tokens_a"] == r["label_tokens_b"] for r in rows)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--out", required=True)
    parser.add_argument("--note", default="", help="free text stored with the numbers (what a and b are)")
    args = parser.parse_args(argv)
    from nosa.results.header import machine_header

    result = {"machine": machine_header(), "note": args.note, **compare(args.a, args.b)}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({"max_rel_diff": result["max_rel_diff"], "same_tokens": result["same_tokens"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
