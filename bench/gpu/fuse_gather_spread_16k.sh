#!/usr/bin/env bash
# One GPU call (TOTAL=460 s: what the device time left after budget_batch_rest.sh allows), issue 10:
# 1. The FUSE_GATHER exactness tests budget_batch_rest.sh's 130 s could not reach (3 of 4; fp32 / bf16, with and
#    without the device cache): they decide whether FUSE_GATHER becomes the engine's default.
# 2. 64K, the budget of 20 one-copy dense rows setting every batch: NOSA offloaded with the random weights'
#    selections with every row at 65,536 tokens and with the rows' prompts spread over the 1,024 tokens below
#    (`:spread1024`, as a server's rows are; since 8ec9ef9 they are selected in one call), and NOSA offloaded
#    without the device cache (~195 rows) on study run 8's traces.
# 3. The 16K rows budget_batch_rest.sh did not reach: the random weights' selections offloaded and the
#    on-GPU sparse rows, at the budget of 7 one-copy dense rows.
# Writes into $OUT: decode_64k_spread.json, decode_16k_equal_memory_2.json, logs.tar.gz.
TOTAL=${TOTAL:-460}
. "$(dirname "$0")/call.sh"
mkdir -p "$OUT/logs"
TRACES=results/quality/traces_nosa.npz,results/quality/traces_infllmv2.npz

timeout -k 10 $(left 380) python3 -m pytest -q -p no:cacheprovider -m gpu -rA --tb=short tests/engine/test_gpu.py \
  -k "loading_misses" >"$OUT/logs/gpu_engine_tests.log" 2>&1
echo "FUSE_GATHER tests exit $? ($(elapsed) s)"; grep -E "^(PASSED|FAILED|ERROR)|passed|failed|assert" "$OUT/logs/gpu_engine_tests.log" | tail -12

timeout -k 10 $(left 160) python3 -m nosa.cli bench decode --layers 4 --prompt 65536 --steps 32 --warmup 4 \
  --equal-memory-dense-batch 20 --max-batch 256 --commit "$COMMIT" --traces "$TRACES" \
  --equal-configs dense:off,nosa:on:cache128:model:fusegather,nosa:on:cache128:model:fusegather:spread1024,nosa:on:traces:fusegather \
  --name "$OUT/decode_64k_spread" >"$OUT/logs/decode_64k.log" 2>&1
echo "64K exit $? ($(elapsed) s)"; grep -v "^wrote\|Warn\|_warn" "$OUT/logs/decode_64k.log" | tail -6

timeout -k 10 $(left 10) python3 -m nosa.cli bench decode --layers 4 --prompt 16384 --steps 48 --warmup 4 \
  --equal-memory-dense-batch 7 --max-batch 256 --commit "$COMMIT" --traces "$TRACES" \
  --equal-configs dense:off,nosa:on:cache128:model:fusegather,infllmv2:on:cache128:model:fusegather,nosa:off:traces,infllmv2:off:traces \
  --name "$OUT/decode_16k_equal_memory_2" >"$OUT/logs/decode_16k.log" 2>&1
echo "16K exit $? ($(elapsed) s)"; grep -v "^wrote\|Warn\|_warn" "$OUT/logs/decode_16k.log" | tail -7
(cd "$OUT" && tar -czf logs.tar.gz logs && rm -rf logs)
ls "$OUT"
