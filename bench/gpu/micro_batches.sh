#!/usr/bin/env bash
# One GPU call (TOTAL=540 s; the tests need ~60 s after their compiles: at 95 s they were cut, 2026-12-07), issue 10 item 2 (transfers overlapped with compute):
# 1. Engine GPU tests: the 6 that failed at a156811 with FUSE_GATHER the default (fixed in 5648294, not run
#    since), and the new micro-batch tests (two streams, eager and graphed, == one batch).
# 2. 64K, the budget of 20 one-copy dense rows setting every batch: NOSA and InfLLM-v2 offloaded (cache 128,
#    loads in attention) on study run 8's traces and NOSA with the random weights' selections, each as one
#    batch and as 2 micro-batches on two streams (`:mb2`; NOSA also with `:share`, each micro-batch's split
#    launches sized for half the SMs). Run after the probe: each config is saved as it ends, so a cut keeps them.
# 3. (run second) bench/gpu/scoring_probe.py at 121 rows: the split scoring passes alone, grouped for L2
#    reuse, and with one query token per program.
# Writes into $OUT: decode_64k_micro_batches.json, scoring_probe.json, logs.tar.gz.
TOTAL=${TOTAL:-540}
. "$(dirname "$0")/call.sh"
mkdir -p "$OUT/logs"
TRACES=results/quality/traces_nosa.npz,results/quality/traces_infllmv2.npz

timeout -k 10 150 python3 -m pytest -q -p no:cacheprovider -m gpu -rA --tb=short tests/engine/test_gpu.py \
  -k "engine_equals_model_forward or device_cache_and_trace_replay or micro_batches" >"$OUT/logs/gpu_engine_tests.log" 2>&1
echo "engine GPU tests exit $? ($(elapsed) s)"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/logs/gpu_engine_tests.log" | tail -14

timeout -k 5 70 python3 bench/gpu/scoring_probe.py --out "$OUT/scoring_probe.json" >"$OUT/logs/scoring_probe.log" 2>&1
echo "probe exit $? ($(elapsed) s)"; tail -9 "$OUT/logs/scoring_probe.log" | cut -c1-400

timeout -k 10 $(left 12) python3 -m nosa.cli bench decode --layers 4 --prompt 65536 --steps 32 --warmup 4 \
  --equal-memory-dense-batch 20 --max-batch 256 --commit "$COMMIT" --traces "$TRACES" \
  --equal-configs dense:off,nosa:on:cache128:traces:fusegather,nosa:on:cache128:traces:fusegather:mb2,nosa:on:cache128:traces:fusegather:mb2:share,infllmv2:on:cache128:traces:fusegather,infllmv2:on:cache128:traces:fusegather:mb2,nosa:on:cache128:model:fusegather,nosa:on:cache128:model:fusegather:mb2,nosa:on:cache128:model:fusegather:mb2:share \
  --name "$OUT/decode_64k_micro_batches" >"$OUT/logs/decode_64k.log" 2>&1
echo "64K exit $? ($(elapsed) s)"; grep -v "^wrote\|Warn\|_warn" "$OUT/logs/decode_64k.log" | tail -13

(cd "$OUT" && tar -czf logs.tar.gz logs && rm -rf logs)
ls "$OUT"
