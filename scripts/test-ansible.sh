#!/usr/bin/env bash
# Tests ansible/ for real:
#   1. ansible-lint (production profile) and ansible-playbook --syntax-check, from a virtualenv
#      with pinned ansible-core, ansible (for the community.general.chroot connection the
#      test uses; the role itself needs only ansible-core) and ansible-lint;
#   2. applies site.yml to a fresh copy of a Debian 12 root filesystem made by debootstrap,
#      over a chroot connection, with service management off (nothing runs in a chroot);
#   3. checks the result: the user, files and permissions, the rendered config accepted by
#      `pushgate check-config` (as the pushgate user, with the environment file), the rendered
#      nginx site accepted by `nginx -t`, the units accepted by `systemd-analyze verify`, the
#      firewall rules by `nft -c`; then a second apply must report zero changes;
#   4. applies it to another fresh copy in the SNI mode (pushgate_nginx_mode: sni): the stream
#      module, the stream server in modules-enabled, the site on loopback with proxy_protocol,
#      pushgate's edge settings, accepted by `nginx -t` and `pushgate check-config`;
#   5. on that copy, the edge mode (pushgate_nginx_mode: edge): refused early without its two
#      addresses; with them (loopback stand-ins: 127.0.0.2 and ::1 for the site, 127.0.0.3 for
#      pushgate) the stream server removed, the site listening on the site's addresses only,
#      pushgate's tls.listen and tls.redirect_listen on the edge address, pushgate.socket
#      holding the edge address's ports (no capability drop-in), accepted by `nginx -t`,
#      `pushgate check-config` and `systemd-analyze verify`, a second apply changing nothing;
#      then the site mode, whose socket no longer holds them, and nginx on 443 again.
#
# Needs root (debootstrap, chroot). The root filesystem and the virtualenv are cached under
# PUSHGATE_TEST_CACHE (default /var/cache/pushgate-test) and reused: the first run takes a few
# minutes (debootstrap, package downloads), later ones about one.
#
# Usage: scripts/test-ansible.sh path/to/pushgate_<version>_amd64.deb   (scripts/build-deb.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DEB=$(realpath "${1:?usage: scripts/test-ansible.sh path/to/pushgate.deb}")
DEB_VERSION=$(dpkg-deb -f "$DEB" Version)
CACHE=${PUSHGATE_TEST_CACHE:-/var/cache/pushgate-test}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ANSIBLE_CORE=2.19.14
ANSIBLE=12.3.0
ANSIBLE_LINT=26.10.1
TOKEN=ansible-test-token-0123456789abcdef

if [ "$(id -u)" != 0 ]; then
    echo "scripts/test-ansible.sh needs root (debootstrap, chroot); try sudo" >&2
    exit 1
fi
mkdir -p "$CACHE"

passed=0
failed=0
check() { # check "what" command...
    local what=$1
    shift
    if out=$("$@" 2>&1); then
        echo "    ok: $what"
        passed=$((passed + 1))
    else
        echo "    FAILED: $what"
        echo "$out" | sed 's/^/        /' | tail -40
        failed=$((failed + 1))
    fi
}

# --- 1. virtualenv, lint, syntax check ---------------------------------------------------------
VENV=$CACHE/venv-ansible-$ANSIBLE_CORE-$ANSIBLE_LINT
if [ ! -f "$VENV/.complete" ]; then
    echo "==> creating $VENV (ansible-core $ANSIBLE_CORE, ansible $ANSIBLE, ansible-lint $ANSIBLE_LINT)"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check \
        "ansible-core==$ANSIBLE_CORE" "ansible==$ANSIBLE" "ansible-lint==$ANSIBLE_LINT"
    touch "$VENV/.complete"
fi
export PATH="$VENV/bin:$PATH"
export ANSIBLE_NOCOLOR=1 ANSIBLE_FORCE_COLOR=0 ANSIBLE_CONFIG="$REPO/ansible/ansible.cfg"

