#!/usr/bin/env bash
# The whole test suite, on a fresh Debian/Ubuntu machine: installs what it needs when missing,
# then runs formatting and lint checks, the Rust tests, the systemd unit checks, the Node tests
# that drive the official phoenix client against the real binary (directly and through nginx),
# Autobahn|Testsuite's WebSocket conformance cases on a plain socket (tests/js/autobahn.test.js)
# and through the TLS edge (tests/acme.rs; its Python 2.7 virtualenv is cached), the demo page in
# Chromium at the TLS edge over HTTP/2 (tests/acme.rs with tests/js/edge-browser.js), README's
# publish snippets (tests/js/readme.test.js), the 2-minute soak with faults (scripts/soak.sh), and the
# Ansible test (a debootstrap root filesystem cached under /var/cache/pushgate-test).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
# Deployment tests: nginx with the brotli modules (tests/js/nginx.test.js), systemd-analyze
# (scripts/test-systemd.sh), debootstrap and a Python venv (scripts/test-ansible.sh).
[ -x /usr/sbin/nginx ] || need_apt+=(nginx)
[ -f /usr/lib/nginx/modules/ngx_http_brotli_filter_module.so ] || need_apt+=(libnginx-mod-http-brotli-filter)
[ -f /usr/lib/nginx/modules/ngx_http_brotli_static_module.so ] || need_apt+=(libnginx-mod-http-brotli-static)
# The bench's stack smoke test (bench/tests/smoke.rs): Nchan in the same nginx, side by side.
[ -f /usr/lib/nginx/modules/ngx_nchan_module.so ] || need_apt+=(libnginx-mod-nchan)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# README's publish snippets (tests/js/readme.test.js): curl and Python 3 (below, for the venv).
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
command -v debootstrap >/dev/null 2>&1 || need_apt+=(debootstrap)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_apt+=(python3-venv)
# ACME tests (tests/acme.rs): Let's Encrypt's test CA and its DNS stand-in.
command -v pebble >/dev/null 2>&1 && command -v pebble-challtestsrv >/dev/null 2>&1 || need_apt+=(pebble)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
# Failover tests (tests/redis_loss.rs): Redis Sentinel.
command -v redis-sentinel >/dev/null 2>&1 || need_apt+=(redis-sentinel)
# The soak (scripts/soak.sh): network namespaces and nftables.
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v nft >/dev/null 2>&1 || need_apt+=(nftables)
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
echo "==> conformance build (feature autobahn-echo) and Autobahn|Testsuite's virtualenv"
# The same target directory: only the pushgate crate is built again, and the plain build is
# restored right after (cargo keeps both). The Rust tests run the suite over the TLS edge
# (tests/acme.rs), the Node tests over a plain socket (tests/js/autobahn.test.js).
cargo build -p pushgate --features autobahn-echo --quiet
cp target/debug/pushgate target/debug/pushgate-autobahn
cargo build --workspace --quiet
WSTEST=$(./scripts/autobahn-env.sh)

echo "==> npm ci (tests/js: the phoenix clients, playwright-core for Chromium)"
(cd tests/js && npm ci --no-audit --no-fund --loglevel=error)

echo "==> cargo test"
# EDGE_BROWSER_TEST: tests/acme.rs drives Chromium at the TLS edge through tests/js/edge-browser.js.
# The tests that need these are #[ignore]d for a plain `cargo test` and fail when run without
# them; --include-ignored runs them here.
AUTOBAHN_SERVER_BIN="$PWD/target/debug/pushgate-autobahn" WSTEST="$WSTEST" EDGE_BROWSER_TEST=1 \
    cargo test --workspace --quiet -- --include-ignored

echo "==> systemd units (systemd-analyze verify, security)"
./scripts/test-systemd.sh target/debug/pushgate

echo "==> node tests (official phoenix client 1.8.17 and 1.7.23; nginx in front; Autobahn)"
(
    cd tests/js
    PUSHGATE_BIN="$PWD/../../target/debug/pushgate" \
        PUSHGATE_AUTOBAHN_BIN="$PWD/../../target/debug/pushgate-autobahn" WSTEST="$WSTEST" \
        npm test
)
echo "==> soak with faults, 2 minutes (three nodes in network namespaces, Redis restart, SIGTERM, SIGKILL, partitions)"
if [ "$(id -u)" = 0 ]; then
    ./scripts/soak.sh 120
else
    sudo ./scripts/soak.sh 120
fi
echo "==> ansible (lint, apply to a Debian 12 root filesystem, idempotence)"
if [ "$(id -u)" = 0 ]; then
    ./scripts/test-ansible.sh target/debug/pushgate
else
    sudo ./scripts/test-ansible.sh target/debug/pushgate
fi
echo "==> all tests passed"
