#!/usr/bin/env bash
# One GPU call (<= ~4 min wall, TOTAL=230), issue 10, after pinning_headline.sh (2026-12-07): what that call
# could not finish.
# 1. tests/engine/test_gpu.py: the test that failed there (device footprint: now collects earlier engines
#    before measuring), the FUSE_GATHER exactness tests (fp32 and bf16, with and without the device cache:
#    they decide whether FUSE_GATHER becomes the default).
# 2. The rest of the 64K headline with the budget setting the batch (--max-batch 256, the device budget of 20
#    one-copy dense sequences): the random weights' selections offloaded (the on-GPU sparse rows if time is
#    left), each config's engine collected before the next maps its host store.
# Writes into $OUT: decode_64k_budget_batch_2.json, logs.tar.gz.
set -uo pipefail
: "${OUT:?set OUT to the result directory}"
COMMIT=${NOSA_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
TOTAL=${TOTAL:-230}
. "$(dirname "$0")/budget.sh"
. "$(dirname "$0")/wheels.sh"
mkdir -p "$OUT/logs"

timeout -k 10 $(left 140) python3 -m pytest -q -p no:cacheprovider -m gpu -rA --tb=short tests/engine/test_gpu.py \
  -k "device_kv_does_not_grow or offload_off_allocates or loading_misses" >"$OUT/logs/gpu_engine_tests.log" 2>&1
echo "engine tests exit $? ($(elapsed) s)"; grep -E "^(FAILED|ERROR)|passed|failed|assert" "$OUT/logs/gpu_engine_tests.log" | tail -12

timeout -k 10 $(left 10) python3 -m nosa.cli bench decode --layers 4 --prompt 65536 --steps 32 --warmup 4 \
  --equal-memory-dense-batch 20 --max-batch 256 --commit "$COMMIT" \
  --traces results/quality/traces_nosa.npz,results/quality/traces_infllmv2.npz \
  --equal-configs dense:off,nosa:on:cache128:model:fusegather,infllmv2:on:cache128:model:fusegather,nosa:off:model,infllmv2:off:model \
  --name "$OUT/decode_64k_budget_batch_2" >"$OUT/logs/decode.log" 2>&1
echo "64K budget-set batch exit $? ($(elapsed) s)"; grep -v "^wrote\|Warn\|_warn" "$OUT/logs/decode.log" | tail -12
(cd "$OUT" && tar -czf logs.tar.gz logs && rm -rf logs)
ls "$OUT"
