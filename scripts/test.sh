#!/usr/bin/env bash
# The whole test suite, on a fresh Debian/Ubuntu machine: installs what it needs when missing,
# then runs formatting and lint checks, the Rust tests, the systemd unit checks, the Node tests
# that drive the official phoenix client against the real binary (directly and through nginx),
# Autobahn|Testsuite's WebSocket conformance cases on a plain socket (tests/js/autobahn.test.js)
# and through the TLS edge (tests/acme.rs; its Python 2.7 virtualenv is cached), the demo page in
# Chromium at the TLS edge over HTTP/2 (tests/acme.rs with tests/js/edge-browser.js), README's
# publish snippets (tests/js/readme.test.js), every fuzz target for a few seconds
# (scripts/fuzz.sh, FUZZING.md), the
# Debian package (scripts/build-deb.sh, cargo-deb installed when missing), the Ansible test (a
# debootstrap root filesystem cached under /var/cache/pushgate-test), and the droplet test
# (scripts/test-droplet.sh: Debian 12 and Debian 13 root filesystems booted with systemd, the role
# applied over SSH, checked live from outside, the package upgraded with clients connected and
# purged; DROPLET_SUITES=bookworm runs only Debian 12), and the container image built from the
# Dockerfile with podman and run as the platforms run it (scripts/test-container.sh).
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
# The SNI mode (nginx/pushgate-sni.conf, tests/edge.rs): nginx's stream module with ssl_preread.
[ -f /usr/lib/nginx/modules/ngx_stream_module.so ] || need_apt+=(libnginx-mod-stream)
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
# The droplet test and the soak (scripts/soak.sh): network namespaces, nftables.
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v nft >/dev/null 2>&1 || need_apt+=(nftables)
# The container image (scripts/test-container.sh): podman and buildah, with runc (crun fails on
# hybrid cgroups); slirp4netns lets containers reach the test's Redis on the host's loopback.
command -v podman >/dev/null 2>&1 || need_apt+=(podman)
command -v buildah >/dev/null 2>&1 || need_apt+=(buildah)
command -v runc >/dev/null 2>&1 || need_apt+=(runc)
command -v slirp4netns >/dev/null 2>&1 || need_apt+=(slirp4netns)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "==> installing ${need_apt[*]}"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

echo "==> cargo fmt --all --check"
cargo fmt --all --check
(cd fuzz && cargo fmt --check)
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

echo "==> the hub and transport tests again, their servers on a multi-threaded runtime"
PUSHGATE_TEST_RUNTIME=multi_thread cargo test --quiet --test websocket --test longpoll \
    --test bad_input --test http1 --test publish --test redis --test presence --test bounds

echo "==> fuzzing: every target of fuzz/ for 10 s (FUZZING.md; installs cargo-fuzz when missing)"
FUZZ_TARGET_DIR=/var/cache/pushgate-test/fuzz-target ./scripts/fuzz.sh 10

echo "==> systemd units (systemd-analyze verify, security)"
./scripts/test-systemd.sh target/debug/pushgate

echo "==> node tests (official phoenix client 1.8.17 and 1.7.23; nginx in front; Autobahn)"
(
    cd tests/js
    PUSHGATE_BIN="$PWD/../../target/debug/pushgate" \
        PUSHGATE_AUTOBAHN_BIN="$PWD/../../target/debug/pushgate-autobahn" WSTEST="$WSTEST" \
        npm test
)
echo "==> a node behind the client (network namespace, nftables; SOAK.md, bugs found, item 1)"
PUSHGATE_BIN="$PWD/target/debug/pushgate" node tests/js/soak/lagging-node.mjs
echo "==> the soak with faults, 2 minutes (network namespaces, nftables; SOAK.md; 30 minutes by hand)"
scripts/soak.sh 120
echo "==> Debian packages (cargo deb, of the debug build): the one deployed, and an older one to upgrade from"
# The tests install the older package first, then upgrade to the current one with clients
# connected (scripts/test-droplet.sh). Same binary, lower version: what is tested is the upgrade.
DEB_VERSION=$(cargo metadata --no-deps --format-version 1 |
    python3 -c 'import json, sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "pushgate"))')
DEB_OLD=$(./scripts/build-deb.sh dev "$DEB_VERSION-0" "target/debian/pushgate_$DEB_VERSION-0_test.deb")
DEB_NEW=$(./scripts/build-deb.sh dev "$DEB_VERSION-1" "target/debian/pushgate_$DEB_VERSION-1_test.deb")
if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
echo "==> ansible (lint, apply to a Debian 12 root filesystem, idempotence)"
$SUDO ./scripts/test-ansible.sh "$DEB_NEW"
echo "==> droplet (Debian 12 and 13 hosts booted with systemd, provisioned over SSH, checked from outside)"
$SUDO env DROPLET_SUITES="${DROPLET_SUITES:-bookworm trixie}" ./scripts/test-droplet.sh "$DEB_OLD" "$DEB_NEW"
echo "==> container image (podman build of the Dockerfile; the official client against containers)"
# After the Ansible test, whose cached Debian 12 root filesystem the base-image stand-ins come from.
$SUDO ./scripts/test-container.sh
echo "==> all tests passed"
