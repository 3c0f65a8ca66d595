#!/usr/bin/env bash
# One GPU call (<= ~9.5 min wall, TOTAL=560), issue 10 items 2-3: what the default device cache and FUSE_GATHER need.
# 1. The engine's GPU tests of the fused gather (FUSE_GATHER == the gather path bit for bit, fp32 and bf16, with
#    and without the device cache: two fp32 cases failed on 2026-12-07 before the decode kernel's variants
#    shared one autotuned config), of the device cache and of offload off (TEST_S, default 150 s).
# 2. The case the device cache's default still lacks (docs/engine.md, "Device cache beyond the selection"): a
#    budget that sets the batch, so the cache's slots cost rows. `nosa bench decode` at 64K-token prompts, 4 of
#    the 8B shape's layers, every config given the device budget of 5 one-copy dense sequences (NOSA then fits
#    ~48 rows with the selection only and ~30 with a 128-block cache; --max-batch 64 does not bind), trace-driven
#    (results/quality/traces_*.npz, study run 8) and with the random weights' selections, with and without the
#    cache, and the cached trace row with FUSE_GATHER (decode_64k_budget_bound.json, profiles).
# 3. The regime `device_cache_blocks="auto"` acts in (rows capped by max_num_seqs, budget to spare: the headline's
#    20-dense-row budget, --max-batch 48) with the random weights' selections, which no cached run has measured:
#    NOSA offloaded with the selection only against "auto" (128 blocks there), and "auto" on the traces
#    (decode_64k_cache_auto.json). 2 and 3 decide whether "auto" becomes LLM's default.
# Writes into $OUT: decode_64k_budget_bound.json, decode_64k_cache_auto.json, profiles, logs.tar.gz.
. "$(dirname "$0")/call.sh"

timeout -k 10 ${TEST_S:-150} python3 -m pytest -q -p no:cacheprovider -m gpu -rA tests/engine/test_gpu.py \
  -k "loading_misses or device_cache or offload_off" >"$OUT/gpu_engine_tests.log" 2>&1
echo "engine tests exit $? ($(elapsed) s)"; grep -E "FAILED|ERROR|passed|failed" "$OUT/gpu_engine_tests.log" | tail -6

timeout -k 10 $(left 150) python3 -m nosa.cli bench decode --layers 4 --prompt 65536 --steps 32 --warmup 4 \
  --equal-memory-dense-batch 5 --max-batch 64 --commit "$COMMIT" \
  --traces results/quality/traces_nosa.npz \
  --equal-configs dense:off,nosa:on:traces,nosa:on:cache128:traces,nosa:on:cache96:traces,nosa:on:model,nosa:on:cache128:model,nosa:on:cache128:traces:fusegather \
  --profile "$OUT/decode_64k_budget_bound_profile.txt" --name "$OUT/decode_64k_budget_bound" >"$OUT/decode.log" 2>&1
echo "64K budget-bound exit $? ($(elapsed) s)"; grep -v "^wrote\|Warn\|_warn" "$OUT/decode.log" | tail -10
timeout -k 10 $(left 15) python3 -m nosa.cli bench decode --layers 4 --prompt 65536 --steps 32 --warmup 4 \
  --equal-memory-dense-batch 20 --max-batch 48 --commit "$COMMIT" --traces results/quality/traces_nosa.npz \
  --equal-configs dense:off,nosa:on:model,nosa:on:cacheauto:model,nosa:on:cacheauto:traces \
  --name "$OUT/decode_64k_cache_auto" >"$OUT/decode_auto.log" 2>&1
echo "64K cache auto exit $? ($(elapsed) s)"; grep -v "^wrote\|Warn\|_warn" "$OUT/decode_auto.log" | tail -6
(cd "$OUT" && tar -czf logs.tar.gz *.log && rm -f *.log)
ls "$OUT"
