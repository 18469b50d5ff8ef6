#!/usr/bin/env bash
# Build the wheel users install with `pip install ray-launch`: the `ray-launch` binary (for any
# Linux since glibc 2.17: manylinux2014, linked against glibc 2.17's symbols by zig) and the
# `ray_launch` Python module, into dist/. Checks what it promises: the wheel's tag, and that
# no symbol of the binary needs a glibc newer than 2.17. Idempotent; the build tools live in
# .cache/package-venv (maturin, ziglang, auditwheel, pinned).
#   scripts/package.sh                 the wheel for this machine's architecture
#   scripts/package.sh --target T      x86_64-unknown-linux-gnu or aarch64-unknown-linux-gnu;
#                                      only this machine's own (build aarch64 on an aarch64
#                                      machine, e.g. a GH200 login node: same command)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
MATURIN=1.16.0 ZIGLANG=0.17.1 AUDITWHEEL=6.8.2
GLIBC_MAX=2.17 POLICY=manylinux2014
log() { printf '[package %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { printf 'error: %s\n' "$1" >&2; [ -n "${2:-}" ] && printf 'hint: %s\n' "$2" >&2; exit 2; }

case "$(uname -m)" in
    x86_64) HOST=x86_64-unknown-linux-gnu ;;
    aarch64|arm64) HOST=aarch64-unknown-linux-gnu ;;
    *) die "no wheel for $(uname -m): ray-launch ships x86_64 and aarch64 Linux wheels" \
           "build from source on this machine instead: cargo install --locked --path ." ;;
esac
TARGET=$HOST
while [ $# -gt 0 ]; do
    case "$1" in
        --target) TARGET=${2:-}; shift 2 || shift ;;
        --target=*) TARGET=${1#*=}; shift ;;
        *) die "unknown argument \`$1\`" "scripts/package.sh [--target x86_64-unknown-linux-gnu|aarch64-unknown-linux-gnu]" ;;
    esac
done
case "$TARGET" in
    x86_64-unknown-linux-gnu|aarch64-unknown-linux-gnu) ;;
    *) die "unsupported target \`$TARGET\`" "x86_64-unknown-linux-gnu or aarch64-unknown-linux-gnu" ;;
esac
if [ "$TARGET" != "$HOST" ]; then
    die "this is a $HOST machine; the $TARGET wheel is built on a ${TARGET%%-*} machine" \
        "run scripts/package.sh on a ${TARGET%%-*} node (a GH200 login node for aarch64): same command, no flag"
fi
command -v cargo >/dev/null || die "cargo is not on the PATH" "install Rust (https://rustup.rs), then run this again"
if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx "$TARGET"; then
    die "the Rust target $TARGET is not installed" "rustup target add $TARGET"
fi
command -v objdump >/dev/null || die "objdump is missing (the glibc check needs it)" "apt-get install binutils (or dnf install binutils)"

# ---- the build tools, pinned, in their own venv (zig must be on that venv's PATH)
VENV=$ROOT/.cache/package-venv
want="maturin==$MATURIN ziglang==$ZIGLANG auditwheel==$AUDITWHEEL"
if [ "$(cat "$VENV/.ray-launch-ok" 2>/dev/null)" != "$want" ]; then
    log "installing $want into $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    # shellcheck disable=SC2086
    "$VENV/bin/pip" install -q --disable-pip-version-check $want
    echo "$want" > "$VENV/.ray-launch-ok"
fi
export PATH=$VENV/bin:$PATH

# ---- the wheel
log "building the $POLICY wheel for $TARGET (release build, a few minutes on 2 cores)"
mkdir -p dist
rm -f dist/ray_launch-*-"${TARGET%%-*}".whl dist/ray_launch-*_"${TARGET%%-*}".whl
maturin build --quiet --release --bindings bin --zig --compatibility "$POLICY" \
    --target "$TARGET" --out dist 2>&1 | grep -vE '^\s*(Compiling|Downloaded|Downloading)' >&2 || true
WHEEL=$(ls -t dist/ray_launch-*"${TARGET%%-*}".whl 2>/dev/null | head -1)
[ -n "$WHEEL" ] || die "maturin made no wheel" "run it by hand: PATH=$VENV/bin:\$PATH maturin build --release -b bin --zig --compatibility $POLICY"

# ---- check what it promises
BIN=target/$TARGET/release/ray-launch
# the highest GLIBC_x.y any dynamic symbol of the binary needs
top=$(objdump -T "$BIN" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
if [ "$(printf '%s\n%s\n' "$top" "$GLIBC_MAX" | sort -V | tail -1)" != "$GLIBC_MAX" ]; then
    die "$BIN needs GLIBC_$top, above the $GLIBC_MAX promised by $POLICY" \
        "a symbol came from the host's glibc: is zig on the PATH ($VENV/bin)?"
fi
show=$(auditwheel show "$WHEEL" 2>&1)
echo "$show" | grep -q "manylinux_2_17_${TARGET%%-*}" \
    || die "auditwheel does not call $WHEEL manylinux_2_17: $show" "see the libraries it names above"
log "$WHEEL: $(du -h "$WHEEL" | cut -f1), tag manylinux_2_17 (auditwheel), highest glibc symbol GLIBC_$top"
echo "$WHEEL"
