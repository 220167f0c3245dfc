#!/usr/bin/env bash
# Runs the budget matrix of BENCHMARKS.md for pushgate and Nchan, REPS times each, appending one
# JSON line per run to OUT; then prints medians with bench/summarize.py.
# Usage: bench/compare.sh [REPS] [OUT]      (needs a release build and nginx with Nchan)
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${1:-3}
out=${2:-bench-results.jsonl}
bench=./target/release/pushgate-bench
port=4900
pg() { echo "env PUSHGATE_LOG=warn PUSHGATE_SERVER_WORKER_THREADS=1 ./target/release/pushgate serve --listen 127.0.0.1:$1"; }
nc() { echo "bench/peers/nchan.sh $1"; }
fl() { echo "$bench floor --listen 127.0.0.1:$1"; }
run() { # adapter scenario args...   (adapter "floor": the floor server, spoken to as Nchan)
    local adapter=$1; shift
    port=$((port + 1))
    local spawn label=""
    case $adapter in
        phoenix) spawn=$(pg $port) ;;
        nchan) spawn=$(nc $port) ;;
        floor) spawn=$(fl $port); adapter=nchan; label=floor ;;
    esac
    $bench run "$@" --adapter "$adapter" --label "$label" --server 127.0.0.1:$port --spawn "$spawn" \
        2>/dev/null >> "$out" || echo "run failed: $adapter $label $*" >&2
}
for rep in $(seq "$reps"); do
    for a in phoenix nchan; do
        run $a idle -n 15000 --workers 3 --duration 3
        run $a fanout -n 5000 -m 1000 --rate 0
        run $a fanout -n 15000 -m 300 --rate 0 --workers 3
        run $a fanout -n 5000 -m 100 --rate 10
        run $a fanout -n 15000 -m 50 --rate 10 --workers 3
        run $a longpoll -n 1000 -m 50 --rate 10
        run $a longpoll -n 5000 -m 50 --rate 10
        run $a publish --publishers 32 --duration 3
        run $a connect -n 10000 --workers 2 --duration 0.5
        run $a many-topics -n 5000 --publishers 4
    done
    # What the kernel alone charges when every message is sent alone (BENCHMARKS.md, the floor).
    run floor fanout -n 5000 -m 100 --rate 10
    run floor fanout -n 15000 -m 50 --rate 10 --workers 3
    echo "repetition $rep done" >&2
done
python3 bench/summarize.py "$out"
