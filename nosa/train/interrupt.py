"""Ctrl-C (SIGINT) or SIGTERM (a scheduler's preemption) during training: finish the step in progress,
save a resumable checkpoint and stop, instead of losing everything since the last save. A second signal
while that happens aborts at once (KeyboardInterrupt); checkpoints are written atomically, so the ones
already saved stay usable."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Set by the first SIGINT/SIGTERM; the training loop reads `signal_name` after each step."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # the second one: stop now
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
              "(send it again to abort without saving)", file=sys.stderr, flush=True)


@contextlib.contextmanager
def stop_on_signals():
    """Install the handlers for the duration (only possible in the main thread; elsewhere the signals
    keep their handlers and the request is never set)."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.signal(s, stop.handle) for s in SIGNALS}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
