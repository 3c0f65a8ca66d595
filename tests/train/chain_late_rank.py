"""Helper process for test_chain.py, one of torchrun's processes: `chain_late_rank.py LATE LIMIT ARGS...`
runs `python -m nosa.study.train_chain ARGS...`, where rank 0 sets up the process group of each phase after the
first LATE seconds after the other ranks do. That happens anyway, by a varying amount, when rank 0
renders the finished phase's loss plot while the others go on; made certain here, so that the others
always begin the new group's rendezvous first. A process still running after LIMIT seconds prints every
thread's stack and exits 1 (one stuck in a gloo rendezvous answers no signal, and torchrun would wait
for it). At the end, exit 3 if a thread of a gloo process group outlived the chain (as in
train_and_check_teardown.py)."""

import faulthandler
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import nosa.train.loop as loop  # noqa: E402
from nosa.study.train_chain import main  # noqa: E402
from train_and_check_teardown import exit_checking_threads  # noqa: E402

late_s, limit_s = float(sys.argv[1]), float(sys.argv[2])
faulthandler.dump_traceback_later(limit_s, exit=True)
real_init = loop.init_distributed
calls = 0


def init_late_on_rank0(*args, **kwargs):
    global calls
    calls += 1
    if calls > 1 and os.environ.get("RANK") == "0":
        time.sleep(late_s)
    return real_init(*args, **kwargs)


loop.init_distributed = init_late_on_rank0
exit_checking_threads(main(sys.argv[3:]))