echo "==> ansible-lint --profile production"
(cd ansible && ansible-lint --offline --profile production --nocolor -q)
echo "==> ansible-playbook --syntax-check"
(cd ansible && ansible-playbook --syntax-check -i inventory.example.yml site.yml >/dev/null)

# --- 2. the root filesystem ----------------------------------------------------------------------
PACKAGES=$(python3 - "$REPO/ansible/roles/pushgate/defaults/main.yml" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
block = re.search(r"^pushgate_packages:\n((?:  - .*\n)+)", text, re.M).group(1)
print(" ".join(line.split("- ", 1)[1].strip() for line in block.splitlines()))
EOF
)
BASE=$CACHE/rootfs-$SUITE
if [ ! -f "$BASE/.complete" ]; then
    command -v debootstrap >/dev/null || {
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap
    }
    echo "==> debootstrap $SUITE into $BASE (cached for later runs)"
    rm -rf "$BASE"
    debootstrap --variant=minbase --include=python3,python3-apt,systemd,ca-certificates \
        "$SUITE" "$BASE" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 || {
        tail -30 "$CACHE/debootstrap.log"
        exit 1
    }
    # As in container images: packages installed in the chroot start no services.
    printf '#!/bin/sh\nexit 101\n' >"$BASE/usr/sbin/policy-rc.d"
    chmod 0755 "$BASE/usr/sbin/policy-rc.d"
    cp /etc/resolv.conf "$BASE/etc/resolv.conf"
    # Download (not install) the role's packages, so applying the role installs them offline.
    chroot "$BASE" apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive chroot "$BASE" apt-get install -y -qq --download-only $PACKAGES >/dev/null
    touch "$BASE/.complete"
fi

WORK=$(mktemp -d "$CACHE/work.XXXXXX")
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT
ROOT=$WORK/root
echo "==> copying the root filesystem to $ROOT"
cp -a "$BASE" "$ROOT"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"

cat >"$WORK/inventory.yml" <<EOF
pushgate:
  hosts:
    rootfs:
      ansible_connection: community.general.chroot
      ansible_host: $ROOT
  vars:
    pushgate_manage_services: false
    pushgate_domain: pushgate.test
    pushgate_deb_src: $DEB
    pushgate_publish_token: $TOKEN
    pushgate_listen: 127.0.0.1:4100
    pushgate_settings:
      history: {size: 2000, max_age_secs: 600}
      server: {worker_threads: 1}
    pushgate_env: {PUSHGATE_LOG: info}
    pushgate_use_redis: true
EOF

apply() { # apply LOGFILE [ansible-playbook options...]
    local log=$1
    shift
    (cd ansible && ansible-playbook -i "$WORK/inventory.yml" site.yml "$@") >"$log" 2>&1 || {
        tail -60 "$log"
        echo "ansible-playbook failed (log: $log)"
        return 1
    }
}

# --- 3. apply and check --------------------------------------------------------------------------
echo "==> first apply of site.yml to the chroot"
start=$(date +%s)
apply "$WORK/apply1.log"
grep -E '^rootfs +:' "$WORK/apply1.log" | sed 's/^/    /'
echo "    ($(($(date +%s) - start)) s)"

