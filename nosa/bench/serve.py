"""`nosa bench serve`: load test of `nosa serve` with N concurrent streaming clients.

The server runs as its own process (`python -m nosa.cli serve`), once with offload on and once off, on a
free loopback port, over a model saved to a temporary directory (random weights of a named shape, or
--model). The clients are asyncio tasks over httpx in this process; they send `--requests` requests, at
most `--clients` at a time, with prompt and output lengths drawn from seeded distributions. Prompts are
token ids and `ignore_eos` is set, so every request has exactly its drawn lengths; `logprobs: 0` makes
each token arrive as its own stream chunk even when its bytes are not yet printable text.

Reported per configuration: output tokens/s and requests/s over the wall time of the load, time to first
token, inter-token latency and end-to-end latency percentiles (p50/p90/p99), and the server's /metrics
after the load (engine hit rate, bytes moved host->device, decode tokens/s).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time

from nosa.bench.common import write_result
from nosa.bench.shapes import SHAPES, build_model, save_model


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="load test of nosa serve: throughput, TTFT and inter-token latency")
    p.add_argument("--model", default=None, help="a saved model directory (default: random weights of --shape)")
    p.add_argument("--shape", default="demo", choices=sorted(SHAPES))
    p.add_argument("--attn-mode", default="nosa")
    p.add_argument("--clients", type=int, default=32, help="requests in flight at once")
    p.add_argument("--requests", type=int, default=128, help="requests in all")
    p.add_argument("--prompt-len", default="256:2048", help="prompt tokens, uniform in LOW:HIGH (or one number)")
    p.add_argument("--output-len", default="32:256", help="generated tokens, uniform in LOW:HIGH (or one number)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--offload", default="on,off", help="configurations to run: on, off, or on,off")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=None, help="default: the longest prompt + output drawn")
    p.add_argument("--gpu-memory-budget", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--warmup", type=int, default=None,
                   help="requests sent (and not measured) before the load, drawn from the load's own length "
                        "distributions (default: --clients of them)")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--name", default="serve")
    p.add_argument("--out-dir", default=None, help="where the JSON goes (default bench/results)")
    p.set_defaults(func=main)


def parse_range(text: str, flag: str) -> tuple[int, int]:
    try:
        parts = [int(x) for x in text.split(":")]
    except ValueError:
        raise ValueError(f"{flag} must be N or LOW:HIGH integers, got {text!r}") from None
    low, high = (parts[0], parts[0]) if len(parts) == 1 else tuple(parts) if len(parts) == 2 else (0, -1)
    if not 1 <= low <= high:
        raise ValueError(f"{flag} must be N or LOW:HIGH with 1 <= LOW <= HIGH, got {text!r}")
    return low, high


def draw_requests(count: int, prompt: tuple[int, int], output: tuple[int, int], vocab: int, seed: int) -> list[dict]:
    """The request mix, a function of the seed: prompt token ids (bytes) and output lengths."""
    rng = random.Random(seed)
    return [{"prompt": [rng.randrange(min(vocab, 256)) for _ in range(rng.randint(*prompt))],
             "max_tokens": rng.randint(*output)} for _ in range(count)]


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    ordered = sorted(values)

    def at(q):
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "mean": sum(ordered) / len(ordered)}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model_dir: str, offload: bool, args, max_model_len: int, log_path: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "nosa.cli", "serve", model_dir, "--host", "127.0.0.1", "--port", str(self.port),
                   "--offload" if offload else "--no-offload", "--max-num-seqs", str(args.max_num_seqs),
                   "--max-model-len", str(max_model_len), "--log-level", "warning", "--served-model-name", "bench"]
        if args.gpu_memory_budget is not None:
            command += ["--gpu-memory-budget", str(args.gpu_memory_budget)]
        if args.device:
            command += ["--device", args.device]
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.process.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"the server did not become healthy within {timeout} s; see {self.log.name}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


async def one_request(client, url: str, request: dict) -> dict:
    body = {"model": "bench", "prompt": request["prompt"], "max_tokens": request["max_tokens"], "temperature": 0,
            "stream": True, "ignore_eos": True, "logprobs": 0, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    arrivals: list[float] = []
    usage = None
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            return {"error": f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            now = time.perf_counter()
            for choice in chunk.get("choices", []):
                tokens = len((choice.get("logprobs") or {}).get("tokens") or [])
                arrivals.extend([now] * tokens)
            usage = chunk.get("usage") or usage
    end = time.perf_counter()
    return {"start": start, "end": end, "arrivals": arrivals, "completion_tokens": usage["completion_tokens"] if usage else None,
            "expected_tokens": request["max_tokens"]}


async def run_load(url: str, requests: list[dict], clients: int) -> tuple[list[dict], float]:
    import httpx

    limit = asyncio.Semaphore(clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=clients + 4)) as client:
        async def limited(request):
            async with limit:
                return await one_request(client, url, request)

        start = time.perf_counter()
        results = await asyncio.gather(*(limited(r) for r in requests))
        return results, time.perf_counter() - start


def summarise(results: list[dict], wall_s: float) -> dict:
    good = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    ttft = [r["arrivals"][0] - r["start"] for r in good if r["arrivals"]]
    itl = [b - a for r in good for a, b in zip(r["arrivals"], r["arrivals"][1:])]
    e2e = [r["end"] - r["start"] for r in good]
    tokens = sum(len(r["arrivals"]) for r in good)
    return {
        "requests": len(results), "errors": len(errors), "first_errors": errors[:3], "wall_s": wall_s,
        "output_tokens": tokens, "output_tokens_per_s": tokens / wall_s if wall_s > 0 else None,
        "requests_per_s": len(good) / wall_s if wall_s > 0 else None,
        "exact_lengths": all(r["completion_tokens"] == r["expected_tokens"] == len(r["arrivals"]) for r in good),
        "ttft_s": percentiles(ttft), "itl_s": percentiles(itl), "e2e_s": percentiles(e2e),
    }


# Where a slow start goes (nosa/serve/metrics.py): recorded for the warm-up and for the measured load apart.
WARMUP_COUNTERS = ("nosa_engine_host_store_growths_total", "nosa_engine_graph_eager_warmups_total",
                   "nosa_engine_graph_captures_total", "nosa_engine_graph_dropped_by_store_growth_total")


def counter_deltas(before: dict, after: dict) -> dict:
    names = [n.removeprefix("nosa_") for n in WARMUP_COUNTERS] + ["engine_decode_steps_total", "engine_prefill_tokens_total"]
    return {n.removeprefix("engine_").removesuffix("_total"): after.get(n, 0) - before.get(n, 0) for n in names}


def server_metrics(url: str) -> dict:
    import httpx

    wanted = ("nosa_engine_hit_rate", "nosa_engine_bytes_host_to_device_total", "nosa_engine_decode_tokens_per_second",
              "nosa_engine_decode_steps_total", "nosa_engine_num_pages", "nosa_generation_tokens_total",
              "nosa_engine_prefill_tokens_total", *WARMUP_COUNTERS)
    values = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            values[name.removeprefix("nosa_")] = float(value)
    return values


def main(args) -> int:
    try:
        prompt_range = parse_range(args.prompt_len, "--prompt-len")
        output_range = parse_range(args.output_len, "--output-len")
        configs = [c.strip() for c in args.offload.split(",") if c.strip()]
        if not configs or any(c not in ("on", "off") for c in configs):
            raise ValueError(f"--offload must be on, off or on,off, got {args.offload!r}")
        for flag, value in (("--clients", args.clients), ("--requests", args.requests), ("--max-num-seqs", args.max_num_seqs)):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if args.warmup is None:
            args.warmup = args.clients
        if args.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    except ValueError as err:
        print(f"nosa bench serve: {err}", file=sys.stderr)
        return 2
    workdir = tempfile.mkdtemp(prefix="nosa_bench_serve_")
    if args.model is None:
        model_dir = save_model(build_model(args.shape, args.attn_mode, args.seed), os.path.join(workdir, "model"))
    else:
        model_dir = args.model
    from transformers import AutoConfig

    import nosa.models  # noqa: F401  (registers the nosa config type)

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    requests = draw_requests(args.requests, prompt_range, output_range, vocab, args.seed)
    # The warm-up follows the load's distributions: Triton compiles a kernel again for new argument
    # specialisations (lengths, counts), and the decode step's graph is captured on the engine's first steps.
    # A warm-up of a few equal short requests left those compiles inside the first configuration's measured
    # load (seen on the H200: the first server's p90 time to first token was 32 s, the second's 1.2 s, the
    # second finding the compiled kernels in Triton's cache).
    warmup = draw_requests(args.warmup, prompt_range, output_range, vocab, args.seed + 1)
    max_model_len = args.max_model_len or max(len(r["prompt"]) + r["max_tokens"] for r in requests + warmup)
    out_dir = args.out_dir or None
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    runs = []
    for config in configs:
        log_path = os.path.join(out_dir or workdir, f"{args.name}_server_offload_{config}.log")
        server = ServerProcess(model_dir, config == "on", args, max_model_len, log_path)
        try:
            server.wait_ready(args.startup_timeout)
            start = server_metrics(server.url)
            warmup_began = time.perf_counter()
            if warmup:
                asyncio.run(run_load(server.url, warmup, args.clients))
            warmup_s = time.perf_counter() - warmup_began
            before = server_metrics(server.url)
            warm = counter_deltas(start, before)
            print(f"offload {config}: warm-up of {len(warmup)} requests took {warmup_s:.1f} s: {warm}", flush=True)
            results, wall_s = asyncio.run(run_load(server.url, requests, args.clients))
            after = server_metrics(server.url)
        finally:
            server.stop()
        summary = summarise(results, wall_s)
        summary["offload"] = config == "on"
        summary["server"] = {"hit_rate": after.get("engine_hit_rate"),
                             "bytes_host_to_device": after.get("engine_bytes_host_to_device_total", 0) - before.get("engine_bytes_host_to_device_total", 0),
                             "engine_decode_tokens_per_s": after.get("engine_decode_tokens_per_second"),
                             "decode_steps": after.get("engine_decode_steps_total", 0) - before.get("engine_decode_steps_total", 0),
                             "host_pages": after.get("engine_num_pages"),
                             "warmup": {"requests": len(warmup), "wall_s": warmup_s, **warm},
                             "load": counter_deltas(before, after)}
        runs.append(summary)
        t, i = summary["ttft_s"], summary["itl_s"]
        print(f"offload {config}: {summary['output_tokens_per_s']:.1f} tok/s, {summary['requests_per_s']:.2f} req/s, "
              f"TTFT p50 {t['p50'] * 1e3:.1f} ms p99 {t['p99'] * 1e3:.1f} ms, ITL p50 {i['p50'] * 1e3:.2f} ms "
              f"p99 {i['p99'] * 1e3:.2f} ms, errors {summary['errors']}", flush=True)
    parameters = {k: v for k, v in vars(args).items() if k != "func"} | {
        "model_dir": None if args.model is None else args.model, "max_model_len_used": max_model_len,
        "prompt_tokens_total": sum(len(r["prompt"]) for r in requests), "output_tokens_requested": sum(r["max_tokens"] for r in requests)}
    path = write_result(args.name, parameters, runs, **({"directory": out_dir} if out_dir else {}))
    print(f"wrote {path}")
    print(f"{'offload':>8} {'tok/s':>9} {'req/s':>7} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} {'ITL p50 ms':>11} {'ITL p99 ms':>11} {'hit rate':>9}")
    for r in runs:
        hit = r["server"]["hit_rate"]
        print(f"{'on' if r['offload'] else 'off':>8} {r['output_tokens_per_s']:9.1f} {r['requests_per_s']:7.2f} "
              f"{r['ttft_s']['p50'] * 1e3:12.1f} {r['ttft_s']['p99'] * 1e3:12.1f} {r['itl_s']['p50'] * 1e3:11.2f} "
              f"{r['itl_s']['p99'] * 1e3:11.2f} {hit if hit is None else round(hit, 3)!s:>9}")
    return 0 if all(r["errors"] == 0 for r in runs) else 1
