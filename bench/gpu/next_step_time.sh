#!/usr/bin/env bash
# One GPU call (TOTAL=540 s), for the session after 2026-12-07: the changes made after that day's H200 run,
# measured where they act.
# 1. The split scoring path at one query token per program (ec179e1; 0.194 -> 0.140 ms alone): the 64K
#    budget-set decode step, dense baseline first, NOSA with traces profiled (--profile), InfLLM-v2 at its
#    strongest configuration of decode_64k_micro_batches_h200.json (2 micro-batches), then both with a
#    256-block cache (never measured at the budget-set batch: fewer rows, more hits; a stronger InfLLM-v2
#    would change the 2x comparison), NOSA with the random weights' selections. Compare the ratios with that
#    file's (same card kind; other machine, other run).
# 2. The forward with descriptors at 2 stages (ec179e1; 6-7% on the forward kernel alone): `nosa bench
#    kernels` at 32K and 64K, so the whole forward+backward is timed with it against SDPA and fla.
# 0. (first, ~30 s) bench/gpu/scoring_probe.py: the split scoring at one token per program against its key
#    chunks per row (2-16; the engine takes 3 at 121 rows).
# Writes into $OUT: scoring_chunks.json, decode_64k_step.json, decode_64k_step_profile.txt, kernels_stages.json,
# logs.tar.gz.
TOTAL=${TOTAL:-540}
. "$(dirname "$0")/call.sh"
mkdir -p "$OUT/logs"
TRACES=results/quality/traces_nosa.npz,results/quality/traces_infllmv2.npz

timeout -k 5 70 python3 bench/gpu/scoring_probe.py --out "$OUT/scoring_chunks.json" >"$OUT/logs/scoring_probe.log" 2>&1
echo "probe exit $? ($(elapsed) s)"; grep "^chunks" "$OUT/logs/scoring_probe.log" | cut -c1-200

timeout -k 10 $(left 170) python3 -m nosa.cli bench decode --layers 4 --prompt 65536 --steps 32 --warmup 4 \
  --equal-memory-dense-batch 20 --max-batch 256 --commit "$COMMIT" --traces "$TRACES" \
  --equal-configs dense:off,nosa:on:cache128:traces:fusegather,infllmv2:on:cache128:traces:fusegather:mb2,infllmv2:on:cache256:traces:fusegather:mb2,nosa:on:cache256:traces:fusegather,nosa:on:cache128:model:fusegather \
  --profile "$OUT/decode_64k_step_profile.txt" --name "$OUT/decode_64k_step" >"$OUT/logs/decode_64k.log" 2>&1
echo "64K exit $? ($(elapsed) s)"; grep -v "^wrote\|Warn\|_warn" "$OUT/logs/decode_64k.log" | tail -6

timeout -k 10 $(left 8) python3 -m nosa.cli bench kernels --lengths 32768 65536 --sweep-lengths --reps 6 --skip-decode \
  --out-dir "$OUT" --name kernels_stages >"$OUT/logs/bench_kernels.log" 2>&1
echo "kernels exit $? ($(elapsed) s)"; grep -v Warn "$OUT/logs/bench_kernels.log" | tail -4 | cut -c1-300
(cd "$OUT" && tar -czf logs.tar.gz logs && rm -rf logs)
ls "$OUT"
