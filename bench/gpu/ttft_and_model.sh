#!/usr/bin/env bash
# GPU run for issue 10 items 5 and 4b (~3 min). Writes into $OUT:
#  ttft_small.json: time to first token of 4 short requests (128 tokens) queued behind an 8192-token prompt
#    while 8 requests decode, "small" shape (0.2B, block 64), offload on, per prefill schedule
#    prefill_chunk:max_prefill_tokens; 16384:16384 prefills the long prompt in one step (as before this work).
#  model_decode_small.json: `nosa bench decode --model DIR` on a saved small-shape model (random weights),
#    4096-token prompts, batch 8, offload on and off: TTFT, prefill and decode tokens/s, device memory.
# Each step writes its file as it goes, so a run cut short keeps what it measured.
set -euo pipefail
: "${OUT:?set OUT to the output directory}"
python -m nosa.cli bench ttft --shape small --device cuda --offload on --background 8 --background-prompt 256 \
  --long-prompt 8192 --short 4 --short-prompt 128 --short-output 8 --reps 3 \
  --schedules 16384:16384,512:2048,256:1024,1024:4096 --out-dir "$OUT" --name ttft_small
MODEL_DIR="$(mktemp -d)"
python -c "import sys; from nosa.bench.shapes import build_model, save_model; save_model(build_model('small'), sys.argv[1])" "$MODEL_DIR"
python -m nosa.cli bench decode --model "$MODEL_DIR" --device cuda --prompt 4096 --batch 8 --steps 64 --warmup 4 \
  --offload on,off --out-dir "$OUT" --name model_decode_small
rm -rf "$MODEL_DIR"
