#!/usr/bin/env bash
# Tests the container image for real, with podman (no registry needed):
#   1. stand-ins for the Dockerfile's base images, tagged under their names
#      (scripts/container-standins.sh; made once from the Debian 12 root filesystem that
#      scripts/test-ansible.sh caches, then reused);
#   2. `podman build` of the top-level Dockerfile as it is (the dependency layer is cached by
#      podman between runs, so a later build compiles only pushgate itself), and its size;
#   3. the Node tests in tests/js/containers/: the official phoenix client against a container
#      started with PORT set and published on 127.0.0.1 (WebSocket and LongPoll), the image's
#      defaults, the SIGTERM drain inside the platforms' grace period, and three containers
#      behind a round-robin nginx with one Redis, replaced one by one under LongPoll clients.
#
# Needs root, podman, buildah and runc (crun fails on hybrid cgroups), nginx, redis-server, Node
# with tests/js's packages installed. Everything cached lives in PUSHGATE_TEST_CACHE (default
# /var/cache/pushgate-test), podman's storage included (podman-storage/).
#
# Usage: scripts/test-container.sh [node test files...]   (default: tests/js/containers/*.test.js)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
CACHE=${PUSHGATE_TEST_CACHE:-/var/cache/pushgate-test}
IMAGE=localhost/pushgate-test/pushgate:latest   # and $IMAGE-build, the build stage

if [ "$(id -u)" != 0 ]; then
    echo "scripts/test-container.sh needs root (podman with runc, chroot); try sudo" >&2
    exit 1
fi
for tool in podman buildah runc node nginx redis-server; do
    command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || {
        echo "scripts/test-container.sh: $tool is missing (scripts/test.sh installs it)" >&2
        exit 1
    }
done
[ -d tests/js/node_modules ] || {
    echo "tests/js/node_modules is missing: (cd tests/js && npm ci)" >&2
    exit 1
}
mkdir -p "$CACHE"

# runc, and ulimits this host accepts (the default nofile of 1048576 is refused).
export CONTAINERS_CONF=$CACHE/containers.conf
cat >"$CONTAINERS_CONF" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
EOF
# podman's own storage (the stand-ins, the image, the build stage's cached layers) lives in the
# cache too, apart from the machine's /var/lib/containers: removing the cache forgets it all.
# Its run state goes under /run, which a reboot clears, as podman expects.
export CONTAINERS_STORAGE_CONF=$CACHE/storage.conf
cat >"$CONTAINERS_STORAGE_CONF" <<EOF
[storage]
driver = "overlay"
graphroot = "$CACHE/podman-storage"
runroot = "/run/pushgate-test/podman"
EOF

# Containers left by a test run that was killed (named pushgate-test-<node's pid>-...): removed
# when that process is gone, so they hold no ports; a run going on beside this one keeps its own.
for name in $(podman ps -a --format '{{.Names}}' | grep '^pushgate-test-' || true); do
    pid=${name#pushgate-test-}
    pid=${pid%%-*}
    kill -0 "$pid" 2>/dev/null || podman rm -f -t 0 "$name" >/dev/null
done

start=$(date +%s)
# shellcheck source=scripts/container-standins.sh
source "$REPO/scripts/container-standins.sh"
prepare_standins

echo "==> podman build (the Dockerfile as it is; --pull=never: no registry here)"
build_start=$(date +%s)
# --format docker keeps HEALTHCHECK (the OCI format has no such field). The host's CA bundle
# is mounted for cargo's downloads from crates.io (this network re-signs TLS).
# The build stage is tagged too (a second, cached, invocation) so that its layers, the
# compiled dependencies above all, stay in podman's storage for the next run; the prune below
# then removes only earlier builds' leftovers.
build() {
    podman build --pull=never --format docker --layers \
        -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro "$@" . \
        >>"$CACHE/podman-build.log" 2>&1 || {
        tail -40 "$CACHE/podman-build.log"
        echo "podman build failed (log: $CACHE/podman-build.log)"
        exit 1
    }
}
: >"$CACHE/podman-build.log"
build -t "$IMAGE"
build --target build -t "$IMAGE-build"
echo "    built in $(($(date +%s) - build_start)) s"
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
runtime_size=$(podman image inspect --format '{{.Size}}' "$RUNTIME_IMAGE")
echo "    image $IMAGE: $((size / 1000)) kB ($((runtime_size / 1000)) kB of it the runtime base stand-in)"
# Dangling images of earlier builds (the tagged ones and their layers stay).
podman image prune -f >/dev/null

echo "==> node tests (tests/js/containers)"
cd tests/js
if [ $# -gt 0 ]; then files=("$@"); else files=(containers/*.test.js); fi
PUSHGATE_IMAGE=$IMAGE node --test --test-concurrency=1 "${files[@]}"
echo "==> container tests passed in $(($(date +%s) - start)) s"
