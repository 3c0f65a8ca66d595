"""Evaluation of one trained model of the quality study, under a wall-clock deadline.

Parts, in the order that matters most when time runs short (each part's result is written to the JSON
file as soon as it is done, so a run cut by the deadline still returns what it measured):
  1. held-out loss and perplexity by position bucket (nosa.eval.perplexity) at the training length
  2. task accuracy at the primary length (16K: the issue's bar), then locality at the first locality length;
     for sparse modes the same forward also records whether each answer token's source block was selected
     (nosa.eval.source_selection)
  3. task accuracy at the other lengths, locality at the other locality lengths
Locality: greedy decoding of `locality_steps` tokens THROUGH THE ENGINE (nosa.engine.LLM with
record_selections=True) after a prompt of held-out text and one of a task input (a multikey_niah sample
cut before its question), both of exactly the locality length; statistics with nosa.results.locality.
The raw selections of those decodes are saved as a trace file (nosa.results.traces).

    python -m nosa.study.evaluate --model DIR --corpus-dir DIR --spec JSON --out FILE [--traces FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
import traceback

import numpy as np
import torch


def _selections_through_engine(model, prompts: list[list[int]], steps: int, device) -> tuple[list, str]:
    """Per prompt an int16 [L, steps, H, K] tensor of the engine's selections while greedily decoding."""
    from nosa.engine import LLM
    from nosa.engine.sampling import SamplingParams

    longest = max(len(p) for p in prompts) + steps + 1
    # A copy: LLM casts the model it is given in place, and the task evaluation keeps the fp32 weights
    # (bf16 autocast) so every part of every mode computes alike.
    engine_model = copy.deepcopy(model)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    llm = LLM(engine_model, device=device, offload=False, max_model_len=longest, max_num_seqs=len(prompts),
              dtype=dtype, cuda_graphs=False)
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False, record_selections=True)
    traces = []
    for prompt, out in zip(prompts, outputs):
        sel = out.selections
        if sel is None:
            raise RuntimeError("the engine returned no selections for a sparse model")
        if out.selection_first_position != len(prompt):
            raise RuntimeError(f"selection_first_position {out.selection_first_position} != prompt length {len(prompt)}")
        traces.append(sel.to(torch.int16).cpu())
    return traces, "engine"


@torch.no_grad()
def _selections_through_model(model, prompts: list[list[int]], steps: int, device, autocast) -> tuple[list, str]:
    """Fallback where the engine cannot record selections: the model's own cached decode (greedy)."""
    from nosa.eval.locality import _cache_of, recording

    traces = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=device)
        with autocast():
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache = _cache_of(out)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        with recording(model) as layers:
            for _ in range(steps):
                with autocast():
                    out = model(input_ids=token, cache=cache, use_cache=True)
                cache = _cache_of(out)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
            # each layer's log: per step [B=1, 1, H, K] -> [L, S, H, K]
            trace = torch.stack([torch.cat(layer.selection_log, dim=1)[0] for layer in layers])
        traces.append(trace.to(torch.int16).cpu())
    return traces, "model forward (the engine has no record_selections on this checkout)"


def collect_selections(model, prompts, steps, device, autocast) -> tuple[list, str]:
    try:
        return _selections_through_engine(model, prompts, steps, device)
    except TypeError as err:
        if "record_selections" not in str(err):
            raise
    return _selections_through_model(model, prompts, steps, device, autocast)


