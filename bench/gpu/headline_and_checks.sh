#!/usr/bin/env bash
# One GPU call (<= 9.5 min wall; 2026-12-03's run of all 10 configs took 425 s of its 64K step):
# 0. GPU tests of the engine paths and of the kernels added since the last GPU run (the eviction scores, the
#    fused norm and rotary, one KV head in the engine): engine == forward, graphs == eager, device cache + both
#    trace replay paths (TEST_S, default 110 s; the full GPU list passed on 2026-12-03 in 180 s,
#    results/gpu_validation/2026-12-03b/).
# 1. The headline, bench/results/decode_64k_equal_memory.json: 12 configs, replaying results/quality/traces_*.npz
#    (study run 8's models since 2026-12-07; run 4's before, now in results/quality/run4/), with InfLLM-v2 offloaded at the same 128-block device cache
#    as NOSA (the fair counterpart of nosa:on:cache128), NOSA's cache-128 row again with the misses loaded
#    inside decode attention (:fusegather, nosa.engine.attention.FUSE_GATHER), and its kernel profiles.
# 2. Every kernel against its reference on the GPU (tests/ops/test_kernels_gpu.py) in what time is left.
# 3. What time is left (PREFILL=1): where a batched prefill's time goes (bench/gpu/prefill_profile.py,
#    offload on), and whether prompts of new lengths still compile kernels again after do_not_specialize;
#    PREFILL_S: the seconds the kernel tests leave for it (default 0).
set -uo pipefail
: "${OUT:?set OUT to the result directory}"
COMMIT=${NOSA_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
TOTAL=${TOTAL:-555}
. "$(dirname "$0")/budget.sh"
status=0
TRACES=results/quality/traces_nosa.npz,results/quality/traces_infllmv2.npz

timeout ${TEST_S:-110} python3 -m pytest -q -p no:cacheprovider -m gpu -rA tests/engine/test_gpu.py tests/ops/test_kernels_gpu.py \
  -k "device_cache_and_trace or graphs_equal_eager or equals_model_forward or offload_off or one_kv_head or eviction or rms or rotary or loading_misses" >"$OUT/gpu_engine_tests.log" 2>&1; rc=$?; [ $rc -eq 0 ] || status=1
echo "engine tests exit $rc ($(elapsed) s)"; grep -E "FAILED|ERROR|passed|failed" "$OUT/gpu_engine_tests.log" | tail -6

timeout $(left 120) python3 -m nosa.cli bench decode --layers 4 --prompt 65536 --steps 32 --warmup 4 \
  --equal-memory-dense-batch 20 --max-batch 48 --commit "$COMMIT" --traces "$TRACES" \
  --equal-configs dense:off,nosa:on:traces,nosa:on:cache128:traces,nosa:on:cache128:traces:fusegather,infllmv2:on:traces,infllmv2:on:cache128:traces,nosa:on:model,infllmv2:on:model,nosa:off:traces,infllmv2:off:traces,nosa:off:model,infllmv2:off:model \
  --profile "$OUT/decode_64k_profile.txt" --name "$OUT/decode_64k_equal_memory" >"$OUT/decode_64k_equal_memory.log" 2>&1; rc=$?; [ $rc -eq 0 ] || status=1
echo "64K exit $rc ($(elapsed) s)"; grep -v "^wrote\|Warn\|_warn" "$OUT/decode_64k_equal_memory.log" | tail -14

timeout $(left ${PREFILL_S:-0}) python3 -m pytest -q -p no:cacheprovider -m gpu -rA tests/ops/test_kernels_gpu.py >"$OUT/gpu_kernel_tests.log" 2>&1; rc=$?; [ $rc -eq 0 ] || status=1
echo "kernel tests exit $rc ($(elapsed) s)"; grep -E "FAILED|ERROR|passed|failed" "$OUT/gpu_kernel_tests.log" | tail -8

mkdir -p "$OUT/prefill"
if [ -n "${PREFILL:-}" ]; then
  timeout $(left) python3 bench/gpu/prefill_profile.py "$OUT/prefill" on >"$OUT/prefill_profile.log" 2>&1; rc=$?
  echo "prefill profile exit $rc ($(elapsed) s)"; grep -E "steps,|TTFT" "$OUT/prefill_profile.log" | tail -8
fi
(cd "$OUT" && tar -czf logs.tar.gz *.log prefill && rm -rf *.log prefill)
ls "$OUT"
exit $status
