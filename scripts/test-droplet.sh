#!/usr/bin/env bash
# The droplet, booted for real: applies ansible/site.yml over SSH to a booted Debian host and
# checks it from outside, as a user would.
#
# For each distribution (DROPLET_SUITES, default "bookworm trixie": Debian 12 and Debian 13):
#   1. a fresh copy of the cached debootstrap root filesystem (Debian 12's is the one
#      scripts/test-ansible.sh uses, under PUSHGATE_TEST_CACHE; each is made once by debootstrap
#      and cached) gets openssh-server and a test SSH key, and boots with
#      systemd as PID 1 (systemd-nspawn --boot) in a network namespace of its own, joined to
#      the host by a veth pair on a private /30: the host reaches it as a droplet is reached,
#      by its address, through its firewall. The copy is offline: the role's packages come
#      from the apt archive cached in the root filesystem.
#   2. ansible-playbook applies site.yml over SSH with the role's defaults (services managed).
#      SSH, not a chroot or nsenter connection: it is how a user reaches a droplet, so sshd,
#      the firewall the role loads (which must keep port 22 open) and Ansible's remote Python
#      are all in the path, as they are for the user;
#   3. checks from the host: HTTPS with the stand-in certificate, HTTP redirected, the demo
#      page, /api/publish, /metrics and /healthz not served through nginx; the official phoenix
#      client (tests/js/droplet.js: WebSocket and LongPoll, 1.8.17 and 1.7.23) receives what is
#      published on the droplet's loopback publish API; `systemctl restart pushgate` with 20
#      clients connected and a publisher every 20 ms: nothing refused, nothing lost, every
#      rejoin recovered; a new certificate served within seconds; a SIGSTOPped pushgate
#      restarted by its watchdog; the firewall drops other ports; a reboot brings everything
#      back by itself; a second apply changes nothing.
#   4. the edge mode (README, "An address of its own for the sockets"): the droplet's second
#      address (as a reserved IP's anchor address) is given to pushgate's own TLS edge by
#      applying the role with pushgate_nginx_mode edge: nginx leaves it and keeps the site on
#      the first address, pushgate takes its ports 443 and 80 (the role's restart order, on a
#      real systemd); the phoenix client over the edge, a restart with 20 clients and a
#      publisher (nothing lost), HTTPS requests across two restarts (none refused:
#      pushgate.socket holds the edge's ports), a new certificate served by the edge within
#      seconds, a reboot; then the SNI mode (nginx's stream server on 443 routes a second
#      name to pushgate's edge on loopback: requests across two restarts all answered); then
#      back to the default site, nginx on every address again.
#
# Needs root (debootstrap, nspawn, network namespaces). Installs systemd-container, debootstrap,
# openssh-client, curl and openssl when missing; node and tests/js/node_modules must be there
# (scripts/test.sh installs them).
#
# Then the package: the role installed package A (first apply); applying the role with a newer
# package B (an upgrade, as a deploy does) while 20 clients are connected and a publisher runs
# loses nothing and every client recovers; a further apply changes nothing; `apt-get purge
# pushgate` removes the package, its units, its state, and stops the socket; `apt-get install
# ./pushgate_*.deb` by hand then brings pushgate up, and it starts without pushgate.toml.
#
# Usage: scripts/test-droplet.sh path/to/pushgate_A.deb path/to/pushgate_B.deb (B newer than A;
# scripts/build-deb.sh makes them)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DEB_A=$(realpath "${1:?usage: scripts/test-droplet.sh pushgate_A.deb pushgate_B.deb}")
DEB_B=$(realpath "${2:?usage: scripts/test-droplet.sh pushgate_A.deb pushgate_B.deb}")
VERSION_A=$(dpkg-deb -f "$DEB_A" Version)
VERSION_B=$(dpkg-deb -f "$DEB_B" Version)
CACHE=${PUSHGATE_TEST_CACHE:-/var/cache/pushgate-test}
SUITES=${DROPLET_SUITES:-bookworm trixie}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ANSIBLE_CORE=2.19.14
ANSIBLE=12.3.0
ANSIBLE_LINT=26.10.1
TOKEN=droplet-test-token-0123456789abcdef
DOMAIN=pushgate.test

if [ "$(id -u)" != 0 ]; then
    echo "scripts/test-droplet.sh needs root (debootstrap, systemd-nspawn, ip netns); try sudo" >&2
    exit 1
fi
dpkg --compare-versions "$VERSION_B" gt "$VERSION_A" ||
    { echo "$DEB_B ($VERSION_B) must be newer than $DEB_A ($VERSION_A)" >&2; exit 1; }
need_apt=()
command -v systemd-nspawn >/dev/null || need_apt+=(systemd-container)
command -v debootstrap >/dev/null || need_apt+=(debootstrap)
command -v ssh >/dev/null || need_apt+=(openssh-client)
command -v curl >/dev/null || need_apt+=(curl)
command -v openssl >/dev/null || need_apt+=(openssl)
command -v ip >/dev/null || need_apt+=(iproute2)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "==> installing ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
command -v node >/dev/null || { echo "node is missing (scripts/test.sh installs it)" >&2; exit 1; }
[ -d tests/js/node_modules/phoenix ] || { echo "tests/js/node_modules is missing: (cd tests/js && npm ci)" >&2; exit 1; }
mkdir -p "$CACHE"