echo "==> checks on the provisioned root filesystem"
in_root() { chroot "$ROOT" "$@"; }
stat_is() { # stat_is PATH "owner:group mode"
    local got
    got=$(chroot "$ROOT" stat -c '%U:%G %a' "$1" 2>&1)
    [ "$got" = "$2" ] || { echo "$1: $got, expected $2"; return 1; }
}
user_ok() {
    local entry
    entry=$(in_root getent passwd pushgate) || { echo "no user pushgate"; return 1; }
    IFS=: read -r _ _ uid _ _ home shell <<<"$entry"
    [ "$uid" -lt 1000 ] && [ "$home" = /var/lib/pushgate ] && [ "$shell" = /usr/sbin/nologin ] ||
        { echo "pushgate user: $entry"; return 1; }
}
check "system user pushgate (nologin, home /var/lib/pushgate)" user_ok
check "binary root:root 755" stat_is /usr/bin/pushgate "root:root 755"
check "the package given is installed" sh -c "[ \"\$(chroot '$ROOT' dpkg-query -W -f '\${Status} \${Version}' pushgate)\" = 'install ok installed $DEB_VERSION' ]"
check "units from the package, enabled for the first boot" sh -c "test -f '$ROOT/usr/lib/systemd/system/pushgate.service' && test -L '$ROOT/etc/systemd/system/multi-user.target.wants/pushgate.service' && test -L '$ROOT/etc/systemd/system/sockets.target.wants/pushgate.socket'"
check "config root:pushgate 640" stat_is /etc/pushgate/pushgate.toml "root:pushgate 640"
check "environment file root:root 600" stat_is /etc/pushgate/pushgate.env "root:root 600"
check "token in the environment file" grep -qx "PUSHGATE_PUBLISH_TOKEN=$TOKEN" "$ROOT/etc/pushgate/pushgate.env"
check "state dir pushgate:pushgate 750" stat_is /var/lib/pushgate "pushgate:pushgate 750"
check "tls dir pushgate:pushgate 750" stat_is /var/lib/pushgate/tls "pushgate:pushgate 750"
check "stand-in private key pushgate:pushgate 600" stat_is /var/lib/pushgate/tls/privkey.pem "pushgate:pushgate 600"
check "stand-in certificate for the domain" sh -c "openssl x509 -in '$ROOT/var/lib/pushgate/tls/fullchain.pem' -noout -subject | grep -q pushgate.test"

# pushgate check-config in the root, as user pushgate with the unit's environment: the effective
# configuration on stdout (printed, and a failure, when it refuses).
check_config_as_pushgate() {
    local env out
    mapfile -t env < <(grep -E '^[A-Z_]+=' "$ROOT/etc/pushgate/pushgate.env")
    out=$(chroot --userspec=pushgate:pushgate "$ROOT" /usr/bin/env -i "${env[@]}" \
        /usr/bin/pushgate check-config --config /etc/pushgate/pushgate.toml) || {
        echo "$out"
        return 1
    }
    echo "$out"
}
check_config() {
    local out
    out=$(check_config_as_pushgate) || { echo "$out"; return 1; }
    grep -q '^size = 2000$' <<<"$out" && grep -q '^worker_threads = 1$' <<<"$out" &&
        grep -q 'token = "(set, hidden)"' <<<"$out" && grep -q '^listen = "127.0.0.1:4100"$' <<<"$out" &&
        grep -q '^url = "redis://:hidden@127.0.0.1:6379/"$' <<<"$out" || { echo "$out"; return 1; }
}
check "pushgate check-config accepts the rendered config (as user pushgate)" check_config
REDIS_PASSWORD=$(cat "$ROOT/etc/pushgate/redis-password" 2>/dev/null || true)
check "redis password file root:root 600" stat_is /etc/pushgate/redis-password "root:root 600"
check "redis password: 64 hex digits" grep -qxE '[0-9a-f]{64}' "$ROOT/etc/pushgate/redis-password"
check "redis.conf requires the password" grep -qx "requirepass $REDIS_PASSWORD" "$ROOT/etc/redis/redis.conf"
check "redis.conf binds loopback only (one bind line: 127.0.0.1 -::1)" sh -c \
    "[ \"\$(grep -E '^[[:space:]]*bind[[:space:]]' '$ROOT/etc/redis/redis.conf')\" = 'bind 127.0.0.1 -::1' ]"
