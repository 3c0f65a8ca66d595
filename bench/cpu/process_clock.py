"""Run a `nosa` command timing with the process's CPU time instead of wall time: on a CPU shared with other
jobs, wall time counts the waits for a core. From the repository root, one thread:

    OMP_NUM_THREADS=1 python bench/cpu/process_clock.py bench generate --device cpu ...

`time.perf_counter` (what the benchmarks time with) is replaced by `time.process_time` for the whole run."""

import sys
import time

time.perf_counter = time.process_time
sys.path.insert(0, ".")

from nosa.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
