#!/usr/bin/env bash
# Prepares what `podman build` needs to build the top-level Dockerfile on a machine that can
# reach no container registry: stand-ins for the two base images, made from the Debian 12 root
# filesystem that scripts/test-ansible.sh caches, and tagged under the names the Dockerfile uses.
#
#   docker.io/library/rust:1-bookworm        <- that root filesystem plus Debian's rustc-web and
#                                               cargo-web (bookworm-security) and gcc
#   gcr.io/distroless/cc-debian12:nonroot    <- only what distroless "cc" holds that pushgate
#                                               needs: glibc, libgcc_s, the CA bundle,
#                                               nsswitch.conf, passwd/group with nonroot (65532)
#
# The runtime stand-in is deliberately as bare as the real one (no shell, no package manager),
# so the image is tested the way it runs. Both are cached under a recipe version: a later run
# only re-tags them. Sourced by scripts/test-container.sh (sets CACHE, needs root and podman).
set -euo pipefail

STANDIN_VERSION=1
RUST_IMAGE=docker.io/library/rust:1-bookworm
RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot
RUST_STANDIN=localhost/pushgate-test/rust-standin:$STANDIN_VERSION
RUNTIME_STANDIN=localhost/pushgate-test/distroless-cc-standin:$STANDIN_VERSION

prepare_standins() {
    local base=$CACHE/rootfs-bookworm
    if [ ! -f "$base/.complete" ]; then
        echo "no cached Debian 12 root filesystem at $base: run scripts/test-ansible.sh once" \
            "(it makes and caches it)" >&2
        return 1
    fi
    local work
    work=$(mktemp -d "$CACHE/standin.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" RETURN

    if ! podman image exists "$RUST_STANDIN"; then
        echo "==> making the Rust build image stand-in ($RUST_STANDIN, a few minutes, cached)"
        cp -a "$base" "$work/rust"
        cp /etc/resolv.conf "$work/rust/etc/resolv.conf"
        # rustc-web/cargo-web: Debian's recent Rust for browsers' builds, in bookworm-security
        # (their libraries need the point-release updates too).
        printf '%s\n' "deb http://deb.debian.org/debian-security bookworm-security main" \
            "deb http://deb.debian.org/debian bookworm-updates main" \
            >"$work/rust/etc/apt/sources.list.d/updates.list"
        chroot "$work/rust" apt-get update -qq
        DEBIAN_FRONTEND=noninteractive chroot "$work/rust" apt-get install -y -qq \
            --no-install-recommends rustc-web cargo-web gcc libc6-dev >/dev/null
        chroot "$work/rust" apt-get clean
        chroot "$work/rust" cargo --version
        rm -f "$work/rust/.complete"
        tar -C "$work/rust" -c . | podman import -q \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'CMD ["bash"]' - "$RUST_STANDIN" >/dev/null
    fi

    if ! podman image exists "$RUNTIME_STANDIN"; then
        echo "==> making the distroless runtime stand-in ($RUNTIME_STANDIN, cached)"
        local min=$work/runtime f
        mkdir -p "$min/usr/lib/x86_64-linux-gnu" "$min/usr/lib64" "$min/etc/ssl/certs" \
            "$min/home/nonroot" "$min/tmp"
        ln -s usr/lib "$min/lib"
        ln -s usr/lib64 "$min/lib64"
        ln -s usr/bin "$min/bin"
        mkdir -p "$min/usr/bin"
        chmod 1777 "$min/tmp"
        while read -r f; do
            if [ -f "$base$f" ] || [ -L "$base$f" ]; then
                mkdir -p "$(dirname "$min$f")"
                cp -a "$base$f" "$min$f"
            fi
        done < <(chroot "$base" dpkg -L libc6 libgcc-s1 | grep -v -e '^/usr/share/' -e '/gconv/')
        cp "$base/etc/ssl/certs/ca-certificates.crt" "$min/etc/ssl/certs/"
        cp "$base/etc/nsswitch.conf" "$min/etc/"
        printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' \
            >"$min/etc/passwd"
        printf 'root:x:0:\nnonroot:x:65532:\n' >"$min/etc/group"
        chown 65532:65532 "$min/home/nonroot"
        tar -C "$min" -c . | podman import -q \
            --change 'USER 65532' --change 'WORKDIR /home/nonroot' \
            - "$RUNTIME_STANDIN" >/dev/null
    fi
    podman tag "$RUST_STANDIN" "$RUST_IMAGE"
    podman tag "$RUNTIME_STANDIN" "$RUNTIME_IMAGE"
}
