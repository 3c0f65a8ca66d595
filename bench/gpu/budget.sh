# Sourced by the GPU call scripts: the call's time budget. Set TOTAL (seconds the script may use) first.
#   left [reserve]  seconds left of TOTAL minus reserve, never below 1 (`timeout 0` would mean no limit)
#   elapsed         seconds since the script started
START=$(date +%s)
left() { local s=$(( TOTAL - ($(date +%s) - START) - ${1:-0} )); echo $(( s > 1 ? s : 1 )); }
elapsed() { echo $(( $(date +%s) - START )); }
