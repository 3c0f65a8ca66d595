#!/usr/bin/env bash
# One GPU call (<= 4 min wall): `nosa bench decode` at 64K-token prompts, 8B layer shape (4 of 32 layers),
# equal device memory (the budget dense-on-GPU needs for 10 sequences, batch capped at 48 by host RAM as in
# issue 10), first with the trained models' selection traces (trace-driven: results/quality/traces_*.npz),
# then with the random weights' own selections (the worst case), each with the device cache beyond the
# selection (cache128: 128 blocks per (layer, sequence, KV head), from bench/results/cache_sim_traces.json).
# Writes into $OUT: decode_64k_traces.json, decode_64k_random.json (each rewritten after every config, so
# a run cut short keeps what it measured; "complete": false marks a partial file) and their logs.
# Estimate: ~25-30 s per config at 64K (install of 48 synthetic 64K prompts, ~36 steps, Triton compiles in
# the first config of each process): ~170 s + ~60 s, inside the timeouts below.
set -uo pipefail
: "${OUT:?set OUT to the result directory}"
# NOSA_COMMIT first: the GPU machine's copy of the tree can carry stale git metadata.
COMMIT=${NOSA_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
COMMON=(--layers 4 --prompt 65536 --steps 32 --warmup 4 --equal-memory-dense-batch 10 --max-batch 48 --commit "$COMMIT")
TRACES=results/quality/traces_nosa.npz,results/quality/traces_infllmv2.npz

# The device cache (cache128) runs last in each list: its spill path is the newest code, and a CUDA error in
# it would end the process; the rows before it are then already written.
timeout ${TRACE_TIMEOUT:-165} python3 -m nosa.cli bench decode "${COMMON[@]}" --traces "$TRACES" \
  --equal-configs dense:off,nosa:on,infllmv2:on,nosa:off,infllmv2:off,nosa:on:cache128 \
  --name "$OUT/decode_64k_traces" >"$OUT/decode_64k_traces.log" 2>&1
echo "trace-driven exit $?"; tail -8 "$OUT/decode_64k_traces.log"

timeout ${RANDOM_TIMEOUT:-70} python3 -m nosa.cli bench decode "${COMMON[@]}" \
  --equal-configs dense:off,nosa:on,infllmv2:on,nosa:on:cache128 \
  --name "$OUT/decode_64k_random" >"$OUT/decode_64k_random.log" 2>&1
echo "random-weights exit $?"; tail -6 "$OUT/decode_64k_random.log"
