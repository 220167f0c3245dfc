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
# Each scenario runs on both servers (and the floor) back to back, so that a repetition's pair is
# measured within a minute or so: these VMs drift by 10-20 % over a session, and summarize.py
# reports each budget's ratio per repetition as well as the ratio of the medians.
both() { # scenario args...
    run phoenix "$@"
    run nchan "$@"
}
for rep in $(seq "$reps"); do
    both idle -n 15000 --workers 3 --duration 3
    both fanout -n 5000 -m 1000 --rate 0
    both fanout -n 15000 -m 300 --rate 0 --workers 3
    both fanout -n 5000 -m 100 --rate 10
    # What the kernel alone charges when every message is sent alone (BENCHMARKS.md, the floor).
    run floor fanout -n 5000 -m 100 --rate 10
    both fanout -n 15000 -m 50 --rate 10 --workers 3
    run floor fanout -n 15000 -m 50 --rate 10 --workers 3
    both longpoll -n 1000 -m 50 --rate 10
    both longpoll -n 5000 -m 50 --rate 10
    both publish --publishers 32 --duration 3
    both connect -n 10000 --workers 2 --duration 0.5
    both many-topics -n 5000 --publishers 4
    echo "repetition $rep done" >&2
done
python3 bench/summarize.py "$out"
