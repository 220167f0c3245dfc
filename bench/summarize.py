#!/usr/bin/env python3
"""Medians (and min-max spread) per scenario and adapter from pushgate-bench JSON lines, then
pushgate's figures over Nchan's (and the floor's over Nchan's) per repetition: the k-th run of a
scenario on one server is paired with the k-th on the other, as bench/compare.sh runs them back
to back. With `--base "phoenix [before]"`, the ratios are over that adapter's runs instead (as
bench/paired.sh compares two builds of pushgate). LongPoll runs over HTTP/2 (`"http2": true`, from
`run longpoll --http2`) are their own scenario, "longpoll-h2", paired only with each other."""
import json, statistics, sys
from collections import defaultdict

METRICS = {
    "idle": ["server_kib_per_connection", "idle_cpu_percent"],
    "fanout": ["server_cpu_per_delivery_us", "deliveries_per_s", "latency_p50_us", "latency_p99_us", "missing", "client_cpu_per_delivery_us", "publish_behind_max_ms"],
    "longpoll": ["server_cpu_per_delivery_us", "latency_p50_us", "latency_p99_us", "missing", "client_cpu_per_delivery_us", "publish_behind_max_ms"],
    "longpoll-h2": ["server_cpu_per_delivery_us", "latency_p50_us", "latency_p99_us", "missing", "client_cpu_per_delivery_us", "publish_behind_max_ms"],
    "publish": ["publish_per_s", "server_cpu_per_publish_us"],
    "connect": ["connects_per_s", "connect_failures"],
    "many-topics": ["server_cpu_per_delivery_us", "latency_p99_us", "missing"],
}

def rate_label(rate):
    return "flat" if rate == 0 else ("" if rate is None else f"{rate:g}/s")


args = sys.argv[1:]
BASE = "nchan"
if len(args) >= 2 and args[0] == "--base":
    BASE, args = args[1], args[2:]
runs = defaultdict(list)
for path in args:
    for line in open(path):
        try:
            d = json.loads(line)
        except ValueError:
            continue
        # A run's label (e.g. "floor", "before") tells apart runs with the same adapter.
        adapter = d["adapter"] + (f" [{d['label']}]" if d.get("label") else "")
        # LongPoll over HTTP/2 is told apart from HTTP/1.1 by the scenario, not the label.
        scenario = d["scenario"] + ("-h2" if d.get("http2") else "")
        key = (scenario, d.get("subscribers"), d.get("rate"), adapter)
        runs[key].append(d)

print("| scenario | N | rate | adapter | runs | " + " | ".join(["metric: median (min-max)"]) + " |")
print("|---|---|---|---|---|---|")
for key in sorted(runs, key=lambda k: (k[0], k[1] or 0, k[2] or 0, k[3])):
    scenario, n, rate, adapter = key
    cells = []
    for m in METRICS.get(scenario, []):
        vals = [r[m] for r in runs[key] if m in r]
        if not vals:
            continue
        med = statistics.median(vals)
        fmt = (lambda v: f"{v:.3g}") if isinstance(med, float) else str
        cells.append(f"{m} {fmt(med)} ({fmt(min(vals))}-{fmt(max(vals))})")
    print(f"| {scenario} | {n} | {rate_label(rate)} | {adapter} | {len(runs[key])} | {'; '.join(cells)} |")

# The budgets' ratios, repetition by repetition.
RATIOS = {
    "idle": "server_kib_per_connection",
    "fanout": "server_cpu_per_delivery_us",
    "longpoll": "latency_p99_us",
    "longpoll-h2": "latency_p99_us",
    "publish": "publish_per_s",
    "connect": "connects_per_s",
    "many-topics": "server_cpu_per_delivery_us",
}
EXTRA = {"fanout": ["latency_p99_us"], "longpoll": ["server_cpu_per_delivery_us"], "longpoll-h2": ["server_cpu_per_delivery_us"]}
print()
print("| scenario | N | rate | ratio | of metric | median of paired ratios (each repetition) | ratio of medians |")
print("|---|---|---|---|---|---|---|")
for key in sorted(runs, key=lambda k: (k[0], k[1] or 0, k[2] or 0, k[3])):
    scenario, n, rate, adapter = key
    if adapter == BASE:
        continue
    base = runs.get((scenario, n, rate, BASE))
    if not base:
        continue
    for m in [RATIOS.get(scenario)] + EXTRA.get(scenario, []):
        mine = [r[m] for r in runs[key] if m in r]
        theirs = [r[m] for r in base if m in r]
        if not m or not mine or len(mine) != len(theirs) or 0 in theirs:
            continue  # a failed run leaves nothing to pair with
        paired = [a / b for a, b in zip(mine, theirs)]
        each = ", ".join(f"{p:.3f}" for p in paired)
        of_medians = statistics.median(mine) / statistics.median(theirs)
        print(f"| {scenario} | {n} | {rate_label(rate)} | {adapter} / {BASE} | {m} | {statistics.median(paired):.3f} ({each}) | {of_medians:.3f} |")
