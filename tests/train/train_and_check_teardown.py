"""Helper process for test_loop.py, one of torchrun's processes: `nosa train` with the command line's
arguments, then exit 3 if a thread of the gloo process group is still running. A group that outlives
`nosa train` (destroy_process_group does not free a group something still holds) keeps its worker
threads into interpreter shutdown, where now and then one aborts the process ("terminate called
without an active exception"); this check fails every time instead."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def gloo_threads() -> list[str]:
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):  # not Linux: nothing to check
        return []
    names = []
    for tid in os.listdir(tasks):
        try:
            with open(os.path.join(tasks, tid, "comm")) as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return [name for name in names if "gloo" in name]


def exit_checking_threads(rc: int) -> None:
    left = gloo_threads()
    if left:
        print(f"rank {os.environ.get('RANK')}: the process group's threads outlived the run: {left}", file=sys.stderr, flush=True)
        sys.exit(3)
    sys.exit(rc)


if __name__ == "__main__":
    from nosa.cli import main

    exit_checking_threads(main(["train", *sys.argv[1:]]))
