#!/usr/bin/env bash
# One GPU call (<= 5 min wall): the GPU-marked kernel tests, then `nosa bench kernels` (NOSA vs SDPA vs
# fla-core's NSA, deterministic and first-version variants, dk/dv launch sweep at 32K, decode variants)
# at 4K..128K. Writes into $OUT: kernel_tests_gpu.log, kernels.json (rewritten after every length, so a
# cut-short run keeps what it measured), bench_kernels.log. fla comes from .whl/ when the lead copied it.
set -uo pipefail
: "${OUT:?set OUT to the result directory}"
. "$(dirname "$0")/wheels.sh"
timeout 100 python3 -m pytest -q -x tests/ops/test_kernels_gpu.py >"$OUT/kernel_tests_gpu.log" 2>&1
echo "gpu kernel tests: exit $? ($(tail -1 "$OUT/kernel_tests_gpu.log"))"
timeout 185 python3 -m nosa.cli bench kernels --lengths 4096 16384 32768 65536 131072 --sweep-lengths 32768 \
  --out-dir "$OUT" --name kernels >"$OUT/bench_kernels.log" 2>&1
echo "bench exit $?"
tail -12 "$OUT/bench_kernels.log"
