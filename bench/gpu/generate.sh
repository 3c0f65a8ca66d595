#!/usr/bin/env bash
# GPU run for issue 12 item 4 (expected ~60-90 s on one H200, most of it Triton compiles and autotuning):
#   1. `nosa bench generate` on the demo model: transformers' model.generate with the NosaCache (its decode
#      step replaying a CUDA graph) beside the engine at batch 1, 4096-token prompt, 256 new tokens, bf16;
#      also the hand-written greedy loop (the step without generate's own overhead) and the DynamicCache path;
#   2. the same without graphs (--eager, 48 tokens) to show what the graph buys;
#   3. the CUDA-only tests: graph replay == eager in every attn_mode, graphs reused across generate calls.
# Writes into $OUT: generate_vs_engine.json, generate_vs_engine_eager.json, generate_logs.tar.gz (logs).
set -uo pipefail
: "${OUT:?set OUT to the output directory}"
cd "$(dirname "$0")/../.."
logs="$OUT/generate_logs"
mkdir -p "$logs"
status=0
timeout 120 python -m nosa.cli bench generate --shape demo --prompt 4096 --new-tokens 256 --dynamic-new-tokens 16 \
  --repeats 3 --out-dir "$OUT" 2>&1 | tee "$logs/bench_graphs.txt" || status=1
timeout 60 python -m nosa.cli bench generate --shape demo --prompt 4096 --new-tokens 48 --dynamic-new-tokens 0 \
  --repeats 1 --eager --name generate_vs_engine_eager --out-dir "$OUT" 2>&1 | tee "$logs/bench_eager.txt" || status=1
timeout 100 python -m pytest -q -p no:cacheprovider tests/models/test_decode_step.py -k cuda 2>&1 | tee "$logs/pytest_gpu.txt" \
  || status=1
nvidia-smi > "$logs/nvidia_smi.txt" 2>&1 || true
tar czf "$OUT/generate_logs.tar.gz" -C "$OUT" generate_logs && rm -rf "$logs"
exit $status
