"""Helper process for test_chain.py, one of torchrun's processes: `python -m nosa.study.train_chain` with
the command line's arguments after the first, which is a number of seconds: rank 0 sets up each phase's
process group after the first that much later than the other ranks. That is what happens anyway, by a
varying amount, when rank 0 renders the finished phase's loss plot while the others go on to the next
phase; made certain here, so that the other ranks always start the new group's rendezvous first. Then
exit 3 if a thread of a gloo process group outlived the chain (as train_and_check_teardown.py)."""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import nosa.train.loop as loop  # noqa: E402
from nosa.study.train_chain import main  # noqa: E402
from train_and_check_teardown import exit_checking_threads  # noqa: E402

late_s = float(sys.argv[1])
real_init = loop.init_distributed
calls = 0


def init_late_on_rank0(*args, **kwargs):
    global calls
    calls += 1
    if calls > 1 and os.environ.get("RANK") == "0":
        time.sleep(late_s)
    return real_init(*args, **kwargs)


loop.init_distributed = init_late_on_rank0
exit_checking_threads(main(sys.argv[2:]))
