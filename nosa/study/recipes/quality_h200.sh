#!/usr/bin/env bash
# The quality study (issue 9) on one H200, from the repository root, in at most ~9 minutes wall time:
#   OUT=<results dir> bash nosa/study/recipes/quality_h200.sh
# Runs `nosa study quality --config h200` (nosa/study/presets.py): builds the stdlib corpus; trains one
# dense model on the whole GPU through six shared phases, chained in one process (copy drill alone at 64
# tokens, ~60 s; drill + passkey rows at 256 and passkey/NIAH rows at 512 tokens, ~20 s each; the mixture
# with drill rows at 2K, ~45 s, at 4K, ~30 s, and at 8K, ~45 s; ~14 s start-up once); scores those weights
# on passkey and multikey_niah (shared_eval, in the background); continues dense, InfLLM-v2, DMA and NOSA
# from them at 16K as four concurrent processes (same data, 220 steps, schedule, seed; ~176 s, <= 190 s +
# start-up);
# evaluates the four concurrently (perplexity by position, task accuracy at 4K-32K, locality of 256 decode
# steps through the engine at 16K and 32K) until the study's budget (535 s) minus 20 s; then writes into $OUT:
#   summary.json loss.png accuracy.png locality.png traces_nosa.npz traces_infllmv2.npz logs.tar.gz
# Overridable: P (preset or YAML, default h200), W (work dir for checkpoints, default /tmp/nosa_study_work).
# Two calls on one warm machine (a curriculum longer than one call): STOP_AFTER=K trains phases 0..K and
# brings back only logs.tar.gz; the next call with RESUME=1 (same P and W) trains the rest and evaluates.
# SEED=N: another run of the same recipe (the data seed: model initialisation and rows); give it to both calls.
# The outer `timeout` is only a last resort (the study stops itself); if the study dies before packing,
# the logs are packed here so something still comes back.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # keeps packages installed elsewhere (e.g. /tmp/site wheels)
: "${OUT:?set OUT to the results directory}"
P=${P:-h200}; W=${W:-/tmp/nosa_study_work}
mkdir -p "$OUT"
G=/tmp/nosa_study_gpu.csv
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 5 > "$G" 2>&1 &
MON=$!
export NOSA_STUDY_ATTACH=$G
export NOSA_COMMIT=${NOSA_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}
# Leftovers of an earlier call on this machine (the study's children run in their own sessions, so an outer
# kill does not reach them) must not write into the work dir beside this call's processes. The pattern is
# anchored at the Python executable: unanchored, it also matched the calling shell whenever its command line
# named one of these modules (a `python3 -c "import nosa.study.cli"` check before this script), and killed it.
STUDY_PROCS='^[^ ]*python[0-9.]* -m nosa\.(train\.cli|study\.(cli|train_chain|evaluate|shared_eval))'
pkill -9 -f "$STUDY_PROCS" 2>/dev/null
EXTRA=()
[ -n "${STOP_AFTER:-}" ] && EXTRA+=(--stop-after-phase "$STOP_AFTER")
[ -n "${RESUME:-}" ] && EXTRA+=(--resume)
[ -n "${SEED:-}" ] && EXTRA+=(--seed "$SEED")
timeout -s KILL 565 python3 -m nosa.study.cli quality --config "$P" --out-dir "$OUT" --work-dir "$W" "${EXTRA[@]}" > /tmp/nosa_study.log 2>&1
RC=$?
pkill -9 -f "$STUDY_PROCS" 2>/dev/null
kill $MON 2>/dev/null
if [ ! -f "$OUT/logs.tar.gz" ]; then
  cp /tmp/nosa_study.log "$G" "$W/logs/" 2>/dev/null
  tar -czf "$OUT/logs.tar.gz" -C "$W" logs 2>/dev/null || tar -czf "$OUT/logs.tar.gz" -C /tmp nosa_study.log
fi
echo "study exit status $RC"
tail -n 8 /tmp/nosa_study.log
ls -la "$OUT"
