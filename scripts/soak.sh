#!/usr/bin/env bash
# The soak with faults (issue 20, item 2; SOAK.md): three pushgate nodes in network namespaces of
# their own on one Redis, churning phoenix clients, two publishers, presence, and a schedule of
# faults (Redis restart, SIGTERM, SIGKILL, a node cut off from Redis, a node cut off from its
# clients). Usage: scripts/soak.sh [seconds] (default 120; SOAK.md records a 30-minute run,
# scripts/soak.sh 1800). Needs root (ip netns, nftables), redis-server, node; builds the binary
# like scripts/test.sh and runs tests/js's npm ci when needed. SOAK_REPORT=file keeps the JSON report.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-120}"

if [ "$(id -u)" != 0 ]; then
    echo "soak: FAIL: must run as root (network namespaces, nftables)" >&2
    exit 2
fi
need_apt=()
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v nft >/dev/null 2>&1 || need_apt+=(nftables)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "==> installing ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi
cargo build -p pushgate --quiet
[ -d tests/js/node_modules/phoenix ] || (cd tests/js && npm ci --no-audit --no-fund --loglevel=error)

# The namespaces are named after the Node process (pgs<pid>n<i>); it removes them on exit, and
# this trap removes them if it was killed.
node_pid=""
cleanup() {
    if [ -n "$node_pid" ]; then
        for ns in $(ip netns list | awk '{print $1}' | grep -E "^pgs$((node_pid % 100000))n[0-9]+$" || true); do
            ip netns del "$ns" 2>/dev/null || true
        done
    fi
}
trap cleanup EXIT
trap 'if [ -n "$node_pid" ]; then kill "$node_pid" 2>/dev/null || true; wait "$node_pid" || true; fi; exit 130' INT TERM
PUSHGATE_BIN="$PWD/target/debug/pushgate" node tests/js/soak/soak.mjs "$DURATION" &
node_pid=$!
wait "$node_pid"
