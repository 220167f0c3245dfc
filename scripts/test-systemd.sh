#!/usr/bin/env bash
# Checks the shipped systemd units in systemd/ as they are (no rendering):
#   - `systemd-analyze verify` in a scratch root holding the units, the binary at the unit's
#     ExecStart path and the host's system units; any message fails the check (verify only
#     warns about many mistakes, such as a misspelled or unparsable setting);
#   - `systemd-analyze security --offline=yes`: prints the exposure level and fails above
#     MAX_EXPOSURE (the README states the figure).
# Usage: scripts/test-systemd.sh [path/to/pushgate]   (default target/debug/pushgate)
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${1:-target/debug/pushgate}
MAX_EXPOSURE=${MAX_EXPOSURE:-1.5}
UNITS=(pushgate.service pushgate.socket pushgate-tls-reload.path pushgate-tls-reload.service)

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/usr/local/bin" "$root/etc/systemd/system" "$root/usr/lib/systemd"
install -m 0755 "$BIN" "$root/usr/local/bin/pushgate"
for u in "${UNITS[@]}"; do cp "systemd/$u" "$root/etc/systemd/system/"; done
# What the units refer to: the system units (sysinit.target, ...) and systemctl.
cp -r /usr/lib/systemd/system "$root/usr/lib/systemd/"
mkdir -p "$root/usr/bin" && cp "$(command -v systemctl)" "$root/usr/bin/systemctl"

echo "==> systemd-analyze verify ${UNITS[*]}"
out=$(systemd-analyze verify --man=no --root="$root" "${UNITS[@]}" 2>&1) || {
    echo "$out"; echo "systemd-analyze verify failed"; exit 1; }
if [ -n "$out" ]; then echo "$out"; echo "systemd-analyze verify printed warnings"; exit 1; fi

echo "==> systemd-analyze security --offline=yes pushgate.service"
out=$(systemd-analyze security --offline=yes --root="$root" pushgate.service 2>&1 || true)
line=$(grep -o 'Overall exposure level for pushgate.service: [0-9.]*' <<<"$out" || true)
if [ -z "$line" ]; then echo "$out"; echo "no exposure level in the output"; exit 1; fi
level=${line##* }
echo "    exposure level: $level (at most $MAX_EXPOSURE allowed)"
if awk -v l="$level" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(l > m) }'; then
    grep '✗' <<<"$out" || true
    echo "exposure level $level is above $MAX_EXPOSURE"; exit 1
fi
echo "==> edge drop-in: systemd-analyze verify pushgate.service with systemd/pushgate-edge.conf"
mkdir -p "$root/etc/systemd/system/pushgate.service.d"
cp systemd/pushgate-edge.conf "$root/etc/systemd/system/pushgate.service.d/edge.conf"
out=$(systemd-analyze verify --man=no --root="$root" pushgate.service 2>&1) || {
    echo "$out"; echo "systemd-analyze verify failed with the edge drop-in"; exit 1; }
if [ -n "$out" ]; then echo "$out"; echo "systemd-analyze verify printed warnings"; exit 1; fi
out=$(systemd-analyze security --offline=yes --root="$root" pushgate.service 2>&1 || true)
line=$(grep -o 'Overall exposure level for pushgate.service: [0-9.]*' <<<"$out" || true)
echo "    exposure level with the edge drop-in: ${line##* }"
echo "systemd units: 3 passed, 0 failed"
