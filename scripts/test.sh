#!/usr/bin/env bash
# The project's test command (README and .ci/run call exactly this): installs the package and
# SGLang 0.5.23 (pinned, scripts/install_sglang.sh; the SGLang tests would otherwise skip), then
# runs the Rust checks (fmt, clippy, tests), ruff, and pytest. Slow tests are left out unless
# OSCAR_SLOW=1; GPU tests skip themselves without CUDA. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}

bash scripts/install.sh

echo "[test] cargo fmt --check / clippy -D warnings / cargo test"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace --quiet

echo "[test] ruff"
"$PYTHON" -m ruff check python tests benches
"$PYTHON" -m ruff format --check python tests benches

markers="not slow"
[ "${OSCAR_SLOW:-0}" = "1" ] && markers=""

# Without CUDA the Triton kernels run in Triton's interpreter, switched on only around our own
# launches (oscar_kv.triton._env), exactly as a user's process does it; TRITON_INTERPRET is
# deliberately not set for the whole run.
run_pytest() {
    set +e
    "$PYTHON" -m pytest -m "$markers" "$@"
    local rc=$?
    set -e
    if [ "$rc" -eq 5 ]; then
        echo "[test] error: pytest collected no tests ($*)" >&2
        return 1
    fi
    return "$rc"
}
echo "[test] pytest -m '${markers}'"
run_pytest "$@"
