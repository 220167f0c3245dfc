#!/usr/bin/env bash
# Builds the Debian package (cargo-deb; metadata in Cargo.toml) from an already built binary:
#   scripts/build-deb.sh [profile] [deb-version] [output file]
# profile: dev (target/debug, what the tests use) or release (default: release). The binary is
# stripped in the package. Installs cargo-deb when missing. Prints the package's path.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${1:-release}
VERSION=${2:-}
OUT=${3:-}
CARGO_DEB_VERSION=3.6.0
if ! cargo deb --version >/dev/null 2>&1; then
    echo "==> cargo install cargo-deb $CARGO_DEB_VERSION" >&2
    cargo install --quiet --locked cargo-deb --version "$CARGO_DEB_VERSION" >&2
fi
args=(--no-build --strip --profile "$PROFILE" --quiet)
[ -z "$VERSION" ] || args+=(--deb-version "$VERSION")
[ -z "$OUT" ] || args+=(--output "$OUT")
cargo deb "${args[@]}"
