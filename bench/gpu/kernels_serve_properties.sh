#!/usr/bin/env bash
# One GPU call (<= ~9.5 min wall) for when the quality study's two calls do not fit the device time left:
# 1. kernels (issue 11): the GPU kernel tests (the descriptor path's bf16 rule test among them), then
#    `nosa bench kernels` at 4K..128K with the tensor-descriptor A/B (nosa_*_desc_ms) beside the pointer
#    loads; kernels.json is rewritten after every length, so a run cut short keeps what it measured.
# 2. serving (issue 12): `nosa bench serve`, 32 streaming clients, offload on and off, with the warm-up
#    counters (where a slow start goes) recorded apart from the measured load (serve.json).
# 3. property tests (issue 13): tests/test_properties.py under the nightly profile (fresh random cases, the
#    engine on the GPU) at NOSA_HYPOTHESIS_SCALE (default 2) in what time is left.
# Writes into $OUT: kernels.json, serve.json, logs.tar.gz (every log: at most 8 files come back).
set -uo pipefail
: "${OUT:?set OUT to the result directory}"
TOTAL=${TOTAL:-560}
. "$(dirname "$0")/budget.sh"
timeout 100 python3 -m pytest -q -x -p no:cacheprovider tests/ops/test_kernels_gpu.py >"$OUT/kernel_tests_gpu.log" 2>&1
echo "gpu kernel tests: exit $? ($(tail -1 "$OUT/kernel_tests_gpu.log")) at $(elapsed) s"
timeout 230 python3 -m nosa.cli bench kernels --lengths 4096 16384 32768 65536 131072 --sweep-lengths 32768 \
  --out-dir "$OUT" --name kernels >"$OUT/bench_kernels.log" 2>&1
echo "bench kernels exit $? at $(elapsed) s"; tail -14 "$OUT/bench_kernels.log"
timeout $(left 130) python3 -m nosa.cli bench serve --shape demo --clients 32 --requests 128 \
  --prompt-len 256:2048 --output-len 32:256 --max-num-seqs 32 --offload on,off --out-dir "$OUT" >"$OUT/serve.log" 2>&1
echo "serve exit $? at $(elapsed) s"; tail -12 "$OUT/serve.log"
NOSA_HYPOTHESIS_PROFILE=nightly NOSA_HYPOTHESIS_SCALE=${NOSA_HYPOTHESIS_SCALE:-2} timeout $(left 15) \
  python3 -m pytest -q -p no:cacheprovider tests/test_properties.py -rA --durations=10 >"$OUT/properties_nightly_gpu.log" 2>&1
echo "nightly properties exit $? at $(elapsed) s"; grep -E "passed|failed|Falsifying|Error" "$OUT/properties_nightly_gpu.log" | tail -8
(cd "$OUT" && tar -czf logs.tar.gz *.log && rm -f *.log)
ls -la "$OUT"
