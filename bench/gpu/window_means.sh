#!/usr/bin/env bash
# One GPU call (<= 2 min): the window-mean kernel after the by-value change (rel2). Writes $OUT/window_means.json
# (checks first, then timings at 16K/64K/128K) and $OUT/window_means.log; then the GPU kernel tests, which
# compare both window means with the reference at the 8B shape.
set -uo pipefail
: "${OUT:?set OUT to the result directory}"
PYTHONPATH=.:${PYTHONPATH:-} timeout 60 python3 bench/gpu/window_means.py --out "$OUT/window_means.json" >"$OUT/window_means.log" 2>&1
echo "window means: exit $?"; tail -8 "$OUT/window_means.log"
timeout 100 python3 -m pytest -q -x tests/ops/test_kernels_gpu.py >"$OUT/kernel_tests_gpu.log" 2>&1
echo "gpu kernel tests: exit $? ($(tail -1 "$OUT/kernel_tests_gpu.log"))"
