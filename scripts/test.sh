#!/usr/bin/env bash
# The whole test suite, on a fresh Debian/Ubuntu machine: installs what it needs when missing,
# then runs formatting and lint checks, the Rust tests, and the Node tests that drive the
# official phoenix client against the real binary.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "==> installing ${need_apt[*]}"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

echo "==> cargo fmt --all --check"
cargo fmt --all --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "==> cargo build (workspace: gateway and bench tool)"
cargo build --workspace --quiet
echo "==> cargo test"
cargo test --workspace --quiet

echo "==> node tests (official phoenix client 1.8.16 and 1.7.21)"
(
    cd tests/js
    npm ci --no-audit --no-fund --loglevel=error
    PUSHGATE_BIN="$PWD/../../target/debug/pushgate" npm test
)
echo "==> all tests passed"
