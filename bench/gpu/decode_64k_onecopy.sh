#!/usr/bin/env bash
# One GPU call (<= 4 min wall): the one-copy path (offload off reads the device store in place) on CUDA.
# 1. Its GPU tests: the paged Triton decode kernel equals the slot path bit for bit, the engine with offload
#    off equals the model's forward (graphs and eager) and allocates what LLM.device_bytes charges.
# 2. `nosa bench decode` at 64K-token prompts, 8B layer shape (4 of 32 layers), random weights, equal
#    device memory = what the engine now charges one-copy dense for 20 sequences (issue 10 item 6's
#    budget), batch capped at 48 (host RAM): dense, nosa and infllmv2 on the GPU, then both offloaded.
#    Dense should now be admitted 20 rows (the two-copy engine admitted 10 at half this budget).
# Writes into $OUT: gpu_tests.log, decode_64k_onecopy.json (rewritten after every config, so a run cut
# short keeps what it measured; "complete": false marks a partial file) and its log.
# Estimate: tests ~40 s; ~25-30 s per config at 64K: ~150 s.
set -uo pipefail
: "${OUT:?set OUT to the result directory}"
COMMIT=${NOSA_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}

timeout ${TEST_TIMEOUT:-60} python3 -m pytest -q tests/ops/test_kernels_gpu.py tests/engine/test_gpu.py \
  -k "paged or offload_off or equals_model_forward or graphs_equal_eager or device_cache_and_trace or gather_reads" \
  >"$OUT/gpu_tests.log" 2>&1
echo "gpu tests exit $?"; tail -4 "$OUT/gpu_tests.log"

timeout ${BENCH_TIMEOUT:-170} python3 -m nosa.cli bench decode --layers 4 --prompt 65536 --steps 32 --warmup 4 \
  --equal-memory-dense-batch 20 --max-batch 48 --commit "$COMMIT" \
  --equal-configs dense:off,nosa:off,infllmv2:off,nosa:on,infllmv2:on \
  --name "$OUT/decode_64k_onecopy" >"$OUT/decode_64k_onecopy.log" 2>&1
echo "bench exit $?"; tail -8 "$OUT/decode_64k_onecopy.log"
