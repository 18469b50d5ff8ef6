#!/usr/bin/env bash
# Install check, as a cluster user would install: build the wheel (scripts/package.sh), install
# it alone into a fresh venv (no index, no source tree on its PATH), then check the binary
# (version with this commit, completions, man page), the Python face (tests/python), and run
# the quickstart's job on the local test cluster with the installed `ray-launch` from the PATH:
# wait for it with ray_launch.wait(), ask it through ray_launch.openai_client(), scancel it,
# and check every node said its processes are gone. Needs the test cluster up
# (slurm/testbed/up.sh) and scripts/setup-vllm.sh done; scripts/test.sh calls it.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
log() { printf '[check-install %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
fail() { printf 'check-install: FAILED: %s\n' "$*" >&2; exit 1; }

WHEEL=$(bash scripts/package.sh | tail -1)
V=$ROOT/.cache/install-check
rm -rf "$V"
python3 -m venv "$V"
"$V/bin/pip" install -q --disable-pip-version-check --no-index --no-deps "$WHEEL"
log "installed $WHEEL into $V"

# ---- the binary: on the venv's PATH, its version names this commit
ver=$("$V/bin/ray-launch" --version)
commit=$(git rev-parse --short=12 HEAD)
case "$ver" in *"commit $commit"*) ;; *) fail "--version says \`$ver\`, not commit $commit" ;; esac
for sh in bash zsh fish; do
    "$V/bin/ray-launch" completions $sh | grep -q "config" || fail "no $sh completions"
done
"$V/bin/ray-launch" man | grep -q '^\.TH' || fail "no man page"
log "binary: $ver; completions bash/zsh/fish; man page"

# ---- the Python face, from the installed package (not this tree's python/)
(cd "$V" && "$V/bin/python" -m unittest discover -q -s "$ROOT/tests/python") || fail "tests/python"
SITE=$("$V/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

# ---- the quickstart's job with the installed binary, a client outside the job
for v in $(compgen -e | grep -E '^SLURM_' || true); do unset "$v"; done
export SLURM_CONF=/etc/slurm/slurm.conf
OUT=$ROOT/.cache/install-check-job
rm -rf "$OUT"; mkdir -p "$OUT"
export RAY_LAUNCH_ENDPOINT_FILE=$OUT/endpoint.json RAY_LAUNCH_EVENT_LOG=$OUT/events.jsonl \
    RAY_LAUNCH_LOG_DIR=$OUT/logs RAY_LAUNCH_BIN=ray-launch PATH=$V/bin:$PATH
JOB=$(sbatch --parsable -o "$OUT/job-%j.out" slurm/local-vllm-cpu.sbatch)
trap '[ -n "$JOB" ] && scancel "$JOB" 2>/dev/null || true' EXIT
log "job $JOB (installed ray-launch); waiting with ray_launch.wait()"
# the openai SDK is in the vLLM venv; ray_launch comes from the wheel's install
PYTHONPATH=$SITE "$ROOT/.venv-vllm/bin/python" - "$RAY_LAUNCH_ENDPOINT_FILE" <<'PY' || { cat "$OUT"/job-*.out >&2; fail "client"; }
import sys, ray_launch
assert "/.cache/install-check/" in ray_launch.__file__, ray_launch.__file__
ep = ray_launch.wait(sys.argv[1], timeout=600)
client = ray_launch.openai_client(ep, timeout=120, max_retries=0)
r = client.completions.create(model="tiny", prompt="the cat sat on the", max_tokens=8)
assert r.usage.completion_tokens > 0, r
print(f"check-install: {ep.base_url} answered {r.usage.completion_tokens} tokens (ray_launch from {ray_launch.__file__})")
PY
scancel "$JOB"
for _ in $(seq 1 300); do
    [ -z "$(squeue -h -j "$JOB" -t PD,R,CG 2>/dev/null)" ] && break
    sleep 0.2
done
JOB_OUT=$OUT/job-$JOB.out
grep -q "ray-launch: $V/bin/ray-launch" "$JOB_OUT" || fail "the job did not run the installed binary: $(head -1 "$JOB_OUT")"
gone=$(grep -c "all processes of this job on .* are gone" "$JOB_OUT" || true)
[ "$gone" = 2 ] || { cat "$JOB_OUT" >&2; fail "$gone of 2 nodes said their processes are gone"; }
JOB=
log "OK: the wheel alone gives a working ray-launch (job served, answered, stopped clean on 2 nodes)"
