#!/usr/bin/env bash
# Set up (idempotent) and run every test: unit, snapshot, bad-input corpus, hostlist oracle,
# the end-to-end tests on the local 3-node Slurm cluster (brought up here, torn down at the
# end, also on failure), and the install check (the wheel alone, in a fresh venv, runs a job).
#   scripts/test.sh              everything once
#   scripts/test.sh --repeat N   the end-to-end suites N times in a row (also
#                                RAY_LAUNCH_E2E_REPEAT=N), with a tally; fails if any round fails
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
REPEAT=${RAY_LAUNCH_E2E_REPEAT:-1}
while [ $# -gt 0 ]; do
    case "$1" in
        --repeat) REPEAT=${2:-}; shift 2 || shift ;;
        --repeat=*) REPEAT=${1#*=}; shift ;;
        *) echo "error: unknown argument \`$1\`" >&2
           echo "hint: scripts/test.sh [--repeat N]" >&2; exit 2 ;;
    esac
done
case "$REPEAT" in
    ''|*[!0-9]*|0) echo "error: --repeat wants a whole number of rounds >= 1, got \`$REPEAT\`" >&2
                   echo "hint: scripts/test.sh --repeat 5" >&2; exit 2 ;;
esac
T0=$(date +%s)
bash scripts/setup.sh
bash scripts/setup-vllm.sh
T1=$(date +%s)
export RAY_LAUNCH_VENV=$ROOT/.venv
bash slurm/testbed/up.sh >/dev/null
trap 'bash slurm/testbed/down.sh >/dev/null 2>&1 || true' EXIT
# the size rule and lints (clippy.toml: no function over 120 lines in src/)
cargo clippy -q --all-targets -- -D warnings
# unit and integration tests (in parallel), then the end-to-end tests (#[ignore]d in a plain
# `cargo test`) one at a time: they share the three test nodes
cargo test --no-fail-fast 2>&1
failed=0
tally=()
for round in $(seq 1 "$REPEAT"); do
    t=$(date +%s)
    if cargo test --no-fail-fast --test e2e --test security_e2e --test service_e2e --test vllm_e2e -- --ignored --test-threads=1 2>&1; then
        r=ok
    else
        r=FAILED; failed=$((failed + 1))
    fi
    tally+=("e2e round $round/$REPEAT: $r in $(( $(date +%s) - t )) s")
    echo "${tally[-1]}"
done
# the wheel, installed alone into a fresh venv, runs the quickstart's job (scripts/check-install.sh)
t=$(date +%s)
if bash scripts/check-install.sh 2>&1; then install=ok; else install=FAILED; fi
echo "install check (wheel -> fresh venv -> job): $install in $(( $(date +%s) - t )) s"
T2=$(date +%s)
[ "$REPEAT" -gt 1 ] && printf '%s\n' "${tally[@]}" "e2e: $failed of $REPEAT round(s) failed"
echo "timing: setup $((T1 - T0)) s, tests $((T2 - T1)) s"
[ "$failed" = 0 ] && [ "$install" = ok ]
