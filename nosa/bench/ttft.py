"""`nosa bench ttft`: time to first token under a mixed load, in the engine (no server in between).

The load: `--background` requests with short prompts are decoding; then one long prompt (`--long-prompt`
tokens) arrives and, right behind it in the queue, `--short` short prompts. Reported per prefill schedule
(`--schedules CHUNK:BUDGET`, i.e. `LLM(prefill_chunk=CHUNK, max_prefill_tokens=BUDGET)`): the short
requests' time to first token (from their arrival), the long one's, and the background requests' largest
gap between two tokens while it ran (how long decoding stalled). Prompts are seeded random token ids.
Each schedule runs once untimed (warm-up) and then `--reps` times. Results go to bench/results/<name>.json.
Only the step API is used, so the same file measures an engine from before batched prefill (schedule
`default`, the engine's own defaults).
"""

from __future__ import annotations

import time

import torch

from nosa.bench.common import write_result
from nosa.bench.serve import percentiles


def register(subparsers) -> None:
    p = subparsers.add_parser("ttft", help="time to first token of short requests behind a long prompt, beside decoding")
    p.add_argument("--model", default=None, help="a saved model directory (default: random weights of --shape)")
    p.add_argument("--shape", default="demo", help="nosa.bench.shapes shape for random weights")
    p.add_argument("--attn-mode", default="nosa")
    p.add_argument("--device", default=None)
    p.add_argument("--offload", choices=("on", "off"), default="on")
    p.add_argument("--background", type=int, default=4, help="requests decoding when the long prompt arrives")
    p.add_argument("--background-prompt", type=int, default=32)
    p.add_argument("--long-prompt", type=int, default=4096)
    p.add_argument("--short", type=int, default=4, help="short requests queued right behind the long prompt")
    p.add_argument("--short-prompt", type=int, default=64)
    p.add_argument("--short-output", type=int, default=8)
    p.add_argument("--schedules", default="default", help="comma-separated CHUNK:BUDGET (prefill_chunk:max_prefill_tokens) "
                                                          "or 'default' (the engine's defaults)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--commit", default=None, help="source commit to record (when the run has no git checkout)")
    p.add_argument("--name", default="ttft")
    p.add_argument("--out-dir", default=None, help="where the JSON goes (default bench/results)")
    p.set_defaults(func=main)


def parse_schedules(text: str) -> list[dict]:
    """'default' or 'CHUNK:BUDGET' entries -> the LLM keyword arguments of each ({} for default)."""
    schedules = []
    for item in text.split(","):
        if item == "default":
            schedules.append({})
            continue
        parts = item.split(":")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"bad --schedules entry {item!r}: expected CHUNK:BUDGET (positive integers) or 'default'")
        schedules.append({"prefill_chunk": int(parts[0]), "max_prefill_tokens": int(parts[1])})
    return schedules


