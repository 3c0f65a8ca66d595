#!/usr/bin/env bash
# The committed GPU run (results/train/): on one machine with 2 GPUs, from the repository root,
#   OUT=<results dir> bash nosa/train/recipes/gpu_small.sh
# 1. checks the Triton kernels against the reference for the run's shape (falls back to the reference)
# 2. builds the stdlib corpus
# 3. DDP equivalence: 2 processes x batch 2 vs 1 process x batch 4, same rows, fp32 -> ddp_equivalence.json
# 4. trains nosa/configs/gpu_small.yaml on 2 GPUs for about TB seconds (steps sized from the measured step time)
# 5. nosa eval on the final checkpoint -> eval/results.json + .png
# Every stage logs to $L and later stages run even when an earlier one failed (partial results).
# A device call brings back at most 8 files, so $OUT gets 7: the results flat, the logs as one archive
# (refreshed after every stage).
# Overridable for a CPU rehearsal: C (config), DL (DDP check length), TB (train seconds), EV (eval flags).
export PYTHONPATH=$PWD
C=${C:-nosa/configs/gpu_small.yaml}; DL=${DL:-2048}; TB=${TB:-100}
EV=${EV:---ppl-len 4096 --ppl-rows 16 --lengths 2048,4096,8192 --depths 0,0.5,1 --samples 3 --locality-prompt 4096 --locality-steps 96}
: "${OUT:?set OUT to the results directory}"
L=/tmp/nosa_logs; mkdir -p "$L" "$OUT"
pack() { tar -czf "$OUT/logs.tar.gz" -C "$L" . ; }
date -u > "$L/times.txt"
nvidia-smi -L > "$L/gpus.txt" 2>&1
python3 -m nosa.train.backend_check --config "$C" --out "$OUT/backend_check.json" > "$L/backend.log" 2>&1 \
  || export NOSA_BACKEND=reference
echo "backend=${NOSA_BACKEND:-auto}" > "$L/choices.txt"
python3 -m nosa.train.cli --config "$C" --build-corpus > "$L/corpus.log" 2>&1
date -u >> "$L/times.txt"; pack

rm -rf runs/ddp1 runs/ddp2
T="--config $C --no-progress --precision fp32 --max-steps 4 --warmup-steps 2 --seq-len $DL --set val_every=0"
NOSA_BACKEND=reference torchrun --standalone --nproc_per_node=2 -m nosa.train.cli $T --micro-batch-size 2 --out-dir runs/ddp2 \
  > "$L/ddp2.log" 2>&1
NOSA_BACKEND=reference python3 -m nosa.train.cli $T --micro-batch-size 4 --out-dir runs/ddp1 > "$L/ddp1.log" 2>&1
python3 -m nosa.train.compare runs/ddp1/metrics.jsonl runs/ddp2/metrics.jsonl --out "$OUT/ddp_equivalence.json" \
  --note "a: 1 process x batch 4; b: 2 processes (DDP) x batch 2; same rows; fp32; reference attention; seq $DL" \
  > "$L/compare.log" 2>&1
date -u >> "$L/times.txt"; pack

# Steps for ~TB seconds: the check timed batch 2 on one GPU; a training step is batch 4 per GPU plus DDP.
S=$(python3 -c "import json;r=json.load(open('$OUT/backend_check.json'));b='triton' if r['ok'] else 'reference';print(max(40,min(2000,int($TB/(2.3*r[b+'_step_s'])))))" 2>/dev/null || echo 200)
echo "max_steps=$S" >> "$L/choices.txt"
R=$(python3 -c "import yaml;print(yaml.safe_load(open('$C'))['out_dir'])")
CORPUS=$(python3 -c "import yaml;print(yaml.safe_load(open('$C'))['corpus_dir'])")
rm -rf "$R"
torchrun --standalone --nproc_per_node=2 -m nosa.train.cli --config "$C" --max-steps "$S" --time-limit-s "$TB" --no-progress \
  > "$L/train.log" 2>&1
cp "$R/metrics.jsonl" "$OUT/train_metrics.jsonl"; cp "$R/loss.png" "$OUT/train_loss.png"; cp "$R/train_config.json" "$L/"
date -u >> "$L/times.txt"; pack

python3 -m nosa.eval.cli --model "$R/checkpoints/$(cat "$R/checkpoints/latest")" --corpus-dir "$CORPUS" $EV \
  --out "$OUT/eval_results.json" > "$L/eval.log" 2>&1
date -u >> "$L/times.txt"; pack
tail -n 2 "$L"/*.log "$L"/*.txt
