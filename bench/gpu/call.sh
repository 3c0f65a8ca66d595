# Sourced first by a GPU call script: strict mode, $OUT required, the commit to record (NOSA_COMMIT, else
# HEAD), the call's time budget (TOTAL seconds, 560 unless set before: budget.sh's `left` and `elapsed`) and
# the carried wheels (wheels.sh).
set -uo pipefail
: "${OUT:?set OUT to the result directory}"
COMMIT=${NOSA_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
TOTAL=${TOTAL:-560}
. "$(dirname "${BASH_SOURCE[0]}")/budget.sh"
. "$(dirname "${BASH_SOURCE[0]}")/wheels.sh"
