#!/usr/bin/env bash
# One GPU call (<= 8 min wall): issue 10 item 6's headline, bench/results/decode_64k_equal_memory.json.
# 1. The one-copy path's GPU tests first (paged decode kernel == slot path, offload off == model forward,
#    graphs == eager, device cache + trace replay): a CUDA error there would spoil every row after it.
# 2. `nosa bench decode` at 64K-token prompts, 8B layer shape (4 of 32 layers), every config given the device
#    budget the engine charges one-copy dense for 20 sequences (LLM.device_bytes), batch capped at 48 (host
#    RAM), in ONE run so the ratios share the machine state: dense on GPU; NOSA and InfLLM-v2 offloaded and on
#    GPU, each with the trained models' selection traces (results/quality/traces_*.npz) and with the random
#    weights' own selections (worst case); NOSA offloaded with a 128-block device cache (traces). The kernel
#    profile of a few eager NOSA-offloaded steps goes to decode_64k_profile.txt.
# 3. The 16K fixed-batch comparison (decode_8b's configs, batch 16) on the one-copy engine: decode_16k_onecopy.json.
# Every result file is rewritten after each config ("complete": false marks a partial file).
# Estimate: tests ~60 s; ~25-30 s per 64K config x 10; 16K ~60 s.
set -uo pipefail
: "${OUT:?set OUT to the result directory}"
COMMIT=${NOSA_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
TRACES=results/quality/traces_nosa.npz,results/quality/traces_infllmv2.npz

timeout ${TEST_TIMEOUT:-75} python3 -m pytest -q -p no:cacheprovider tests/ops/test_kernels_gpu.py tests/engine/test_gpu.py \
  -k "paged or offload_off or equals_model_forward or graphs_equal_eager or device_cache_and_trace or gather_reads" \
  >"$OUT/gpu_tests.log" 2>&1
echo "gpu tests exit $?"; tail -4 "$OUT/gpu_tests.log"

timeout ${BENCH_TIMEOUT:-330} python3 -m nosa.cli bench decode --layers 4 --prompt 65536 --steps 32 --warmup 4 \
  --equal-memory-dense-batch 20 --max-batch 48 --commit "$COMMIT" --traces "$TRACES" \
  --equal-configs dense:off,nosa:on:traces,infllmv2:on:traces,nosa:on:model,infllmv2:on:model,nosa:off:traces,infllmv2:off:traces,nosa:off:model,infllmv2:off:model,nosa:on:cache128:traces \
  --profile "$OUT/decode_64k_profile.txt" --name "$OUT/decode_64k_equal_memory" >"$OUT/decode_64k_equal_memory.log" 2>&1
echo "64K exit $?"; tail -14 "$OUT/decode_64k_equal_memory.log"

timeout ${FIXED_TIMEOUT:-80} python3 -m nosa.cli bench decode --layers 4 --prompt 16384 --batch 16 --steps 64 --warmup 4 \
  --commit "$COMMIT" --name "$OUT/decode_16k_onecopy" >"$OUT/decode_16k_onecopy.log" 2>&1
echo "16K exit $?"; tail -7 "$OUT/decode_16k_onecopy.log"
