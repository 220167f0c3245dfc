#!/usr/bin/env bash
# The stack as deployed (BENCHMARKS.md, issue 22): nginx with the shipped site and TLS in front of
# pushgate, of Nchan (same server block) and of the floor server (the proxy hop alone), and
# pushgate ending TLS itself, alone (edge) and behind nginx's SNI stream server (sni); each
# scenario on all of them back to back, REPS times, appending JSON lines to OUT; then medians
# and the ratios over Nchan with bench/summarize.py.
# Usage: bench/stack-compare.sh [REPS] [OUT]   (a release build; nginx with Nchan; a quiet machine)
# STACK_BACKENDS="pushgate nchan edge sni" runs only those (default: all five); the backend
# "variant" is nginx + pushgate with the site template SITE_VARIANT (labelled VARIANT_LABEL,
# default "variant").
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${1:-3}
out=${2:-stack-results.jsonl}
bench=${BENCH:-./target/release/pushgate-bench}
pg=${PUSHGATE:-./target/release/pushgate}
tls=$(mktemp -d)
trap 'rm -rf "$tls"' EXIT
bench/peers/stack.sh cert "$tls"
port=5000
run() { # backend scenario args...
    local backend=$1 adapter=phoenix label=stack extra=() peer=$1 env=""
    shift
    port=$((port + 2))
    case $backend in
        pushgate) extra=("$pg") ;;
        nchan) adapter=nchan ;;
        hop) adapter=nchan label=hop extra=("$bench") ;;
        edge | sni) label=$backend extra=("$pg") ;;
        variant) label=${VARIANT_LABEL:-variant} peer=pushgate env="env STACK_SITE_CONF=${SITE_VARIANT:?} " extra=("$pg") ;;
    esac
    $bench run "$@" --adapter "$adapter" --label "$label" --per-address 100 --tls-ca "$tls/ca.pem" \
        --server 127.0.0.1:$port --publish-server 127.0.0.1:$((port + 1)) \
        --spawn "${env}bench/peers/stack.sh $peer $port $((port + 1)) $tls ${extra[*]}" \
        2>/dev/null >>"$out" || echo "run failed: $backend $*" >&2
}
backends=${STACK_BACKENDS:-pushgate nchan hop edge sni}
all() { for b in $backends; do run "$b" "$@"; done; }
some() { for b in $backends; do [ "$b" = hop ] || run "$b" "$@"; done; } # no LongPoll in the floor
for rep in $(seq "$reps"); do
    all idle -n 8000 --workers 2 --duration 3
    all fanout -n 1000 -m 100 --rate 10
    all fanout -n 5000 -m 100 --rate 10 --workers 2
    all fanout -n 5000 -m 1000 --rate 0 --workers 2
    some longpoll -n 1000 -m 50 --rate 10
    some longpoll -n 1000 -m 50 --rate 10 --http2
    some connect -n 5000 --workers 2 --duration 0.5
    echo "repetition $rep done" >&2
done
python3 bench/summarize.py --base "nchan [stack]" "$out"