check "redis.conf protected-mode yes" grep -qx 'protected-mode yes' "$ROOT/etc/redis/redis.conf"
check "redis.conf takes no snapshots (one save line: save \"\")" sh -c \
    "[ \"\$(grep -E '^[[:space:]]*save[[:space:]]' '$ROOT/etc/redis/redis.conf')\" = 'save \"\"' ]"
check "redis.conf appendonly no" grep -qx 'appendonly no' "$ROOT/etc/redis/redis.conf"
check "redis.conf redis:redis 640" stat_is /etc/redis/redis.conf "redis:redis 640"
check "pushgate's Redis URL carries the password" grep -qx "PUSHGATE_REDIS_URL=redis://:$REDIS_PASSWORD@127.0.0.1:6379/" "$ROOT/etc/pushgate/pushgate.env"
check "nginx -t accepts the rendered site" in_root nginx -t
check "nginx site enabled, default site removed" sh -c "test -L '$ROOT/etc/nginx/sites-enabled/pushgate.conf' && ! test -e '$ROOT/etc/nginx/sites-enabled/default'"
check "nginx site: server_name and upstreams rendered" sh -c "grep -q 'server_name pushgate.test;' '$ROOT/etc/nginx/sites-available/pushgate.conf' && grep -q 'server 127.0.0.1:4100;' '$ROOT/etc/nginx/sites-available/pushgate.conf'"
check "nginx worker_connections and worker_rlimit_nofile" sh -c "grep -qE '^\s*worker_connections 200000;' '$ROOT/etc/nginx/nginx.conf' && grep -qE '^worker_rlimit_nofile 250000;' '$ROOT/etc/nginx/nginx.conf'"
verify_units() {
    local out
    out=$(systemd-analyze verify --man=no --root="$ROOT" pushgate.service pushgate.socket \
        pushgate-tls-reload.path pushgate-tls-reload.service 2>&1) || { echo "$out"; return 1; }
    [ -z "$out" ] || { echo "$out"; return 1; }
}
check "systemd-analyze verify accepts the installed units" verify_units
check "pushgate.socket listens where configured (drop-in)" grep -qx 'ListenStream=127.0.0.1:4100' "$ROOT/etc/systemd/system/pushgate.socket.d/listen.conf"
check "sysctl settings for many sockets" grep -qx 'fs.nr_open = 1048576' "$ROOT/etc/sysctl.d/60-pushgate.conf"
check "nft -c accepts the firewall rules" in_root nft -c -f /etc/nftables.conf
check "firewall opens only 22, 80, 443" grep -q 'tcp dport { 22, 80, 443 } accept' "$ROOT/etc/nftables.conf"

echo "==> second apply: must change nothing"
apply "$WORK/apply2.log"
recap=$(grep -E '^rootfs +:' "$WORK/apply2.log")
echo "    $recap"
idempotent() {
    grep -q 'changed=0 ' <<<"$recap" && grep -q 'failed=0 ' <<<"$recap" || {
        grep -E '^changed:' -B2 "$WORK/apply2.log"
        return 1
    }
}
check "second apply reports zero changes" idempotent
check "the Redis password is kept across applies" sh -c \
    "[ -n '$REDIS_PASSWORD' ] && [ \"\$(cat '$ROOT/etc/pushgate/redis-password')\" = '$REDIS_PASSWORD' ] && grep -qx 'requirepass $REDIS_PASSWORD' '$ROOT/etc/redis/redis.conf'"

