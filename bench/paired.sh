#!/usr/bin/env bash
# Compares two builds of pushgate on the scenarios a refactor must not slow down (idle memory,
# fanout flat out and at 10 msg/s, publish, long-poll), REPS times, each scenario on both builds
# back to back (the order alternates per repetition), appending JSON lines to OUT; then prints
# medians and the ratios AFTER / BEFORE with bench/summarize.py.
# Usage: bench/paired.sh BEFORE_BINARY AFTER_BINARY [REPS] [OUT]   (release builds; a quiet machine)
set -euo pipefail
cd "$(dirname "$0")/.."
before=$1
after=$2
reps=${3:-3}
out=${4:-paired-results.jsonl}
bench=${BENCH:-./target/release/pushgate-bench}
port=4950
run() { # label binary scenario args...
    local label=$1 bin=$2
    shift 2
    port=$((port + 1))
    $bench run "$@" --label "$label" --server 127.0.0.1:$port \
        --spawn "env PUSHGATE_LOG=warn PUSHGATE_SERVER_WORKER_THREADS=1 $bin serve --listen 127.0.0.1:$port" \
        2>/dev/null >>"$out" || echo "run failed: $label $*" >&2
}
both() { # scenario args...
    if [ $((rep % 2)) -eq 1 ]; then
        run before "$before" "$@"
        run after "$after" "$@"
    else
        run after "$after" "$@"
        run before "$before" "$@"
    fi
}
for rep in $(seq "$reps"); do
    both idle -n 10000 --workers 2 --duration 3
    both fanout -n 5000 -m 1000 --rate 0
    both fanout -n 5000 -m 100 --rate 10
    both fanout -n 1000 -m 100 --rate 10
    both publish --publishers 32 --duration 3
    both longpoll -n 1000 -m 50 --rate 10
    echo "repetition $rep done" >&2
done
python3 bench/summarize.py --base "phoenix [before]" "$out"
