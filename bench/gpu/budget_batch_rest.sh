#!/usr/bin/env bash
# One GPU call (<= ~9.5 min wall, TOTAL=560), issue 10, after pinning_headline.sh (2026-12-07): what that call
# could not finish, the 16K comparison on the one-copy engine, and the first GPU run of per-sequence positions
# in selection (commit 8ec9ef9: rows at different lengths are selected in one call, no longer R x the work).
# 1. tests/engine/test_gpu.py: engine == model forward (rows at different lengths, so the per-sequence
#    selection on the GPU), the decode selection against select_for_queries row by row, the footprint
#    tests, the FUSE_GATHER exactness tests (fp32 and bf16, with and without the device cache: they decide
#    whether FUSE_GATHER becomes the default) and the one-KV-head engine cases.
# 2. `nosa bench serve` as serve_h100.json ran it (32 clients, prompts 256-2048, offload on): mixed lengths, so
#    every decode step took the R x R selection then; the same load now.
# 3. The rest of the 64K headline with the budget setting the batch (--max-batch 256, the device budget of 20
#    one-copy dense sequences): the random weights' selections offloaded (issue 10's 1.5x target), the gather
#    path beside FUSE_GATHER, the on-GPU sparse rows, each config's engine collected before the next maps its
#    host store.
# 4. 16K prompts at the device budget of 7 one-copy dense sequences (what decode_8b_equal_memory.json's 4
#    two-copy rows were charged), the budget setting every batch: issue 10's "16K comparison re-measured".
# Writes into $OUT: serve.json, decode_64k_budget_batch_2.json, decode_16k_equal_memory.json, logs.tar.gz.
. "$(dirname "$0")/call.sh"
mkdir -p "$OUT/logs"
TRACES=results/quality/traces_nosa.npz,results/quality/traces_infllmv2.npz

timeout -k 10 $(left 430) python3 -m pytest -q -p no:cacheprovider -m gpu -rA --tb=short tests/engine/test_gpu.py \
  -k "engine_equals_model_forward or decode_selection or loading_misses or device_kv_does_not_grow or offload_off_allocates or one_kv_head" \
  >"$OUT/logs/gpu_engine_tests.log" 2>&1
echo "engine tests exit $? ($(elapsed) s)"; grep -E "^(FAILED|ERROR)|passed|failed|assert" "$OUT/logs/gpu_engine_tests.log" | tail -12

timeout -k 10 $(left 360) python3 -m nosa.cli bench serve --shape demo --clients 32 --requests 128 --prompt-len 256:2048 \
  --output-len 32:256 --max-num-seqs 32 --offload on --out-dir "$OUT" >"$OUT/logs/serve.log" 2>&1
echo "serve exit $? ($(elapsed) s)"; grep -iE "tok/s|itl|ttft|error" "$OUT/logs/serve.log" | tail -6

timeout -k 10 $(left 110) python3 -m nosa.cli bench decode --layers 4 --prompt 65536 --steps 32 --warmup 4 \
  --equal-memory-dense-batch 20 --max-batch 256 --commit "$COMMIT" --traces "$TRACES" \
  --equal-configs dense:off,nosa:on:cache128:model:fusegather,infllmv2:on:cache128:model:fusegather,nosa:on:cache128:model:gather,nosa:off:traces,infllmv2:off:traces,nosa:off:model,infllmv2:off:model,infllmv2:on:cache128:traces:gather,nosa:on:traces:fusegather \
  --name "$OUT/decode_64k_budget_batch_2" >"$OUT/logs/decode_64k.log" 2>&1
echo "64K budget-set batch exit $? ($(elapsed) s)"; grep -v "^wrote\|Warn\|_warn" "$OUT/logs/decode_64k.log" | tail -12

timeout -k 10 $(left 10) python3 -m nosa.cli bench decode --layers 4 --prompt 16384 --steps 48 --warmup 4 \
  --equal-memory-dense-batch 7 --max-batch 256 --commit "$COMMIT" --traces "$TRACES" \
  --equal-configs dense:off,nosa:on:cache128:traces:fusegather,infllmv2:on:cache128:traces:fusegather,nosa:on:cache128:model:fusegather,infllmv2:on:cache128:model:fusegather,nosa:off:traces,infllmv2:off:traces \
  --name "$OUT/decode_16k_equal_memory" >"$OUT/logs/decode_16k.log" 2>&1
echo "16K equal memory exit $? ($(elapsed) s)"; grep -v "^wrote\|Warn\|_warn" "$OUT/logs/decode_16k.log" | tail -9
(cd "$OUT" && tar -czf logs.tar.gz logs && rm -rf logs)
ls "$OUT"
