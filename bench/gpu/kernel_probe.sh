#!/usr/bin/env bash
# One GPU call (TOTAL=240 s), issue 11: bench/gpu/kernel_probe.py at 32K and 64K (the forward and dq kernels
# at other pipeline depths, beside the default).
# (Correctness of a winning variant is for a later call: the probe compares its outputs with the default.)
# Writes into $OUT: kernel_probe.json, logs.tar.gz.
TOTAL=${TOTAL:-240}
. "$(dirname "$0")/call.sh"
mkdir -p "$OUT/logs"
timeout -k 5 $(left 60) python3 bench/gpu/kernel_probe.py --out "$OUT/kernel_probe.json" >"$OUT/logs/kernel_probe.log" 2>&1
echo "probe exit $? ($(elapsed) s)"; grep -v Warn "$OUT/logs/kernel_probe.log" | tail -12 | cut -c1-400
(cd "$OUT" && tar -czf logs.tar.gz logs && rm -rf logs)
ls "$OUT"
