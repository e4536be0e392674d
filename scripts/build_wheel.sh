#!/usr/bin/env bash
# Builds the release wheel of oscar-kv: one abi3 wheel (CPython >= 3.10) tagged
# manylinux_2_28, whatever glibc this machine has, and checks the tag with auditwheel.
#
#   bash scripts/build_wheel.sh [OUT_DIR]    # default target/wheels; prints the wheel's path last
#
# A plain `maturin build --release` links against this machine's glibc and tags the wheel
# for it (linux_x86_64 here: Debian 12, glibc 2.36). With --zig, zig is the linker and
# targets glibc 2.28 symbol versions, so the extension (oscar_kv._native) loads on any
# manylinux_2_28 system (RHEL 8 and newer, Debian 10+, Ubuntu 18.10+). maturin, zig (the
# PyPI package ziglang) and auditwheel come from PyPI into a build venv outside the
# repository (BUILD_VENV, default $TMPDIR/oscar-kv-wheel-venv); nothing is installed into
# PYTHON. The C++/CUDA sources ship as sources (compiled on first use), as before.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
OUT=${1:-target/wheels}
VENV=${BUILD_VENV:-${TMPDIR:-/tmp}/oscar-kv-wheel-venv}
TOOLS=(maturin==1.16.0 ziglang==0.17.1 auditwheel==6.8.2)
TAG=manylinux_2_28
log() { printf '[build_wheel] %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
    log "venv $VENV"
    "$PYTHON" -m venv "$VENV"
fi
log "pip install ${TOOLS[*]} (into $VENV)"
"$VENV/bin/python" -m pip install -q "${TOOLS[@]}" >&2

mkdir -p "$OUT"
stamp=$(mktemp)
log "maturin build --release --zig --compatibility $TAG --out $OUT"
# maturin finds zig through the venv's `python -m ziglang`.
PATH="$VENV/bin:$PATH" maturin build --release --zig --compatibility "$TAG" --out "$OUT" >&2

wheel=$(find "$OUT" -maxdepth 1 -name "oscar_kv-*-abi3-${TAG}_*.whl" -newer "$stamp" | head -n 1)
rm -f "$stamp"
[ -n "$wheel" ] || { log "error: no oscar_kv-*-abi3-${TAG}_*.whl written to $OUT"; exit 1; }
# auditwheel reads the extension's glibc symbol versions: the tag must be one it accepts.
report=$("$VENV/bin/auditwheel" show "$wheel" 2>&1)
printf '%s\n' "$report" >&2
# (auditwheel wraps its lines: match on the report as one line)
if ! tr -s '\n ' '  ' <<<"$report" | grep -q "platform tag: \"${TAG}_"; then
    log "error: auditwheel does not accept $wheel as $TAG"
    exit 1
fi
echo "$wheel"
