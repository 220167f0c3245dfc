#!/usr/bin/env bash
# Runs Nchan in the foreground for the bench: nchan.sh PORT [PREFIX]
# Example: pushgate-bench run fanout --adapter nchan --server 127.0.0.1:4700 \
#              --spawn "bench/peers/nchan.sh 4700"
set -euo pipefail
port=${1:?usage: nchan.sh PORT [PREFIX]}
prefix=${2:-$(mktemp -d /tmp/pushgate-nchan.XXXXXX)}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$prefix/conf" "$prefix/logs" "$prefix/tmp"
sed "s/__PORT__/$port/" "$here/nchan.conf" > "$prefix/conf/nchan.conf"
exec nginx -p "$prefix" -c conf/nchan.conf -g 'daemon off;'
