#!/usr/bin/env bash
# The project's test command (README and .ci/run call exactly this): installs, then runs the
# Rust checks (fmt, clippy, tests), ruff, and pytest. Slow tests are left out unless
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
"$PYTHON" -m ruff check .
"$PYTHON" -m ruff format --check .

markers="not slow"
[ "${OSCAR_SLOW:-0}" = "1" ] && markers=""
echo "[test] pytest -m '${markers}'"
set +e
"$PYTHON" -m pytest -m "$markers" "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "[test] error: pytest collected no tests" >&2
    exit 1
fi
exit "$rc"
