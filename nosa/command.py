"""The pieces every `nosa` subcommand shares: the argument parser (options anywhere), the one error path
(user errors: message alone on stderr, exit code 2; bugs: the traceback) and the --device check.

Set NOSA_TRACEBACK=1 to see the traceback of a user error too (when the message is not enough)."""

from __future__ import annotations

import argparse
import os
import sys

from nosa.errors import USER_ERRORS, UsageError


class Parser(argparse.ArgumentParser):
    """Accepts options between and after positionals (`nosa generate DIR --max-tokens 4 'def f('`), as
    argparse's intermixed parsing does. A parser that dispatches to subcommands parses the ordinary way
    (intermixed parsing cannot), and each subcommand's parser, also a `Parser`, parses its own arguments
    intermixed."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        dispatches = any(isinstance(a, argparse._SubParsersAction) for a in self._actions)
        if dispatches or self._intermixing:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def run_command(func, args, prog: str) -> int:
    """Call a subcommand's `func(args)` under the one error path; returns the exit code."""
    try:
        return int(func(args) or 0)
    except USER_ERRORS as err:
        if os.environ.get("NOSA_TRACEBACK") == "1":
            raise
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


DEVICE_CACHE_HELP = ("blocks the device keeps per (layer, sequence, KV head), >= topk_blocks (default: the selection "
                     "only), or 'auto': the largest cache up to 2 x topk that leaves --gpu-memory-budget room for "
                     "--max-num-seqs rows")


MICRO_BATCHES_HELP = ("run each decode step as this many micro-batches of rows, on CUDA on their own streams so one's "
                      "host->device loads overlap another's compute (default 1: the whole batch at once)")


def device_cache_blocks_arg(value: str):
    """--device-cache-blocks: a block count or 'auto' (LLM's device_cache_blocks; the engine checks the count)."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of blocks or 'auto', got {value!r}") from None


def resolve_device(flag: str | None, option: str = "--device"):
    """The torch device a `--device` flag names (default: cuda when available), refused with a clear
    message when this machine cannot provide it (torch's own error is an AssertionError)."""
    import torch

    try:
        device = torch.device(flag or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise UsageError(f"{option} {flag!r} is not a device torch knows ({err}); use cpu or cuda") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build of torch"
            raise UsageError(f"{option} {flag} was given but no CUDA device is usable here ({build}); "
                             "use --device cpu, or install a CUDA build of torch on a machine with an NVIDIA GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{option} {flag}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type not in ("cpu", "cuda"):
        raise UsageError(f"{option} {flag!r}: nosa runs on cpu or cuda")
    return device


def main_for(register, command: str, argv=None) -> int:
    """`python -m nosa.<stage>.cli ...`: one subcommand without loading the others, same parser and
    error path as `nosa <command> ...`."""
    parser = Parser(prog="nosa")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args([command, *(argv if argv is not None else sys.argv[1:])])
    return run_command(args.func, args, f"nosa {command}")


def read_prompts(arguments: list[str], stdin, token_ids: bool) -> list:
    """`nosa generate`'s prompts: the positional arguments, or one a line from stdin (read as bytes, so
    text that is not UTF-8 is named instead of failing in the decoder); with --token-ids, comma-separated
    integers. Raises UsageError naming the prompt and the flag."""
    if arguments:
        prompts, where = list(arguments), "prompt argument"
        for i, text in enumerate(prompts):
            try:
                text.encode("utf-8")  # argv bytes that are not UTF-8 arrive as lone surrogates
            except UnicodeEncodeError:
                raise UsageError(f"{where} {i + 1} is not valid UTF-8 text; give UTF-8 text, or token ids with "
                                 "--token-ids") from None
    else:
        prompts, where = [], "stdin line"
        for number, raw in enumerate(getattr(stdin, "buffer", stdin), 1):
            try:
                line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            except UnicodeDecodeError as err:
                raise UsageError(f"{where} {number} is not valid UTF-8 text ({err.reason} at byte {err.start}); give "
                                 "UTF-8 text, or token ids with --token-ids") from None
            if line.strip():
                prompts.append(line.rstrip("\n"))
    if not prompts:
        raise UsageError("no prompt given (arguments or stdin)")
    if not token_ids:
        return prompts
    parsed = []
    for i, text in enumerate(prompts):
        try:
            parsed.append([int(t) for t in text.split(",") if t.strip()])
        except ValueError:
            raise UsageError(f"--token-ids: {where} {i + 1} ({text!r}) must be comma-separated integers, e.g. 1,20,7") from None
    return parsed


class quiet_transformers:
    """With `enabled`, transformers' progress bars (the weight-loading bar of from_pretrained) stay off
    for the duration; the setting is put back afterwards, so an in-process caller is left as it was."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        from transformers.utils import logging

        self.was_enabled = logging.is_progress_bar_enabled()
        if self.enabled:
            logging.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        from transformers.utils import logging

        if self.was_enabled:
            logging.enable_progress_bar()
        return False
