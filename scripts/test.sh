#!/usr/bin/env bash
# Set up (idempotent) and run every test: unit, snapshot, bad-input corpus, hostlist oracle,
# and the end-to-end tests on the local 3-node Slurm cluster (brought up here, torn down at
# the end, also on failure).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
T0=$(date +%s)
bash scripts/setup.sh
bash scripts/setup-vllm.sh
T1=$(date +%s)
export RAY_LAUNCH_VENV=$ROOT/.venv
bash slurm/testbed/up.sh >/dev/null
trap 'bash slurm/testbed/down.sh >/dev/null 2>&1 || true' EXIT
# unit and integration tests (in parallel), then the end-to-end tests (#[ignore]d in a plain
# `cargo test`) one at a time: they share the three test nodes
cargo test --no-fail-fast 2>&1
cargo test --no-fail-fast --test e2e --test vllm_e2e -- --ignored --test-threads=1 2>&1
T2=$(date +%s)
echo "timing: setup $((T1 - T0)) s, tests $((T2 - T1)) s"
