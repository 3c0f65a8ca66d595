"""Server metrics in the Prometheus text exposition format (version 0.0.4), written here rather than with
prometheus_client: a handful of counters and two histograms do not justify a dependency.

Measured by the server: requests by endpoint and status, prompt and generated tokens, time to first token
(request accepted -> first token handed to its stream) and inter-token latency. Read from the engine at
scrape time (between two steps): decode tokens/s, hit rate, bytes moved host->device, and its occupancy.
"""

from __future__ import annotations

import bisect
import threading

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS_S):
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.sum += value * times
        self.count += times

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, count in zip(self.bounds + (float("inf"),), self.counts):
            cumulative += count
            label = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{label}"}} {cumulative}')
        out += [f"{name}_sum {self.sum!r}", f"{name}_count {self.count}"]
        return out


class ServerMetrics:
    """Updated from the event loop (and read there), guarded anyway so any thread may update."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram()
        self.itl = Histogram()
        self.in_progress = 0

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            key = (endpoint, status)
            self.requests[key] = self.requests.get(key, 0) + 1

    def prompt(self, tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += tokens

    def tokens(self, count: int) -> None:
        with self._lock:
            self.generation_tokens += count

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def inter_token(self, seconds: float, tokens: int) -> None:
        # A step that brings several tokens at once spreads its wait over them.
        with self._lock:
            self.itl.observe(seconds / max(1, tokens), max(1, tokens))

    def render(self, engine: dict | None, queued: int, queue_full_waits: int) -> str:
        lines: list[str] = []

        def metric(name, kind, help_text, samples):
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(samples)

        with self._lock:
            metric("nosa_requests_total", "counter", "HTTP requests by endpoint and status code.",
                   [f'nosa_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(self.requests.items())])
            metric("nosa_requests_in_progress", "gauge", "Requests being served now.", [f"nosa_requests_in_progress {self.in_progress}"])
            metric("nosa_queued_choices", "gauge", "Choices accepted that have no first token yet.", [f"nosa_queued_choices {queued}"])
            metric("nosa_queue_full_waits_total", "counter", "Requests that found the queue full and waited for room.",
                   [f"nosa_queue_full_waits_total {queue_full_waits}"])
            metric("nosa_prompt_tokens_total", "counter", "Prompt tokens of accepted requests.", [f"nosa_prompt_tokens_total {self.prompt_tokens}"])
            metric("nosa_generation_tokens_total", "counter", "Tokens generated and handed to clients.",
                   [f"nosa_generation_tokens_total {self.generation_tokens}"])
            metric("nosa_time_to_first_token_seconds", "histogram", "Request accepted to its first token.", self.ttft.lines("nosa_time_to_first_token_seconds"))
            metric("nosa_inter_token_latency_seconds", "histogram", "Time between consecutive tokens of a choice.",
                   self.itl.lines("nosa_inter_token_latency_seconds"))
        if engine is not None:
            metric("nosa_engine_decode_tokens_per_second", "gauge", "Engine decode throughput since start (tokens / decode time).",
                   [f"nosa_engine_decode_tokens_per_second {engine['decode_tokens_per_s']!r}"])
            metric("nosa_engine_hit_rate", "gauge", "Share of selected blocks already on the device at decode (mean over layers).",
                   [f"nosa_engine_hit_rate {engine['hit_rate']!r}"])
            metric("nosa_engine_bytes_host_to_device_total", "counter", "KV bytes moved host->device (decode gathers and prefill installs).",
                   [f"nosa_engine_bytes_host_to_device_total {engine['bytes_host_to_device']}"])
            metric("nosa_engine_decode_steps_total", "counter", "Batched decode steps run.", [f"nosa_engine_decode_steps_total {engine['decode_steps']}"])
            metric("nosa_engine_prefill_tokens_total", "counter", "Prompt tokens prefilled.", [f"nosa_engine_prefill_tokens_total {engine['prefill_tokens']}"])
            for key, help_text in (("host_store_growths", "Times the host KV store was reallocated larger (offload on)."),
                                   ("graph_eager_warmups", "Decode steps run eagerly to warm up the decode step's CUDA graph."),
                                   ("graph_captures", "CUDA graph captures of the decode step."),
                                   ("graph_dropped_by_store_growth", "Times a grown host store dropped the captured graphs.")):
                metric(f"nosa_engine_{key}_total", "counter", help_text, [f"nosa_engine_{key}_total {engine[key]}"])
            for key, help_text in (("num_running", "Requests holding a device row."), ("num_waiting", "Requests waiting for a row or pages."),
                                   ("free_rows", "Device rows free."), ("free_pages", "Host KV pages free."), ("num_pages", "Host KV pages in all.")):
                metric(f"nosa_engine_{key}", "gauge", help_text, [f"nosa_engine_{key} {engine[key]}"])
        return "\n".join(lines) + "\n"
