#!/usr/bin/env bash
# One GPU call (<= 150 s wall), issue 10 item 3: the fused spill step (nosa/ops/kernels/spill.py).
# 1. The GPU tests touching it (<= 55 s): the kernel on CUDA == the reference at the 64K shape (K 64, E 32/64,
#    bs 64, D 128, bf16), eager and replayed from a captured CUDA graph; the engine with the kernel == the
#    engine with the reference spill step under graphs (offload on and off); device cache + trace replay
#    under graphs == model forward.
# 2. `nosa bench decode` at 64K-token prompts, 4 of the 8B shape's layers, every config given the device
#    budget of 20 one-copy dense sequences, batch capped at 48, trace-driven (results/quality/traces_nosa.npz):
#    NOSA offloaded with the selection only, and with 96 and 128 device cache blocks (the spill kernel), each
#    profiled (spill_profile.txt, spill_profile_1.txt, spill_profile_2.txt: look for _spill_plan_kernel and
#    _spill_copy_kernel beside _gather_blocks_kernel). Before the kernel (commit 11f1133, PyTorch spill step):
#    9,794 tokens/s without the cache, 8,834 with 128 blocks.
# Estimate: tests ~35-55 s (6 tests; Triton compiles on a bare machine), bench ~25-30 s per config + setup;
# ~130-145 s in all.
set -uo pipefail
: "${OUT:?set OUT to the result directory}"
COMMIT=${NOSA_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
START=$(date +%s)

timeout ${TEST_TIMEOUT:-55} python3 -m pytest -v -p no:cacheprovider -m gpu tests/ops/test_spill.py tests/engine/test_gpu.py \
  -k "spill or device_cache" >"$OUT/spill_gpu_tests.log" 2>&1
echo "spill gpu tests exit $? ($(( $(date +%s) - START )) s)"; grep -E "passed|failed|PASSED|FAILED|ERROR" "$OUT/spill_gpu_tests.log" | tail -10

# The bench gets what is left of 145 s (the result file is rewritten after each config, so a cut run keeps
# the configs it finished).
timeout ${BENCH_TIMEOUT:-$(( 145 - ($(date +%s) - START) ))} python3 -m nosa.cli bench decode --layers 4 --prompt 65536 --steps 32 --warmup 4 \
  --equal-memory-dense-batch 20 --max-batch 48 --commit "$COMMIT" --traces results/quality/traces_nosa.npz \
  --equal-configs nosa:on:traces,nosa:on:cache96:traces,nosa:on:cache128:traces \
  --profile "$OUT/spill_profile.txt" --name "$OUT/decode_64k_spill" >"$OUT/decode_64k_spill.log" 2>&1
echo "64K spill bench exit $? ($(( $(date +%s) - START )) s)"; grep -v "^wrote\|Warn\|_warn" "$OUT/decode_64k_spill.log" | tail -6
for f in "$OUT"/spill_profile*.txt; do
  [ -f "$f" ] && { echo "== $(basename "$f")"; grep -E "spill|gather_blocks|Self CUDA time total" "$f" | cut -c1-160 | head -6; }
done
# At most 8 files come back from a call: the logs travel as one archive.
(cd "$OUT" && tar -czf logs.tar.gz *.log && rm -f *.log)
ls "$OUT"