# --- 4. the SNI mode on a fresh host, then the site mode -------------------------------------
# A first apply in the SNI mode, on a host the role has not seen: pushgate's configuration then
# names certificate files that must exist before check-config validates it.
ROOT=$WORK/root-sni
echo "==> copying the root filesystem to $ROOT"
cp -a "$BASE" "$ROOT"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
sed "s|ansible_host: .*|ansible_host: $ROOT|" "$WORK/inventory.yml" >"$WORK/inventory-sni.yml"
mv "$WORK/inventory-sni.yml" "$WORK/inventory.yml"
echo "==> first apply in the SNI mode (pushgate_nginx_mode: sni)"
apply "$WORK/apply-sni.log" -e pushgate_nginx_mode=sni -e pushgate_socket_domain=socket.pushgate.test
grep -E '^rootfs +:' "$WORK/apply-sni.log" | sed 's/^/    /'
SNI_CONF=$ROOT/etc/nginx/modules-enabled/60-pushgate-sni.conf
SITE_CONF=$ROOT/etc/nginx/sites-available/pushgate.conf
check "SNI: nginx's stream module installed" test -f "$ROOT/usr/lib/nginx/modules/ngx_stream_module.so"
check "SNI: the stream server sends the socket name to pushgate's edge, the rest to the site" sh -c \
    "grep -q 'socket.pushgate.test 127.0.0.1:4443;' '$SNI_CONF' && grep -q 'default 127.0.0.1:8443;' '$SNI_CONF' && grep -q 'listen 443;' '$SNI_CONF' && grep -q 'proxy_protocol on;' '$SNI_CONF'"
check "SNI: the site listens on loopback with proxy_protocol" sh -c \
    "grep -q 'listen 127.0.0.1:8443 proxy_protocol ssl http2;' '$SITE_CONF' && grep -q 'listen \\[::1\\]:8443 proxy_protocol ssl http2;' '$SITE_CONF' && ! grep -q 'listen 443 ssl' '$SITE_CONF'"
check "SNI: nginx -t accepts the stream server and the site" in_root nginx -t
check_config_sni() {
    local out
    out=$(check_config_as_pushgate) || { echo "$out"; return 1; }
    grep -q '^listen = "127.0.0.1:4443"$' <<<"$out" && grep -q '^proxy_protocol = true$' <<<"$out" &&
        grep -q '^cert_file = "/var/lib/pushgate/tls/fullchain.pem"$' <<<"$out" || { echo "$out"; return 1; }
}
check "SNI: pushgate check-config accepts the edge settings and loads the certificate (as user pushgate)" check_config_sni
check "SNI: pushgate.socket holds the edge's socket (127.0.0.1:4443 beside 127.0.0.1:4100)" sh -c \
    "grep -qx 'ListenStream=127.0.0.1:4443' '$ROOT/etc/systemd/system/pushgate.socket.d/listen.conf' && grep -qx 'ListenStream=127.0.0.1:4100' '$ROOT/etc/systemd/system/pushgate.socket.d/listen.conf'"

# --- 5. the edge mode on that host (from the SNI mode), then the site mode ----------------------
EDGE_DROPIN=$ROOT/etc/systemd/system/pushgate.service.d/edge.conf
SOCKET_DROPIN=$ROOT/etc/systemd/system/pushgate.socket.d/listen.conf
echo "==> the edge mode without its addresses: refused before anything changes"
edge_refused() {
    if (cd ansible && ansible-playbook -i "$WORK/inventory.yml" site.yml -e pushgate_nginx_mode=edge) \
        >"$WORK/apply-edge-refused.log" 2>&1; then
        echo "the apply succeeded"
        return 1
    fi
    grep -q 'pushgate_nginx_mode edge needs two addresses of the host' "$WORK/apply-edge-refused.log" &&
        grep -qE '^rootfs +:.* changed=0 ' "$WORK/apply-edge-refused.log" || {
        tail -30 "$WORK/apply-edge-refused.log"
        return 1
    }
}
check "edge: without pushgate_site_address and pushgate_edge_address the role fails early, saying so" edge_refused
EDGE_VARS=(-e pushgate_nginx_mode=edge -e pushgate_site_address=127.0.0.2
    -e pushgate_site_address_v6=::1 -e pushgate_edge_address=127.0.0.3)
