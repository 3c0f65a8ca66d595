#!/usr/bin/env bash
# GPU run for issue 12 (~3 min): model.generate with NosaCache vs the engine at batch 1, then the serving
# load test with offload on and off. Writes into $OUT: generate_vs_engine.json, serve.json, two server logs.
set -euo pipefail
: "${OUT:?set OUT to the output directory}"
python -m nosa.cli bench generate --shape demo --prompt 4096 --new-tokens 256 --dynamic-new-tokens 16 --repeats 3 --out-dir "$OUT"
python -m nosa.cli bench serve --shape demo --clients 32 --requests 128 --prompt-len 256:2048 --output-len 32:256 \
  --max-num-seqs 32 --offload on,off --out-dir "$OUT"