def one_load(llm, args, generator: torch.Generator) -> dict:
    """Run the mixed load once; returns the short and long requests' TTFT (s) and the background's largest
    inter-token gap (s) between the long prompt's arrival and the last short request's first token."""
    from nosa.engine import SamplingParams

    vocab = min(256, llm.config.vocab_size)

    def prompt(n):
        return torch.randint(0, vocab, (n,), generator=generator).tolist()

    long_output = 2
    background_tokens = 4 * (args.long_prompt // 64 + args.short + 8)  # outlives the measured part
    background = [llm.add_request(prompt(args.background_prompt),
                                  SamplingParams(temperature=0, max_tokens=background_tokens, ignore_eos=True))
                  for _ in range(args.background)]
    # (an engine from before batched prefill has no num_prefilling: its prefills end within the step)
    while getattr(llm, "num_prefilling", 0) or llm.num_waiting:  # the background is decoding
        llm.step()
    arrived = time.perf_counter()
    long_id = llm.add_request(prompt(args.long_prompt), SamplingParams(temperature=0, max_tokens=long_output, ignore_eos=True))
    shorts = [llm.add_request(prompt(args.short_prompt), SamplingParams(temperature=0, max_tokens=args.short_output, ignore_eos=True))
              for _ in range(args.short)]
    first: dict[int, float] = {}
    last_token = {r: arrived for r in background}
    gaps = []
    while len(first) < len(shorts) + 1:
        outs = llm.step()
        now = time.perf_counter()
        for out in outs:
            if out.request_id in last_token:
                gaps.append(now - last_token[out.request_id])
                last_token[out.request_id] = now
            elif out.request_id not in first and out.token_ids:
                first[out.request_id] = now - arrived
    for request_id in background:
        llm.abort(request_id)
    while llm.has_unfinished():
        llm.step()
    for request_id in [long_id, *shorts]:
        llm.output(request_id)
    return {"ttft_short_s": [first[r] for r in shorts], "ttft_long_s": first[long_id], "max_gap_s": max(gaps, default=None),
            "gaps_s": gaps}


def build_llm(args, schedule: dict):
    from nosa.engine import LLM

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    max_len = max(args.long_prompt + 2, args.short_prompt + args.short_output,
                  args.background_prompt + 4 * (args.long_prompt // 64 + args.short + 8))
    common = dict(device=device, offload=args.offload == "on", max_model_len=max_len,
                  max_num_seqs=args.background + args.short + 1, dtype=dtype, **schedule)
    if args.model:
        return LLM(args.model, **common)
    from nosa.bench.shapes import build_model

    model = build_model(args.shape, args.attn_mode, seed=args.seed)
    model.config.max_position_embeddings = max(model.config.max_position_embeddings, max_len)
    return LLM(model, **common)


def main(args) -> int:
    try:
        schedules = parse_schedules(args.schedules)
    except ValueError as err:
        print(err)
        return 2
    parameters = {k: getattr(args, k) for k in ("model", "shape", "attn_mode", "offload", "background", "background_prompt",
                                                "long_prompt", "short", "short_prompt", "short_output", "reps", "seed")}
    parameters["source_commit"] = args.commit
    rows = []
    for schedule in schedules:
        llm = build_llm(args, schedule)
        generator = torch.Generator().manual_seed(args.seed)
        one_load(llm, args, generator)  # warm-up (kernel compiles, allocator)
        loads = [one_load(llm, args, generator) for _ in range(args.reps)]
        shorts = [t for load in loads for t in load["ttft_short_s"]]
        row = {"prefill_chunk": getattr(llm, "prefill_chunk", None), "max_prefill_tokens": getattr(llm, "max_prefill_tokens", None),
               "schedule": "default" if not schedule else f"{schedule['prefill_chunk']}:{schedule['max_prefill_tokens']}",
               "device": str(llm.device), "dtype": str(llm.model.dtype).replace("torch.", ""),
               "ttft_short_s": percentiles(shorts), "ttft_long_s": percentiles([load["ttft_long_s"] for load in loads]),
               "background_max_gap_s": percentiles([load["max_gap_s"] for load in loads if load["max_gap_s"] is not None]),
               "background_gap_s": percentiles([g for load in loads for g in load["gaps_s"]])}
        rows.append(row)
        gap = row["background_max_gap_s"]["p50"]
        print(f"schedule {row['schedule']:>10s} (chunk {row['prefill_chunk']}, budget {row['max_prefill_tokens']}): "
              f"short TTFT p50 {1e3 * row['ttft_short_s']['p50']:.1f} ms max {1e3 * max(shorts):.1f} ms, "
              f"long TTFT {1e3 * row['ttft_long_s']['p50']:.1f} ms, background max gap "
              f"{'-' if gap is None else f'{1e3 * gap:.1f} ms'}", flush=True)
        del llm
        write_result(args.name, parameters, {"complete": False, "schedules": rows}, **({"directory": args.out_dir} if args.out_dir else {}))
    path = write_result(args.name, parameters, {"complete": True, "schedules": rows}, **({"directory": args.out_dir} if args.out_dir else {}))
    print(f"wrote {path}")
    return 0
