"""`nosa bench <what>`: each benchmark module in BENCHMARKS defines `register(subparsers)`."""

from __future__ import annotations

import importlib

BENCHMARKS = ("nosa.bench.kernels", "nosa.bench.qa_scores", "nosa.bench.decode", "nosa.bench.cache_sim", "nosa.bench.report", "nosa.bench.serve", "nosa.bench.generate", "nosa.bench.ttft")


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="throughput and kernel benchmarks (JSON results in bench/results/)")
    inner = parser.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    for module_name in BENCHMARKS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name == module_name:
                continue
            raise
        module.register(inner)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