def locality_prompts(tok, corpus, length: int, seed: int) -> tuple[list[list[int]], list[str]]:
    """A held-out text prompt and a task-input prompt, each exactly `length` tokens."""
    from nosa.data.packing import CorpusRows
    from nosa.data.tasks import generate_task

    prompts, labels = [], []
    if corpus is not None and corpus.num_tokens >= length:
        prompts.append(CorpusRows(corpus, length, isolate_documents=False, pad_id=tok.pad_id).row(0)[0].tolist())
        labels.append(f"held-out text, {length} tokens")
    # A sample 512 tokens longer, cut at `length`: the instruction, haystack and needles without the
    # question and answer (whose tail is shorter than 512 tokens); the model then decodes freely from there.
    sample = generate_task("multikey_niah", tok, np.random.default_rng([seed, 11, length]), length + 512, 0.5)
    if sample.context_end() < length:
        raise RuntimeError(f"multikey_niah question starts before {length} tokens; cannot cut a task-input prompt")
    prompts.append(sample.input_ids[:length])
    labels.append(f"multikey_niah input, {length} tokens")
    return prompts, labels


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nosa.study.evaluate")
    p.add_argument("--model", required=True)
    p.add_argument("--corpus-dir")
    p.add_argument("--spec", required=True, help="JSON: the study's eval section")
    p.add_argument("--out", required=True)
    p.add_argument("--traces", help="npz path for the selection traces (sparse modes)")
    p.add_argument("--deadline", type=float, default=0.0, help="unix time after which no new part starts")
    p.add_argument("--device")
    args = p.parse_args(argv)
    spec = json.loads(args.spec)

    from nosa.data.corpus import TokenCorpus
    from nosa.data.packing import CorpusRows
    from nosa.data.tokenization import load_tokenizer
    from nosa.eval.perplexity import perplexity_by_position
    from nosa.eval.tasks import evaluate_tasks
    from nosa.models import NosaForCausalLM
    from nosa.results.locality import bound_quota, locality_summary
    from nosa.results.traces import save_traces

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16 = device.type == "cuda"

    def autocast():
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)

    began = time.time()
    result = {"model": args.model, "device": str(device), "parts_done": [], "parts_skipped": {}, "errors": {},
              "timings_s": {}}

    def save():
        result["wall_s"] = time.time() - began
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.out)

    def left() -> float:
        return args.deadline - time.time() if args.deadline else float("inf")

    model = NosaForCausalLM.from_pretrained(args.model, dtype=torch.float32, local_files_only=True).to(device).eval()
    tok = load_tokenizer(args.model)
    sparse = model.config.sparse
    result["attn_mode"] = sparse.attn_mode
    result["parameters"] = sum(p.numel() for p in model.parameters())
    corpus = TokenCorpus(os.path.join(args.corpus_dir, "val")) if args.corpus_dir else None
    save()

    def part(name, fn, min_left=0.0):
        if left() < min_left:
            result["parts_skipped"][name] = f"deadline: {left():.0f} s left, part needs ~{min_left:.0f} s"
            save()
            return
        t0 = time.time()
        try:
            fn()
            result["parts_done"].append(name)
        except Exception as err:  # one failing part must not lose the others' results
            result["errors"][name] = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=6)}"
        result["timings_s"][name] = time.time() - t0
        save()

    def perplexity():
        length = min(spec["ppl_len"], corpus.num_tokens)
        rows = CorpusRows(corpus, length, isolate_documents=False, pad_id=tok.pad_id)
        result["perplexity"] = perplexity_by_position(model, rows, spec["ppl_rows"], spec["batch_size"],
                                                      spec["ppl_buckets"], device, autocast())

    result["tasks"] = {}

    def tasks_at(length):
        def run():
            bs = max(1, spec["batch_size"] * spec["ppl_len"] // max(length, spec["ppl_len"]))
            res = evaluate_tasks(model, tok, spec["tasks"], [length], spec["depths"], spec["samples"], device,
                                 autocast(), bs, spec.get("seed", 1234), spec.get("task_params", {}),
                                 check_sources=sparse.is_sparse)
            for task, table in res.items():
                cell = {"accuracy": table["accuracy"], "correct": sum(g["correct"] for g in table["grid"]),
                        "answers": sum(g["answers"] for g in table["grid"]), "by_depth": table["by_depth"]}
                if sparse.is_sparse:
                    # Whether the selection held the blocks the answers copy from (why a sparse mode misses).
                    cell["source_selection"] = table["by_length"][str(length)]["source_selection"]
                result["tasks"].setdefault(task, {})[str(length)] = cell
        return run

    result["locality"] = {}
    all_traces, trace_positions, trace_labels = [], [], []

    def locality_at(length):
        def run():
            prompts, labels = locality_prompts(tok, corpus, length, spec.get("seed", 1234))
            traces, source = collect_selections(model, prompts, spec["locality_steps"], device, autocast)
            result["locality_source"] = source
            per_prompt = {}
            for trace, label in zip(traces, labels):
                # locality_summary takes one [B, S, H, K] per layer
                per_prompt[label] = locality_summary([t[None] for t in trace], length, sparse.block_size,
                                                     sparse.topk_blocks, bound_quota(sparse))
            combined = locality_summary([torch.stack([t[l] for t in traces]) for l in range(traces[0].shape[0])],
                                        length, sparse.block_size, sparse.topk_blocks, bound_quota(sparse))
            for summary in [combined, *per_prompt.values()]:
                for rec in summary["per_layer"]:
                    rec.pop("overlap_mean_per_head", None)
            result["locality"][str(length)] = {"all_prompts": combined, "by_prompt": per_prompt,
                                               "decode_steps": spec["locality_steps"], "source": source}
            all_traces.extend(traces)
            trace_positions.extend([length] * len(traces))
            trace_labels.extend(labels)
            if args.traces:
                geometry = {k: getattr(sparse, k) for k in ("block_size", "topk_blocks", "sink_blocks", "window_blocks",
                                                             "query_blocks", "compress_kernel", "compress_stride")}
                geometry.update(num_layers=model.config.num_hidden_layers, num_kv_heads=model.config.num_key_value_heads,
                                num_attention_heads=model.config.num_attention_heads, head_dim=model.config.head_dim)
                save_traces(args.traces, all_traces, trace_positions,
                            {"attn_mode": sparse.attn_mode, "geometry": geometry, "source": source,
                             "decoding": "greedy"}, trace_labels)
        return run

    lengths = list(spec["lengths"])
    primary = spec.get("primary_length", lengths[0])
    loc_lengths = list(spec.get("locality_lengths", []))
    est = spec.get("part_estimate_s", {})
    if corpus is not None:
        part("perplexity", perplexity)
    else:
        result["parts_skipped"]["perplexity"] = "no corpus"
    order = [("tasks", primary)]
    if sparse.is_sparse and loc_lengths:
        order.append(("locality", loc_lengths[0]))
    order += [("tasks", n) for n in lengths if n != primary]
    if sparse.is_sparse:
        order += [("locality", n) for n in loc_lengths[1:]]
    else:
        result["parts_skipped"]["locality"] = "dense attention selects no blocks"
    for kind, n in order:
        fn = tasks_at(n) if kind == "tasks" else locality_at(n)
        part(f"{kind}_{n}", fn, float(est.get(f"{kind}_{n}", 0.0)))
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
