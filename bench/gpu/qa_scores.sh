#!/usr/bin/env bash
# One GPU call (~35-50 s wall, <= 60 s: mostly Triton compiles): the query-aware block score kernel at decode, fused (before) vs split
# (`score_chunks`' choice, and a sweep of chunk counts), at 64K tokens x batch 48 and 16K x batch 16 (8B
# layer shape, bf16), timed with CUDA events (eager and CUDA-graph replays), achieved GB/s, and the checks
# split == fused == float32 reference (tolerance, -inf pattern, selections differing only at near-ties).
# Then the GPU tests of the split path. Writes into $OUT: qa_scores.json (machine header, parameters,
# one row per shape), bench_qa_scores.log, qa_scores_tests_gpu.log.
set -uo pipefail
: "${OUT:?set OUT to the result directory}"
start=$(date +%s)
timeout 42 python3 -m nosa.cli bench qa-scores --shapes 65536:48 16384:16 --out-dir "$OUT" --name qa_scores \
  >"$OUT/bench_qa_scores.log" 2>&1
echo "bench exit $?"
tail -6 "$OUT/bench_qa_scores.log"
timeout 16 python3 -m pytest -q -x tests/ops/test_kernels_gpu.py -k split_block_scores >"$OUT/qa_scores_tests_gpu.log" 2>&1
echo "gpu tests: exit $? ($(tail -1 "$OUT/qa_scores_tests_gpu.log"))"
echo "wall $(( $(date +%s) - start )) s"
