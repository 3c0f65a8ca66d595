#!/usr/bin/env bash
# One GPU call (<= 9.5 min wall) after the fused spill step, the split query-aware scores and the fast
# generate landed (issues 10 and 12):
# 1. GPU tests of what changed: the engine (engine == forward in every attn_mode, graphs == eager, offload
#    on == off, device cache + trace replay: tests/engine/test_gpu.py), the spill kernel (tests/ops/test_spill.py)
#    and every kernel against its reference (tests/ops/test_kernels_gpu.py, the split scores included).
# 2. `nosa bench qa-scores`: fused vs split query-aware scores at 64K x 48 and 16K x 16 (qa_scores.json).
# 3. The headline, bench/results/decode_64k_equal_memory.json (configs as in decode_64k_equal_memory.sh, with
#    the device cache at 128 blocks now on the fused spill kernel) and its kernel profile.
# 4. What time is left: `nosa bench generate` (model.generate vs the engine at batch 1, demo model, 4K prompt).
set -uo pipefail
: "${OUT:?set OUT to the result directory}"
COMMIT=${NOSA_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
TOTAL=${TOTAL:-560}
. "$(dirname "$0")/budget.sh"
status=0
TRACES=results/quality/traces_nosa.npz,results/quality/traces_infllmv2.npz

timeout ${TEST_TIMEOUT:-170} python3 -m pytest -q -p no:cacheprovider -m gpu -rA tests/engine/test_gpu.py tests/ops/test_spill.py \
  tests/ops/test_kernels_gpu.py >"$OUT/gpu_tests.log" 2>&1; rc=$?; [ $rc -eq 0 ] || status=1
echo "gpu tests exit $rc ($(elapsed) s)"; grep -E "FAILED|ERROR|passed|failed" "$OUT/gpu_tests.log" | tail -8

timeout 45 python3 -m nosa.cli bench qa-scores --shapes 65536:48 16384:16 --out-dir "$OUT" --name qa_scores >"$OUT/qa_scores.log" 2>&1; rc=$?; [ $rc -eq 0 ] || status=1
echo "qa-scores exit $rc ($(elapsed) s)"; tail -6 "$OUT/qa_scores.log"

timeout $(left 70) python3 -m nosa.cli bench decode --layers 4 --prompt 65536 --steps 32 --warmup 4 \
  --equal-memory-dense-batch 20 --max-batch 48 --commit "$COMMIT" --traces "$TRACES" \
  --equal-configs dense:off,nosa:on:traces,nosa:on:cache128:traces,infllmv2:on:traces,nosa:on:model,infllmv2:on:model,nosa:off:traces,infllmv2:off:traces,nosa:off:model,infllmv2:off:model \
  --profile "$OUT/decode_64k_profile.txt" --name "$OUT/decode_64k_equal_memory" >"$OUT/decode_64k_equal_memory.log" 2>&1; rc=$?; [ $rc -eq 0 ] || status=1
echo "64K exit $rc ($(elapsed) s)"; grep -v "^wrote\|Warn\|_warn" "$OUT/decode_64k_equal_memory.log" | tail -14

timeout $(left) python3 -m nosa.cli bench generate --shape demo --prompt 4096 --new-tokens 256 --dynamic-new-tokens 16 \
  --repeats 2 --out-dir "$OUT" >"$OUT/generate.log" 2>&1; rc=$?; [ $rc -eq 0 ] || status=1
echo "generate exit $rc ($(elapsed) s)"; tail -6 "$OUT/generate.log"
(cd "$OUT" && tar -czf logs.tar.gz *.log && rm -f *.log)
ls "$OUT"
exit $status
