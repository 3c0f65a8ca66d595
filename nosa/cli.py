"""The `nosa` command. Each subcommand lives beside the code it drives and registers itself here:
a module listed in SUBCOMMANDS defines `register(subparsers)` which adds its parser and sets `func`."""

from __future__ import annotations

import argparse
import importlib
import sys

from nosa.command import Parser, run_command

SUBCOMMANDS = (
    "nosa.demo",          # nosa demo
    "nosa.train.cli",     # nosa train
    "nosa.engine.cli",    # nosa generate
    "nosa.bench.cli",     # nosa bench ...
    "nosa.eval.cli",      # nosa eval
    "nosa.serve.cli",     # nosa serve
    "nosa.study.cli",     # nosa study ...
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="nosa", description="NOSA sparse attention: demo, train, generate, bench, eval")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name == module_name:  # that subcommand is not part of this installation
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Every subcommand runs under one error path (nosa.command.run_command): a user error prints its
    message alone with exit code 2; a bug keeps its traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return run_command(args.func, args, f"nosa {args.command}")


if __name__ == "__main__":
    sys.exit(main())