passed=0
failed=0
check() { # check "what" command...
    local what=$1 out
    shift
    if out=$("$@" 2>&1); then
        echo "    ok: $what${out:+ ($(tail -1 <<<"$out"))}"
        passed=$((passed + 1))
    else
        echo "    FAILED: $what"
        sed 's/^/        /' <<<"$out" | tail -40
        failed=$((failed + 1))
    fi
}
# poll DEADLINE_S command...: runs the command every 0.2 s until it succeeds or the deadline.
poll() {
    local deadline=$(($(date +%s) + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$deadline" ] || { "$@" 2>&1 | tail -20; return 1; }
        sleep 0.2
    done
}

# --- virtualenv (the same as scripts/test-ansible.sh) -------------------------------------------
VENV=$CACHE/venv-ansible-$ANSIBLE_CORE-$ANSIBLE_LINT
if [ ! -f "$VENV/.complete" ]; then
    echo "==> creating $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check \
        "ansible-core==$ANSIBLE_CORE" "ansible==$ANSIBLE" "ansible-lint==$ANSIBLE_LINT"
    touch "$VENV/.complete"
fi
export PATH="$VENV/bin:$PATH"
export ANSIBLE_NOCOLOR=1 ANSIBLE_FORCE_COLOR=0 ANSIBLE_CONFIG="$REPO/ansible/ansible.cfg"

PACKAGES=$(python3 - "$REPO/ansible/roles/pushgate/defaults/main.yml" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
block = re.search(r"^pushgate_packages:\n((?:  - .*\n)+)", text, re.M).group(1)
print(" ".join(line.split("- ", 1)[1].strip() for line in block.splitlines()))
EOF
)

# base_rootfs SUITE: the cached root filesystem (as scripts/test-ansible.sh makes it), plus the
# role's packages, openssh-server and the SNI mode's stream module in its apt archive
# (downloaded, not installed).
base_rootfs() {
    local suite=$1 base=$CACHE/rootfs-$1
    if [ ! -f "$base/.complete" ]; then
        echo "==> debootstrap $suite into $base (cached for later runs)"
        rm -rf "$base"
        debootstrap --variant=minbase --include=python3,python3-apt,systemd,ca-certificates \
            "$suite" "$base" "$MIRROR" >"$CACHE/debootstrap-$suite.log" 2>&1 || {
            tail -30 "$CACHE/debootstrap-$suite.log"
            return 1
        }
        printf '#!/bin/sh\nexit 101\n' >"$base/usr/sbin/policy-rc.d"
        chmod 0755 "$base/usr/sbin/policy-rc.d"
        cp /etc/resolv.conf "$base/etc/resolv.conf"
        chroot "$base" apt-get update -qq
        # shellcheck disable=SC2086
        DEBIAN_FRONTEND=noninteractive chroot "$base" apt-get install -y -qq --download-only $PACKAGES >/dev/null
        touch "$base/.complete"
    fi
    if [ ! -f "$base/.droplet-complete-sni" ]; then
        echo "==> $suite: adding openssh-server, the role's packages and nginx's stream module to the cached apt archive"
        cp /etc/resolv.conf "$base/etc/resolv.conf"
        chroot "$base" apt-get update -qq
        # shellcheck disable=SC2086
        DEBIAN_FRONTEND=noninteractive chroot "$base" apt-get install -y -qq --download-only \
            openssh-server libnginx-mod-stream $PACKAGES >/dev/null
        touch "$base/.droplet-complete-sni"
    fi
}

# --- one droplet -------------------------------------------------------------------------------
WORK=""
NS=""
NSPAWN=""
LEADER=""
ADDR=""
EDGE=""
cleanup() {
    if [ -n "${DROPLET_KEEP:-}" ] && [ -n "$NSPAWN" ]; then
        echo "DROPLET_KEEP: left running: nspawn pid $NSPAWN, leader $LEADER, netns $NS, address $ADDR, work $WORK"
        return
    fi
    if [ -n "$NSPAWN" ] && kill -0 "$NSPAWN" 2>/dev/null; then
        kill -TERM "$NSPAWN" 2>/dev/null || true
        wait "$NSPAWN" 2>/dev/null || true
    fi
    [ -z "$NS" ] || ip netns del "$NS" 2>/dev/null || true
    [ -z "$WORK" ] || rm -rf "$WORK"
    NSPAWN="" NS="" WORK=""
}
trap cleanup EXIT

# A free private /29: 10.<a>.<b>.0, host .1, droplet .2 (the site), .3 (the edge mode's address).
pick_subnet() {
    local a b used
    used=$(ip -o addr show; ip route show)
    for _ in $(seq 50); do
        a=$((200 + RANDOM % 50)) b=$((RANDOM % 256))
        if ! grep -qE "(^| )10\.$a\.$b\." <<<"$used"; then
            echo "10.$a.$b"
            return
        fi
    done
    return 1
}

boot() { # boots $ROOT in $NS; sets NSPAWN and LEADER
    # CAP_NET_ADMIN: the firewall (nftables) is loaded in the droplet's own network namespace.
    systemd-nspawn -D "$ROOT" --boot --register=no --keep-unit -q --machine="$NS" \
        --network-namespace-path="/run/netns/$NS" --capability=CAP_NET_ADMIN >>"$WORK/console.log" 2>&1 </dev/null &
    NSPAWN=$!
    leader() { LEADER=$(pgrep -P "$NSPAWN" -x systemd); }
    poll 20 leader || { echo "the container's systemd did not start"; tail -20 "$WORK/console.log"; return 1; }
    leader
    # running, or degraded (a failed unit: reported by the checks below)
    booted() { local s; s=$(nsenter -t "$LEADER" -a systemctl is-system-running 2>/dev/null || true); [ "$s" = running ] || [ "$s" = degraded ]; }
    poll 60 booted || { echo "the droplet did not finish booting"; nsenter -t "$LEADER" -a systemctl --failed --no-pager || true; return 1; }
}
in_droplet() { nsenter -t "$LEADER" -a "$@"; }
# A host program in the droplet's network namespace (its loopback), e.g. curl.
in_droplet_net() { nsenter -t "$LEADER" -n "$@"; }
ssh_droplet() { ssh -i "$WORK/id" -o StrictHostKeyChecking=no -o UserKnownHostsFile="$WORK/known_hosts" -o LogLevel=ERROR -o ConnectTimeout=5 "root@$ADDR" "$@"; }

apply() { # apply LOGFILE A|B
    (cd ansible && ansible-playbook -i "$WORK/inventory-$2.yml" site.yml) >"$1" 2>&1 || {
        tail -60 "$1"
        # What systemd said of the services the role manages, to tell why a job failed.
        in_droplet systemctl status --no-pager --lines=0 pushgate.socket pushgate.service nginx.service 2>&1 | sed 's/^/    /' || true
        in_droplet journalctl --no-pager -n 40 -u pushgate.socket -u pushgate.service -u nginx.service 2>&1 | sed 's/^/    /' || true
        echo "ansible-playbook failed (log: $1)"
        return 1
    }
}

timed_apply() { # timed_apply LOGFILE A|B|E|S: apply, then its recap line and how long it took
    local t
    t=$(date +%s)
    apply "$1" "$2"
    grep -E '^droplet +:' "$1" | sed 's/^/    /'
    echo "    ($(($(date +%s) - t)) s)"
}

clients() { # clients [ACTION argv as JSON]: tests/js/droplet.js from the host
    (
        cd tests/js
        NODE_TLS_REJECT_UNAUTHORIZED=0 NODE_NO_WARNINGS=1 DROPLET_URL="${URL:-https://$ADDR}" CLIENTS="${CLIENTS:-20}" \
            PUBLISHER="[\"ip\",\"netns\",\"exec\",\"$NS\",\"env\",\"PUBLISH_URL=http://127.0.0.1:4000\",\"TOKEN=$TOKEN\",\"INTERVAL_MS=20\",\"$(command -v node)\",\"$REPO/tests/js/droplet.js\",\"publisher\"]" \
            ACTION="${1:-}" node droplet.js clients
    )
}

droplet() {
    local suite=$1 start
    start=$(date +%s)
    echo "==> droplet: Debian $suite"
    base_rootfs "$suite"
    WORK=$(mktemp -d "$CACHE/droplet.XXXXXX")
    ROOT=$WORK/root
    cp -a "$CACHE/rootfs-$suite" "$ROOT"
    # What a provider's image has and a debootstrap lacks: sshd with the user's key, no
    # policy-rc.d (packages start their services), its own host keys and name.
    rm -f "$ROOT/usr/sbin/policy-rc.d" "$ROOT"/etc/ssh/ssh_host_*
    DEBIAN_FRONTEND=noninteractive chroot "$ROOT" apt-get install -y -qq --no-download openssh-server >/dev/null 2>&1 ||
        { echo "installing openssh-server in the copy failed"; return 1; }
    rm -f "$ROOT/usr/sbin/policy-rc.d"
    ssh-keygen -q -t ed25519 -N '' -f "$WORK/id"
    install -d -m 0700 "$ROOT/root/.ssh"
    install -m 0600 "$WORK/id.pub" "$ROOT/root/.ssh/authorized_keys"
    echo droplet >"$ROOT/etc/hostname"
    # The copy is offline: apt must not refresh its lists (the apt module's cache_valid_time
    # reads this stamp); the packages are in the cached archive.
    mkdir -p "$ROOT/var/lib/apt/periodic" && touch "$ROOT/var/lib/apt/periodic/update-success-stamp"

    local net
    net=$(pick_subnet) || { echo "no free private /30"; return 1; }
    NS=pgd-$$-$suite
    ADDR=$net.2
    EDGE=$net.3
    ip netns add "$NS"
    ip link add "pgh$$" type veth peer name eth0 netns "$NS"
    ip addr add "$net.1/29" dev "pgh$$"
    ip link set "pgh$$" up
    ip -n "$NS" addr add "$ADDR/29" dev eth0
    # A second address, as a DigitalOcean reserved IP's anchor address: the edge mode's.
    ip -n "$NS" addr add "$EDGE/29" dev eth0
    ip -n "$NS" link set eth0 up
    ip -n "$NS" link set lo up
    ip -n "$NS" route add default via "$net.1"
    boot
    echo "    booted at $ADDR ($(($(date +%s) - start)) s so far)"
    check "SSH into the droplet as root with the key" ssh_droplet true

    inventory A "$DEB_A"
    inventory B "$DEB_B"
    inventory S "$DEB_A" "
    pushgate_nginx_mode: sni
    pushgate_socket_domain: sock.$DOMAIN"
    inventory E "$DEB_A" "
    pushgate_nginx_mode: edge
    pushgate_site_address: $ADDR
    pushgate_edge_address: $EDGE"
    local t
    t=$(date +%s)
    echo "==> $suite: first apply of site.yml over SSH (services managed, package $VERSION_A)"
    apply "$WORK/apply1.log" A
    grep -E '^droplet +:' "$WORK/apply1.log" | sed 's/^/    /'
    echo "    ($(($(date +%s) - t)) s)"

    checks_live "$suite"
    checks_edge "$suite"
    checks_package "$suite"
    cleanup
    echo "    ($suite: $(($(date +%s) - start)) s)"
}

inventory() { # inventory NAME DEB [MORE VARS]: $WORK/inventory-NAME.yml
    cat >"$WORK/inventory-$1.yml" <<EOF
pushgate:
  hosts:
    droplet:
      ansible_host: $ADDR
      ansible_user: root
      ansible_ssh_private_key_file: $WORK/id
      ansible_ssh_common_args: -o StrictHostKeyChecking=no -o UserKnownHostsFile=$WORK/known_hosts
  vars:
    pushgate_domain: $DOMAIN
    pushgate_deb_src: $2
    pushgate_publish_token: $TOKEN
    # The one default changed: a container shares the host's kernel, whose /proc/sys is
    # read-only in it (the file is written all the same, and systemd-sysctl skips it at boot).
    pushgate_sysctl_apply: false${3:-}
EOF
}

# replace_cert ADDRESS: a new certificate, written as pushgate writes one (key first, each file
# renamed into place), is served on ADDRESS:443 within 10 s.
served_fingerprint() { # served_fingerprint ADDRESS
    openssl s_client -connect "$1:443" -servername "$DOMAIN" </dev/null 2>/dev/null |
        openssl x509 -noout -fingerprint -sha256
}
replace_cert() {
    local addr=$1 want f
    openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=$DOMAIN" \
        -keyout "$WORK/new-key.pem" -out "$WORK/new-cert.pem" 2>/dev/null
    want=$(openssl x509 -in "$WORK/new-cert.pem" -noout -fingerprint -sha256)
    new_cert_served() { [ "$(served_fingerprint "$addr")" = "$want" ]; }
    new_cert_served && { echo "the new certificate is served before it is installed"; return 1; }
    # The modes the role gives them (README: owned by pushgate, the key first).
    local -A mode=([privkey.pem]=0600 [fullchain.pem]=0640)
    for f in privkey.pem:new-key.pem fullchain.pem:new-cert.pem; do
        ssh_droplet "umask 077 && cat > /var/lib/pushgate/tls/.${f%%:*}.tmp && chown pushgate:pushgate /var/lib/pushgate/tls/.${f%%:*}.tmp && chmod ${mode[${f%%:*}]} /var/lib/pushgate/tls/.${f%%:*}.tmp && mv /var/lib/pushgate/tls/.${f%%:*}.tmp /var/lib/pushgate/tls/${f%%:*}" <"$WORK/${f##*:}"
    done
    local t0=$SECONDS
    poll 10 new_cert_served || { echo "still serving $(served_fingerprint "$addr")"; return 1; }
    echo "served after $((SECONDS - t0)) s or less"
}

# nginx's complaints about connecting to pushgate (a refused connection would be one).
refused_count() { in_droplet sh -c 'grep -c "connect() failed\|Connection refused" /var/log/nginx/error.log || true'; }
nothing_refused() {
    [ "$(refused_count)" = "$REFUSED_BEFORE" ] || { in_droplet tail -5 /var/log/nginx/error.log; return 1; }
}

no_failed_unit() {
    local failed
    failed=$(in_droplet systemctl --failed --no-legend --plain)
    [ -z "$failed" ] || { echo "$failed"; return 1; }
}
all_well() { services_active && no_failed_unit; }

services_active() {
    local u s out=""
    for u in nginx.service redis-server.service pushgate.socket pushgate.service pushgate-tls-reload.path nftables.service; do
        s=$(in_droplet systemctl is-active "$u" 2>&1 || true)
        [ "$s" = active ] || out+="$u: $s; "
    done
    [ -z "$out" ] || { echo "$out"; return 1; }
}

checks_live() {
    local suite=$1
    echo "==> $suite: checks from outside"
    check "$suite: nginx, redis-server, pushgate.socket, pushgate.service, the certificate watch and nftables active" services_active
    check "$suite: no failed unit" sh -c "[ -z \"\$(nsenter -t $LEADER -a systemctl --failed --no-legend --plain)\" ] || nsenter -t $LEADER -a systemctl --failed --no-legend --plain"
    ssh_droplet cat /var/lib/pushgate/tls/fullchain.pem >"$WORK/standin.pem"
    local curl_s=(curl -sS --max-time 10 --resolve "$DOMAIN:443:$ADDR" --resolve "$DOMAIN:80:$ADDR" --cacert "$WORK/standin.pem")
    https_ok() { "${curl_s[@]}" -o /dev/null -w '%{http_code} %{ssl_verify_result}\n' "https://$DOMAIN/"; }
    check "$suite: HTTPS verifies with the stand-in certificate for $DOMAIN" https_ok
    redirect() {
        local out
        out=$("${curl_s[@]}" -o /dev/null -w '%{http_code} %{redirect_url}' "http://$DOMAIN/socket/x")
        [ "$out" = "301 https://$DOMAIN/socket/x" ] || { echo "$out"; return 1; }
    }
    check "$suite: HTTP is redirected to HTTPS" redirect
    no_demo() {
        # pushgate serves the demo page on its own address (so the marker is the right one) ...
        local demo
        demo=$(in_droplet_net curl -sS --max-time 5 http://127.0.0.1:4000/)
        grep -q '<title>pushgate demo</title>' <<<"$demo" ||
            { echo "pushgate does not serve its demo page on 127.0.0.1:4000"; return 1; }
        # ... and nginx never shows it.
        local body
        body=$("${curl_s[@]}" "https://$DOMAIN/" || true)
        ! grep -q 'pushgate demo' <<<"$body" || { echo "the demo page is served through nginx"; return 1; }
    }
    check "$suite: the demo page is not reachable through nginx" no_demo
    not_proxied() {
        local path code body bad=""
        for path in /api/publish /metrics /healthz /readyz; do
            body=$("${curl_s[@]}" -w '\n%{http_code}' -H "authorization: Bearer $TOKEN" \
                -H 'content-type: application/json' \
                --data '{"topic":"x","event":"e","payload":{}}' -X POST "https://$DOMAIN$path" || true)
            code=${body##*$'\n'}
            if [ "${code:0:1}" = 2 ] || grep -qE 'position|pushgate_' <<<"$body"; then bad+="$path: $code; "; fi
            body=$("${curl_s[@]}" -w '\n%{http_code}' "https://$DOMAIN$path" || true)
            code=${body##*$'\n'}
            if [ "${code:0:1}" = 2 ] || grep -qE 'pushgate_|^ok' <<<"$body"; then bad+="GET $path: $code; "; fi
        done
        [ -z "$bad" ] || { echo "served through nginx: $bad"; return 1; }
    }
    check "$suite: /api/publish, /metrics, /healthz, /readyz not served through nginx" not_proxied
    CLIENTS=4 check "$suite: phoenix client (WebSocket, LongPoll; 1.8.17, 1.7.23) through nginx receives what the loopback API publishes" clients

    # The restart: socket activation keeps connections waiting, Redis keeps the history.
    REFUSED_BEFORE=$(refused_count)
    check "$suite: systemctl restart pushgate with 20 clients and a publisher every 20 ms: nothing lost, every rejoin recovered" \
        clients "[\"nsenter\",\"-t\",\"$LEADER\",\"-a\",\"systemctl\",\"restart\",\"pushgate.service\"]"
    check "$suite: nginx logged no refused connection to pushgate during the restart" nothing_refused

    check "$suite: a new fullchain.pem/privkey.pem is served by nginx within 10 s" replace_cert "$ADDR"

    # The watchdog, with a short interval for the test (the shipped unit: WatchdogSec=30s).
    watchdog() {
        in_droplet mkdir -p /run/systemd/system/pushgate.service.d
        printf '[Service]\nWatchdogSec=3s\nTimeoutAbortSec=2s\n' | in_droplet tee /run/systemd/system/pushgate.service.d/watchdog-test.conf >/dev/null
        in_droplet systemctl daemon-reload
        in_droplet systemctl restart pushgate.service
        local pid restarts
        pid=$(in_droplet systemctl show -P MainPID pushgate.service)
        restarts=$(in_droplet systemctl show -P NRestarts pushgate.service)
        [ "$pid" -gt 0 ] || { echo "pushgate is not running"; return 1; }
        in_droplet kill -STOP "$pid"
        restarted() {
            local p
            p=$(in_droplet systemctl show -P MainPID pushgate.service)
            [ "$p" -gt 0 ] && [ "$p" != "$pid" ] && [ "$(in_droplet systemctl is-active pushgate.service)" = active ]
        }
        local t0=$SECONDS ok=0
        poll 30 restarted && ok=1
        in_droplet rm -f /run/systemd/system/pushgate.service.d/watchdog-test.conf
        in_droplet systemctl daemon-reload
        [ "$ok" = 1 ] || { echo "not restarted"; in_droplet journalctl -u pushgate.service -n 20 --no-pager; return 1; }
        local journal
        journal=$(in_droplet journalctl -u pushgate.service --no-pager)
        grep -q 'Watchdog timeout' <<<"$journal" ||
            { echo "restarted, but not by the watchdog"; return 1; }
        echo "restarted by the watchdog $((SECONDS - t0)) s after SIGSTOP, NRestarts $restarts -> $(in_droplet systemctl show -P NRestarts pushgate.service)"
    }
    check "$suite: a SIGSTOPped pushgate is restarted by its watchdog" watchdog
    in_droplet systemctl restart pushgate.service

    firewall() {
        # A listener on every address, port 8081, answering "probe": reachable on the droplet's
        # own address from inside, never from outside.
        in_droplet systemd-run --unit=fw-probe --quiet python3 -c '
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8081)); s.listen()
while True:
    c, _ = s.accept(); c.sendall(b"probe\n"); c.close()'
        probe_inside() { [ "$(in_droplet_net timeout 2 bash -c "exec 3<>/dev/tcp/$ADDR/8081 && head -1 <&3")" = probe ]; }
        poll 10 probe_inside || { in_droplet systemctl stop fw-probe.service; echo "probe listener not up"; return 1; }
        local got
        got=$(timeout 3 bash -c "exec 3<>/dev/tcp/$ADDR/8081 && head -1 <&3" 2>&1 || true)
        in_droplet systemctl stop fw-probe.service
        [ "$got" != probe ] || { echo "port 8081 answered from outside"; return 1; }
        local rules
        rules=$(in_droplet nft list ruleset)
        grep -q 'tcp dport { 22, 80, 443 } accept' <<<"$rules" || { echo "rules not loaded"; return 1; }
        echo "outside: ${got:-no answer}"
    }
    check "$suite: the firewall drops a port outside 22, 80, 443" firewall

    echo "==> $suite: reboot"
    in_droplet systemctl reboot || true
    local rc=0
    wait "$NSPAWN" || rc=$?
    # systemd-nspawn exits with 133 when the container asks for a reboot.
    [ "$rc" = 133 ] || { echo "systemd-nspawn exited with $rc, expected 133 (reboot)"; }
    boot
    check "$suite: after the reboot: every service active again by itself" poll 60 services_active
    check "$suite: after the reboot: no failed unit" sh -c "[ -z \"\$(nsenter -t $LEADER -a systemctl --failed --no-legend --plain)\" ] || nsenter -t $LEADER -a systemctl --failed --no-legend --plain"
    check "$suite: after the reboot: the firewall drops a port outside 22, 80, 443" firewall
    CLIENTS=4 check "$suite: after the reboot: phoenix client through nginx receives what the loopback API publishes" clients
}

# requests_across_restarts NAME ADDRESS [CURL OPTIONS]: GET https://NAME/healthz on ADDRESS:443 in
# a loop while pushgate restarts twice; every request must be answered.
requests_across_restarts() {
    local name=$1 addr=$2 log=$WORK/probe.log stop=$WORK/probe.stop probe n bad
    shift 2
    : >"$log"
    rm -f "$stop"
    (
        while [ ! -e "$stop" ]; do
            curl -s -o /dev/null --max-time 10 --resolve "$name:443:$addr" "$@" "https://$name/healthz"
            echo "$?" >>"$log"
        done
    ) &
    probe=$!
    poll 10 test -s "$log"
    in_droplet systemctl restart pushgate.service
    in_droplet systemctl restart pushgate.service
    n=$(wc -l <"$log")
    poll 10 sh -c "[ \$(wc -l <'$log') -gt $((n + 5)) ]"
    touch "$stop"
    wait "$probe"
    n=$(wc -l <"$log")
    bad=$(grep -cvx 0 "$log" || true)
    [ "$bad" = 0 ] || { echo "$bad of $n requests failed (curl exit codes, 7 is refused: $(sort "$log" | uniq -c | tr -s ' \n' ' '))"; return 1; }
    echo "$n requests across two restarts, every one answered"
}

# listening ADDRESS:PORT NAME: NAME (nginx or pushgate) listens on ADDRESS:PORT (the droplet's
# network namespace, seen from the host).
listening() {
    local out
    out=$(in_droplet_net ss -Hltnp "sport = :${1##*:}")
    grep -qE "^LISTEN +[0-9]+ +[0-9]+ +${1//./\\.} .*\"$2\"" <<<"$out" || { echo "$2 not on $1: $out"; return 1; }
}
# no_wildcard PORT: nothing listens on 0.0.0.0:PORT (the edge address's port would be taken).
no_wildcard() {
    local out
    out=$(in_droplet_net ss -Hltn "sport = :$1")
    ! grep -qE " (0\.0\.0\.0|\*):$1 " <<<"$out" || { echo "a wildcard listener on port $1: $out"; return 1; }
}

checks_edge() {
    local suite=$1
    echo "==> $suite: the edge mode: pushgate's own TLS edge on $EDGE, nginx's site on $ADDR"
    timed_apply "$WORK/apply-edge.log" E
    local curl_s=(curl -sS --max-time 10 --cacert "$WORK/edge-cert.pem")
    edge_listeners() {
        listening "$EDGE:443" pushgate && listening "$EDGE:80" pushgate &&
            listening "$ADDR:443" nginx && listening "$ADDR:80" nginx && no_wildcard 443 && no_wildcard 80
    }
    edge_checks() { # edge_checks WHEN
        # The certificate in use (the stand-in, or the one replace_cert installed).
        ssh_droplet cat /var/lib/pushgate/tls/fullchain.pem >"$WORK/edge-cert.pem"
        check "$suite: $1every service active, no failed unit" all_well
        check "$suite: $1pushgate listens on $EDGE:443 and :80, nginx on $ADDR:443 and :80, nothing on the IPv4 wildcard" edge_listeners
        site_ok() {
            local out
            out=$("${curl_s[@]}" --resolve "$DOMAIN:443:$ADDR" -o /dev/null -w '%{http_code} %{ssl_verify_result}' "https://$DOMAIN/socket/websocket")
            # nginx proxies /socket/ on the site's address still: pushgate refuses a GET without
            # an upgrade (400 or 426), nginx's own answer would be 404 or 502.
            [ "$out" = "400 0" ] || [ "$out" = "426 0" ] || { echo "site: $out"; return 1; }
            echo "$out"
        }
        check "$suite: $1the site's HTTPS on $ADDR verifies, and still proxies /socket/" site_ok
        edge_ok() {
            local health api
            health=$("${curl_s[@]}" --resolve "$DOMAIN:443:$EDGE" "https://$DOMAIN/healthz")
            grep -q '"status":"ok"' <<<"$health" || { echo "/healthz at the edge: $health"; return 1; }
            # The API and the metrics stay on loopback. Over HTTP/1.1: over HTTP/2 the 404 comes
            # before the body is read, and the stream is then reset with NO_ERROR (RFC 9113,
            # 8.1), which curl 7.88 sometimes takes as an error and drops the answer (exit 92;
            # nghttp sees HEADERS and DATA every time).
            api=$("${curl_s[@]}" --http1.1 --resolve "$DOMAIN:443:$EDGE" -o /dev/null -w '%{http_code}' -H "authorization: Bearer $TOKEN" \
                -H 'content-type: application/json' --data '{"topic":"x","event":"e","payload":{}}' "https://$DOMAIN/api/publish")
            [ "$api" = 404 ] || { echo "/api/publish at the edge: $api"; return 1; }
            echo "/healthz ok, /api/publish 404"
        }
        check "$suite: $1pushgate's edge on $EDGE:443 serves the certificate files (verified for $DOMAIN), /healthz, and not the API" edge_ok
        edge_redirect() {
            local out
            out=$(curl -sS --max-time 10 --resolve "$DOMAIN:80:$EDGE" -o /dev/null -w '%{http_code} %{redirect_url}' "http://$DOMAIN/socket/x")
            [ "$out" = "301 https://$DOMAIN/socket/x" ] || { echo "$out"; return 1; }
        }
        check "$suite: $1HTTP on $EDGE:80 is redirected to HTTPS by pushgate" edge_redirect
        URL="https://$EDGE" CLIENTS=4 check "$suite: $1phoenix client (WebSocket, LongPoll; 1.8.17, 1.7.23) over the edge receives what the loopback API publishes" clients
    }
    edge_checks ""

    URL="https://$EDGE" check "$suite: edge: systemctl restart pushgate with 20 clients on the edge and a publisher every 20 ms: nothing lost, every rejoin recovered" \
        clients "[\"nsenter\",\"-t\",\"$LEADER\",\"-a\",\"systemctl\",\"restart\",\"pushgate.service\"]"
    # pushgate.socket holds the edge's ports too: connections made while pushgate restarts
    # wait in the kernel's queue, and the next process answers them.
    check "$suite: edge: HTTPS requests to the edge in a loop across two restarts of pushgate: none refused, every one answered" \
        requests_across_restarts "$DOMAIN" "$EDGE" --cacert "$WORK/edge-cert.pem"
    check "$suite: edge: a new fullchain.pem/privkey.pem is served by pushgate's edge within 10 s" replace_cert "$EDGE"

    echo "==> $suite: edge: reboot"
    in_droplet systemctl reboot || true
    wait "$NSPAWN" || true
    boot
    poll 60 services_active || true
    edge_checks "after the reboot: "

    checks_sni "$suite"

    echo "==> $suite: back to the default site"
    timed_apply "$WORK/apply-site.log" A
    site_again() {
        in_droplet_net ss -Hltn "sport = :443" | grep -qE " (0\.0\.0\.0|\*):443 " || { echo "nginx not on *:443"; return 1; }
        in_droplet_net ss -Hltn "sport = :80" | grep -qE " (0\.0\.0\.0|\*):80 " || { echo "nginx not on *:80"; return 1; }
        ! in_droplet_net ss -Hltnp '( sport = :443 or sport = :80 )' | grep -q '"pushgate"' ||
            { echo "pushgate still listens on port 443 or 80"; return 1; }
        [ ! -e "$ROOT/etc/systemd/system/pushgate.service.d/edge.conf" ] || { echo "the edge drop-in is still there"; return 1; }
        services_active
    }
    check "$suite: back to the site: nginx on the wildcard again, pushgate off ports 443 and 80, the drop-in gone, every service active" site_again
    URL="https://$EDGE" CLIENTS=4 check "$suite: back to the site: phoenix client through nginx on $EDGE (nginx on every address again) receives what the loopback API publishes" clients
}

# The SNI mode, from the edge mode: nginx's stream server on 443 sends the socket name to
# pushgate's edge on loopback (pushgate.socket's), every other name to the site.
checks_sni() {
    local suite=$1
    echo "==> $suite: the SNI mode: nginx's stream server on *:443, sock.$DOMAIN to pushgate's edge"
    timed_apply "$WORK/apply-sni.log" S
    check "$suite: SNI: every service active, no failed unit" all_well
    sni_listeners() {
        listening "0.0.0.0:443" nginx && listening "127.0.0.1:8443" nginx && listening "127.0.0.1:4443" pushgate || return 1
        ! in_droplet_net ss -Hltn "sport = :443" | grep -q " $EDGE:443 " || { echo "$EDGE:443 is still held"; return 1; }
    }
    check "$suite: SNI: nginx on *:443 and the site on 127.0.0.1:8443, pushgate's edge on 127.0.0.1:4443 (pushgate.socket's), the edge address free" sni_listeners
    ssh_droplet cat /var/lib/pushgate/tls/fullchain.pem >"$WORK/sni-cert.pem"
    sni_routes() {
        local health site
        # The stand-in certificate names the site only: the socket name is not verified here.
        health=$(curl -sS -k --max-time 10 --resolve "sock.$DOMAIN:443:$ADDR" "https://sock.$DOMAIN/healthz")
        grep -q '"status":"ok"' <<<"$health" || { echo "sock.$DOMAIN/healthz: $health"; return 1; }
        site=$(curl -sS --max-time 10 --cacert "$WORK/sni-cert.pem" --resolve "$DOMAIN:443:$ADDR" -o /dev/null \
            -w '%{http_code} %{ssl_verify_result}' "https://$DOMAIN/healthz")
        # The site does not serve /healthz (nginx: the app, absent here, 502), pushgate does.
        [ "${site%% *}" != 200 ] && [ "${site#* }" = 0 ] || { echo "$DOMAIN/healthz: $site"; return 1; }
        echo "sock.$DOMAIN: pushgate's /healthz; $DOMAIN: the site ($site)"
    }
    check "$suite: SNI: sock.$DOMAIN reaches pushgate's edge, $DOMAIN the site (verified)" sni_routes
    check "$suite: SNI: HTTPS requests to sock.$DOMAIN in a loop across two restarts of pushgate: none refused, every one answered" \
        requests_across_restarts "sock.$DOMAIN" "$ADDR" -k
}

checks_package() {
    local suite=$1
    echo "==> $suite: the package: upgrade by the role with clients connected, idempotence, purge"
    local pid_before
    pid_before=$(in_droplet systemctl show -P MainPID pushgate.service)
    REFUSED_BEFORE=$(refused_count)
    check "$suite: applying the role with package $VERSION_B while 20 clients are connected and a publisher runs: nothing lost, every rejoin recovered" \
        clients "[\"bash\",\"-c\",\"cd '$REPO/ansible' && ansible-playbook -i '$WORK/inventory-B.yml' site.yml > '$WORK/apply-upgrade.log' 2>&1 || { tail -40 '$WORK/apply-upgrade.log'; exit 1; }\"]"
    upgraded() {
        local v pid
        v=$(in_droplet dpkg-query -W -f '${Status} ${Version}' pushgate)
        [ "$v" = "install ok installed $VERSION_B" ] || { echo "dpkg: $v"; return 1; }
        pid=$(in_droplet systemctl show -P MainPID pushgate.service)
        [ "$pid" -gt 0 ] && [ "$pid" != "$pid_before" ] || { echo "pushgate was not restarted (MainPID $pid_before, now $pid)"; return 1; }
        echo "$v, MainPID $pid_before -> $pid"
    }
    check "$suite: package $VERSION_B installed and pushgate restarted by it" upgraded
    check "$suite: nginx logged no refused connection to pushgate during the upgrade" nothing_refused

    echo "==> $suite: apply again: must change nothing"
    apply "$WORK/apply2.log" B
    local recap
    recap=$(grep -E '^droplet +:' "$WORK/apply2.log")
    echo "    $recap"
    idempotent() {
        grep -q 'changed=0 ' <<<"$recap" && grep -q 'failed=0 ' <<<"$recap" || {
            grep -E '^changed:' -B2 "$WORK/apply2.log"
            return 1
        }
    }
    check "$suite: a second apply reports zero changes" idempotent

    purged() {
        in_droplet env DEBIAN_FRONTEND=noninteractive apt-get purge -y -q pushgate >"$WORK/purge.log" 2>&1 ||
            { tail -20 "$WORK/purge.log"; return 1; }
        local left=""
        local st
        st=$(in_droplet dpkg-query -W -f '${Status}' pushgate 2>/dev/null || true)
        [ "$st" != "install ok installed" ] || left+="package; "
        for f in /usr/bin/pushgate /usr/lib/systemd/system/pushgate.service /usr/lib/systemd/system/pushgate.socket \
            /etc/pushgate/pushgate.toml /etc/pushgate/pushgate.env /var/lib/pushgate; do
            [ ! -e "$ROOT$f" ] || left+="$f; "
        done
        local s
        s=$(in_droplet systemctl is-active pushgate.socket pushgate.service 2>&1 || true)
        ! grep -qx active <<<"$s" || left+="units still active ($s); "
        [ -z "$(in_droplet_net ss -Hltn 'sport = :4000')" ] || left+="something listens on 127.0.0.1:4000; "
        [ -z "$left" ] || { echo "left after purge: $left"; return 1; }
    }
    check "$suite: apt-get purge pushgate removes the package, its units, config and state, and the socket" purged

    # README's by-hand path, on the purged host: apt-get install ./pushgate_*.deb, nothing else.
    healthy() { in_droplet_net curl -fsS --max-time 2 http://127.0.0.1:4000/healthz; }
    by_hand() {
        in_droplet env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "/var/cache/pushgate-deb/$(basename "$DEB_B")" \
            >"$WORK/by-hand.log" 2>&1 || { tail -20 "$WORK/by-hand.log"; return 1; }
        [ ! -e "$ROOT/etc/pushgate/pushgate.env" ] || { echo "/etc/pushgate/pushgate.env is there"; return 1; }
        in_droplet dpkg-query -W -f '${Conffiles}\n' pushgate | grep -q '^ /etc/pushgate/pushgate.toml ' ||
            { echo "/etc/pushgate/pushgate.toml is not a conffile"; return 1; }
        poll 20 healthy || { echo "pushgate does not answer on 127.0.0.1:4000 after the install"; return 1; }
        [ "$(in_droplet systemctl is-enabled pushgate.socket pushgate.service pushgate-tls-reload.path | sort -u)" = enabled ] ||
            { echo "units not enabled"; return 1; }
        echo "installed, enabled and answering"
    }
    check "$suite: apt-get install ./pushgate_*.deb by hand: pushgate runs on 127.0.0.1:4000, units enabled, pushgate.toml a conffile" by_hand
    no_config() {
        local pid
        pid=$(in_droplet systemctl show -P MainPID pushgate.service)
        in_droplet rm /etc/pushgate/pushgate.toml
        in_droplet systemctl restart pushgate.service
        [ "$(in_droplet systemctl show -P MainPID pushgate.service)" != "$pid" ] || { echo "not restarted"; return 1; }
        poll 20 healthy || { in_droplet journalctl -u pushgate.service -n 10 --no-pager; return 1; }
        [ "$(in_droplet systemctl is-active pushgate.service)" = active ] || return 1
        echo "active and answering without /etc/pushgate/pushgate.toml"
    }
    check "$suite: pushgate starts without /etc/pushgate/pushgate.toml" no_config
}

for suite in $SUITES; do
    droplet "$suite"
done
echo "droplet: $passed passed, $failed failed"
[ "$failed" = 0 ]
