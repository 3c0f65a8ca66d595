#!/usr/bin/env bash
# One GPU call (<= 6 min wall), issues 10, 12, 13:
# 1. The engine's GPU tests (tests/engine/test_gpu.py: engine == forward in every attn_mode, graphs == eager,
#    offload on == off, one copy, device cache + trace replay, graphs surviving host-store growth).
# 2. `nosa bench serve`: the OpenAI-compatible server under 32 concurrent streaming clients, 128 requests,
#    prompts 256-2048, outputs 32-256 tokens, offload on and off (serve.json, server logs).
# 3. Where the device cache's time goes: 64K trace-driven NOSA offloaded with the selection only and with
#    96 / 128 cache blocks, each profiled (decode_64k_cache.json, decode_64k_cache_profile*.txt).
set -uo pipefail
: "${OUT:?set OUT to the result directory}"
COMMIT=${NOSA_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}

timeout ${TEST_TIMEOUT:-170} python3 -m pytest -q -p no:cacheprovider -m gpu tests/engine/test_gpu.py -rA \
  >"$OUT/gpu_engine_tests.log" 2>&1
echo "engine gpu tests exit $?"; grep -E "passed|failed|PASSED|FAILED|ERROR" "$OUT/gpu_engine_tests.log" | tail -20

timeout ${SERVE_TIMEOUT:-130} python3 -m nosa.cli bench serve --shape demo --clients 32 --requests 128 \
  --prompt-len 256:2048 --output-len 32:256 --max-num-seqs 32 --offload on,off --out-dir "$OUT" >"$OUT/serve.log" 2>&1
echo "serve exit $?"; tail -12 "$OUT/serve.log"

timeout ${CACHE_TIMEOUT:-110} python3 -m nosa.cli bench decode --layers 4 --prompt 65536 --steps 32 --warmup 4 \
  --equal-memory-dense-batch 20 --max-batch 48 --commit "$COMMIT" \
  --traces results/quality/traces_nosa.npz --equal-configs dense:off,nosa:on:traces,nosa:on:cache96:traces,nosa:on:cache128:traces \
  --profile "$OUT/decode_64k_cache_profile.txt" --name "$OUT/decode_64k_cache" >"$OUT/decode_64k_cache.log" 2>&1
echo "cache exit $?"; grep -v "^wrote\|Warn\|_warn" "$OUT/decode_64k_cache.log" | tail -6
# At most 8 files come back from a call: the logs travel as one archive.
(cd "$OUT" && tar -czf logs.tar.gz *.log && rm -f *.log)
ls "$OUT"
