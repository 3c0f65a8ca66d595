#!/usr/bin/env bash
# One GPU call (TOTAL=560 s), written 2026-12-08 (no GPU was lent after it was; run it first in the next session):
# issue 10's headline re-measured on the current engine, every row in one run, with each step split into its
# graph replay (device) and the host's rest, and the pooled device cache (blocks move between selection and
# spill slots by page-map swaps, no K/V copies; block_cache.POOL_DEVICE_CACHE, off until this call) against the
# copying one. If the GPU tests pass and the poolcache row is faster, make POOL_DEVICE_CACHE the default.
# 0. GPU tests: the pooled cache == the copying cache (bf16, graphs, loads in attention and by the gather), the
#    graph/host split, and the device-cache tests (trace replay, spill kernel, loads in attention);
# 1. 64K prompts, 8B shape with 4 layers, the device budget of 20 one-copy dense rows, the batch each config's
#    budget admits: dense on GPU; NOSA and InfLLM-v2 on GPU (one copy, pages read in place) and offloaded
#    (128-block cache, loads in attention; InfLLM-v2 with 2 micro-batches, its strongest measured offloaded
#    configuration, decode_64k_micro_batches_h200.json), each with trained traces and with the random weights'
#    selections; NOSA offloaded with traces on the pooled cache (poolcache) beside the copying one (copycache);
# 2. if 70 s are left, the 16K comparison at the budget of 7 one-copy dense rows (as decode_16k_equal_memory_h100.json);
# 3. if time is left, `nosa bench kernels` at 128K (no H200 row yet).
# Writes into $OUT: decode_64k_equal_memory.json, its two profiles, decode_16k_equal_memory.json,
# kernels_128k.json (if reached), logs.tar.gz.
TOTAL=${TOTAL:-560}
. "$(dirname "$0")/call.sh"
mkdir -p "$OUT/logs"
TRACES=results/quality/traces_nosa.npz,results/quality/traces_infllmv2.npz

timeout -k 5 110 python3 -m pytest -q -p no:cacheprovider tests/engine/test_gpu.py \
  -k "pooled or times_each_graph_replay or device_cache_and_trace or spill_kernel_engine or loading_misses_in_decode" \
  >"$OUT/logs/gpu_test.log" 2>&1
echo "gpu test exit $? ($(elapsed) s)"; tail -2 "$OUT/logs/gpu_test.log"

timeout -k 10 $(left 100) python3 -m nosa.cli bench decode --layers 4 --prompt 65536 --steps 32 --warmup 4 \
  --equal-memory-dense-batch 20 --max-batch 256 --commit "$COMMIT" --traces "$TRACES" \
  --equal-configs dense:off,nosa:on:cache128:traces:fusegather:copycache,nosa:on:cache128:traces:fusegather:poolcache,infllmv2:on:cache128:traces:fusegather:mb2,nosa:on:cache128:model:fusegather,infllmv2:on:cache128:model:fusegather:mb2,nosa:off:traces,infllmv2:off:traces,nosa:off:model,infllmv2:off:model \
  --profile "$OUT/decode_64k_profile.txt" --name "$OUT/decode_64k_equal_memory" >"$OUT/logs/decode_64k.log" 2>&1
echo "64K exit $? ($(elapsed) s)"; grep -v "^wrote\|Warn\|_warn" "$OUT/logs/decode_64k.log" | tail -10

[ "$(left 8)" -gt 70 ] && timeout -k 10 $(left 8) python3 -m nosa.cli bench decode --layers 4 --prompt 16384 --steps 48 --warmup 4 \
  --equal-memory-dense-batch 7 --max-batch 256 --commit "$COMMIT" --traces "$TRACES" \
  --equal-configs dense:off,nosa:off:traces,infllmv2:off:traces,nosa:on:cache128:traces:fusegather,nosa:on:cache128:model:fusegather,infllmv2:on:cache128:traces:fusegather:mb2,infllmv2:on:cache128:model:fusegather:mb2 \
  --name "$OUT/decode_16k_equal_memory" >"$OUT/logs/decode_16k.log" 2>&1
echo "16K exit $? ($(elapsed) s)"; grep -v "^wrote\|Warn\|_warn" "$OUT/logs/decode_16k.log" | tail -7

if [ "$(left 8)" -gt 120 ]; then
  timeout -k 10 $(left 8) python3 -m nosa.cli bench kernels --lengths 131072 --reps 4 --skip-decode \
    --out-dir "$OUT" --name kernels_128k >"$OUT/logs/bench_kernels.log" 2>&1
  echo "kernels exit $? ($(elapsed) s)"; grep -v Warn "$OUT/logs/bench_kernels.log" | tail -3 | cut -c1-300
fi
(cd "$OUT" && tar -czf logs.tar.gz logs && rm -rf logs)
ls "$OUT"