echo "==> apply in the edge mode (pushgate_nginx_mode: edge)"
apply "$WORK/apply-edge.log" "${EDGE_VARS[@]}"
grep -E '^rootfs +:' "$WORK/apply-edge.log" | sed 's/^/    /'
check "edge: the SNI mode's stream server removed" test ! -e "$SNI_CONF"
listens() { # the listen lines of the site, one per line
    grep -E '^\s*listen ' "$SITE_CONF" | sed -E 's/^\s+//'
}
edge_site_listens() {
    local got want
    got=$(listens)
    want=$(printf '%s\n' 'listen 127.0.0.2:80;' 'listen [::1]:80;' \
        'listen 127.0.0.2:443 ssl http2;' 'listen [::1]:443 ssl http2;')
    [ "$got" = "$want" ] || { echo "listen lines:"; echo "$got"; return 1; }
}
check "edge: the site listens on the site's addresses only (127.0.0.2, [::1]; ports 80 and 443)" edge_site_listens
check "edge: nginx -t accepts the site" in_root nginx -t
check_config_edge() {
    local out
    out=$(check_config_as_pushgate) || { echo "$out"; return 1; }
    grep -q '^listen = "127.0.0.3:443"$' <<<"$out" && grep -q '^redirect_listen = "127.0.0.3:80"$' <<<"$out" &&
        grep -q '^proxy_protocol = false$' <<<"$out" &&
        grep -q '^cert_file = "/var/lib/pushgate/tls/fullchain.pem"$' <<<"$out" &&
        grep -q '^key_file = "/var/lib/pushgate/tls/privkey.pem"$' <<<"$out" &&
        grep -q '^listen = "127.0.0.1:4100"$' <<<"$out" || { echo "$out"; return 1; }
}
check "edge: pushgate check-config: tls.listen 127.0.0.3:443, tls.redirect_listen 127.0.0.3:80, no PROXY protocol, the certificate files (as user pushgate)" check_config_edge
check "edge: pushgate.socket holds the edge's ports (127.0.0.3:443 and :80 beside 127.0.0.1:4100); no capability drop-in" sh -c \
    "grep -qx 'ListenStream=127.0.0.3:443' '$SOCKET_DROPIN' && grep -qx 'ListenStream=127.0.0.3:80' '$SOCKET_DROPIN' && grep -qx 'ListenStream=127.0.0.1:4100' '$SOCKET_DROPIN' && ! test -e '$EDGE_DROPIN'"
check "edge: systemd-analyze verify accepts the units with the socket's drop-in" verify_units
echo "==> second apply in the edge mode: must change nothing"
apply "$WORK/apply-edge2.log" "${EDGE_VARS[@]}"
recap=$(grep -E '^rootfs +:' "$WORK/apply-edge2.log")
echo "    $recap"
idempotent_edge() {
    grep -q 'changed=0 ' <<<"$recap" && grep -q 'failed=0 ' <<<"$recap" || {
        grep -E '^changed:' -B2 "$WORK/apply-edge2.log"
        return 1
    }
}
check "edge: second apply reports zero changes" idempotent_edge

echo "==> apply in the site mode again"
apply "$WORK/apply-site.log"
check "site mode again: the stream server and the edge drop-in removed, the site on 443" sh -c \
    "! test -e '$SNI_CONF' && ! test -e '$EDGE_DROPIN' && ! grep -q '127.0.0.3' '$SOCKET_DROPIN' && grep -q 'listen 443 ssl http2;' '$SITE_CONF' && ! grep -q '127.0.0.2' '$SITE_CONF'"
check "site mode again: nginx -t" in_root nginx -t
check "site mode again: pushgate.toml has no [tls] section" sh -c \
    "! grep -q '^\[tls\]' '$ROOT/etc/pushgate/pushgate.toml'"
check "site mode again: pushgate check-config" check_config
check "site mode again: systemd-analyze verify" verify_units

echo "ansible: $passed passed, $failed failed"
[ "$failed" = 0 ]
