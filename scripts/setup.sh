#!/usr/bin/env bash
# Idempotent setup for a fresh Debian machine (root): Debian's Slurm packages for the local
# test cluster, the project's Ray virtualenv (.venv, ray==2.60.0), and the build.
# Fast (about a second) when everything is already there.
#   scripts/setup.sh            packages + Ray venv + debug build
#   scripts/setup.sh --release  also the release build
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
RAY_VERSION=2.60.0
log() { printf '[setup %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# ---- Debian packages (the Slurm test bed needs them; scontrol is the hostlist oracle)
PKGS=(slurmctld slurmd slurm-client munge tini iproute2 util-linux procps curl unzip binutils)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    apt-get -o DPkg::Lock::Timeout=300 update -qq
    # keep package scripts from starting the daemons: the test bed runs its own
    tmp_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; tmp_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    [ $tmp_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
fi

# ---- Ray in the project virtualenv
if ! .venv/bin/python -c "import ray, sys; sys.exit(ray.__version__ != '$RAY_VERSION')" 2>/dev/null; then
    log "creating .venv with ray==$RAY_VERSION"
    python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check "ray==$RAY_VERSION"
fi

# ---- build
cargo build -q --all-targets
if [ "${1:-}" = --release ]; then cargo build -q --release; fi
log "setup done"
