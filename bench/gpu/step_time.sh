#!/usr/bin/env bash
# One GPU call (~3-4 min): where the decode step's time goes at the headline's trace-driven NOSA row (issue 10:
# ~3.9 ms a step against ~2.4 ms of kernels). 64K-token prompts, 8B layer shape with 4 layers, batch 48 (the
# budget of 20 one-copy dense sequences, capped at 48), offload on, device cache 128 blocks, CUDA graphs,
# results/quality/traces_nosa.npz replayed.
# 1. GPU tests of what the change touched (~40 s): the trace replay under graphs, on the device and from the
#    host (with the device cache, offload on and off), graphs == eager with the default kernels, and the fused
#    RMSNorm / rotary kernels (2x rule, CUDA graph).
# 2. bench/gpu/step_time.py (~90-120 s before the third variant, so ~140-180 s now, Triton compiles included):
#    one install, the replay on the host, on the device, and on the device with RMSNorm and rotary unfused
#    (the PyTorch reference: what the fused kernels save), alternating A B C A B C; per variant the wall step time, then a few
#    graphed steps under torch.profiler with CPU + CUDA activity split into kernel time, GPU busy time, GPU
#    idle inside the step and outside it (host before the launch, after the sync); eager kernel table last.
# Writes $OUT/step_time.json, $OUT/step_time_kernels.txt, $OUT/step_time.log (3 files).
set -uo pipefail
: "${OUT:?set OUT to the result directory}"
export NOSA_COMMIT=${NOSA_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
status=0
LOG="$OUT/step_time.log"

timeout ${TEST_TIMEOUT:-100} python3 -m pytest -q -p no:cacheprovider -m gpu -rA tests/engine/test_gpu.py tests/ops/test_kernels_gpu.py \
  -k "device_cache_and_trace or graphs_equal_eager or rms or rotary or loading_misses" >"$LOG" 2>&1; rc=$?; [ $rc -eq 0 ] || status=1
echo "gpu tests exit $rc"; grep -E "FAILED|ERROR|passed|failed" "$LOG" | tail -6

timeout ${BENCH_TIMEOUT:-300} python3 bench/gpu/step_time.py "$OUT" >>"$LOG" 2>&1; rc=$?; [ $rc -eq 0 ] || status=1
echo "step_time exit $rc"; grep -v "Warn\|_warn\|USDT" "$LOG" | tail -12
ls "$OUT"
exit $status
