#!/usr/bin/env bash
# One short GPU call (TOTAL=300 s), issue 10:
# 1. The whole engine GPU test file, first run since 5648294 (FUSE_GATHER only where the kernel attends: with
#    reference decode attention on CUDA the gather loads the misses, as the 6 tests failing at a156811 need).
# 2. bench/gpu/scoring_probe.py at the 64K budget-set batch (121 rows): the split scoring passes alone, grouped
#    for L2 reuse, and with one query token per program.
# Writes into $OUT: scoring_probe.json, logs.tar.gz.
TOTAL=${TOTAL:-300}
. "$(dirname "$0")/call.sh"
mkdir -p "$OUT/logs"
timeout -k 10 $(left 90) python3 -m pytest -q -p no:cacheprovider -m gpu -rA --tb=short tests/engine/test_gpu.py \
  >"$OUT/logs/gpu_engine_tests.log" 2>&1
echo "engine GPU tests exit $? ($(elapsed) s)"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/logs/gpu_engine_tests.log" | tail -12
timeout -k 10 $(left 5) python3 bench/gpu/scoring_probe.py --out "$OUT/scoring_probe.json" >"$OUT/logs/scoring_probe.log" 2>&1
echo "probe exit $? ($(elapsed) s)"; tail -12 "$OUT/logs/scoring_probe.log"
(cd "$OUT" && tar -czf logs.tar.gz logs && rm -rf logs)
ls "$OUT"
