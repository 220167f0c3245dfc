#!/usr/bin/env bash
# Checks the shipped systemd units in systemd/ as they are (no rendering):
#   - `systemd-analyze verify` in a scratch root holding the units, the binary at the unit's
#     ExecStart path and the host's system units; any message fails the check (verify only
#     warns about many mistakes, such as a misspelled or unparsable setting);
#   - `systemd-analyze security --offline=yes`: the exposure level of pushgate.service, alone
#     and with the edge drop-in (systemd/pushgate-edge.conf), each at most the figure README.md
#     states for it. The ceilings are read from README.md, not written here, so the promise and
#     the check cannot drift apart; a README without the figures fails.
# The summary counts the checks that ran. MAX_EXPOSURE / MAX_EXPOSURE_EDGE override the
# README's figures (to show a check failing, or while changing the units).
# Usage: scripts/test-systemd.sh [path/to/pushgate]   (default target/debug/pushgate)
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${1:-target/debug/pushgate}
UNITS=(pushgate.service pushgate.socket pushgate-tls-reload.path pushgate-tls-reload.service)
[ -x "$BIN" ] || { echo "no pushgate binary at $BIN" >&2; exit 1; }
command -v systemd-analyze >/dev/null || { echo "systemd-analyze is missing" >&2; exit 1; }

# README: "... exposure level **1.1**)" (systemd/) and "(exposure level 1.4 with it, 1.1
# without)" (the edge drop-in). Line breaks in README are spaces here.
readme=$(tr '\n' ' ' <README.md | tr -s ' ')
stated=$(grep -oE 'exposure level \*\*[0-9]+\.[0-9]+\*\*' <<<"$readme" | grep -oE '[0-9]+\.[0-9]+' | sort -u)
edge_pair=$(grep -oE 'exposure level [0-9]+\.[0-9]+ with it, [0-9]+\.[0-9]+ without' <<<"$readme" | sort -u)
if [ "$(wc -l <<<"$stated")" != 1 ] || [ -z "$stated" ] || [ "$(wc -l <<<"$edge_pair")" != 1 ] || [ -z "$edge_pair" ]; then
    echo "README.md must state the exposure level once as '**X.Y**' and once as 'X.Y with it, X.Y without'" >&2
    echo "found: '${stated}' and '${edge_pair}'" >&2
    exit 1
fi
mapfile -t pair < <(grep -oE '[0-9]+\.[0-9]+' <<<"$edge_pair")
stated_edge=${pair[0]} stated_plain=${pair[1]}
if [ "$stated_plain" != "$stated" ]; then
    echo "README.md states two exposure levels for the plain unit: $stated and $stated_plain" >&2
    exit 1
fi
MAX_EXPOSURE=${MAX_EXPOSURE:-$stated}
MAX_EXPOSURE_EDGE=${MAX_EXPOSURE_EDGE:-$stated_edge}

passed=0
failed=0
check() { # check "what" command...
    local what=$1 out
    shift
    if out=$("$@" 2>&1); then
        echo "    ok: $what${out:+ ($out)}"
        passed=$((passed + 1))
    else
        echo "    FAILED: $what"
        sed 's/^/        /' <<<"$out" | tail -60
        failed=$((failed + 1))
    fi
}

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
exec_path=$(sed -n 's/^ExecStart=\([^ ]*\).*/\1/p' systemd/pushgate.service)
mkdir -p "$root$(dirname "$exec_path")" "$root/etc/systemd/system" "$root/usr/lib/systemd"
install -m 0755 "$BIN" "$root$exec_path"
for u in "${UNITS[@]}"; do cp "systemd/$u" "$root/etc/systemd/system/"; done
# What the units refer to: the system units (sysinit.target, ...) and systemctl.
cp -r /usr/lib/systemd/system "$root/usr/lib/systemd/"
mkdir -p "$root/usr/bin" && cp "$(command -v systemctl)" "$root/usr/bin/systemctl"

verify() { # verify UNIT...: no error, no message
    local out
    out=$(systemd-analyze verify --man=no --root="$root" "$@" 2>&1) || { echo "$out"; return 1; }
    [ -z "$out" ] || { echo "$out"; echo "(systemd-analyze verify printed warnings)"; return 1; }
}
exposure_at_most() { # exposure_at_most MAX: pushgate.service's computed level <= MAX
    local out line level
    out=$(systemd-analyze security --offline=yes --root="$root" pushgate.service 2>&1 || true)
    line=$(grep -oE 'Overall exposure level for pushgate.service: [0-9]+\.[0-9]+' <<<"$out" || true)
    [ -n "$line" ] || { echo "$out"; echo "no exposure level in the output"; return 1; }
    level=${line##* }
    if awk -v l="$level" -v m="$1" 'BEGIN { exit !(l > m) }'; then
        grep '✗' <<<"$out" || true
        echo "exposure level $level is above $1"
        return 1
    fi
    echo "computed $level, README states $1"
}

echo "==> systemd units: verify and exposure (README states $MAX_EXPOSURE, $MAX_EXPOSURE_EDGE with the edge drop-in)"
check "systemd-analyze verify ${UNITS[*]}" verify "${UNITS[@]}"
check "exposure level of pushgate.service at most $MAX_EXPOSURE" exposure_at_most "$MAX_EXPOSURE"
mkdir -p "$root/etc/systemd/system/pushgate.service.d"
cp systemd/pushgate-edge.conf "$root/etc/systemd/system/pushgate.service.d/edge.conf"
check "systemd-analyze verify pushgate.service with the edge drop-in" verify pushgate.service
check "exposure level with the edge drop-in at most $MAX_EXPOSURE_EDGE" exposure_at_most "$MAX_EXPOSURE_EDGE"

echo "systemd units: $passed passed, $failed failed"
[ "$failed" = 0 ]
