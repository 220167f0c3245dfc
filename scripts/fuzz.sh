#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ (FUZZING.md) for SECONDS each (default 15), one after another,
# from the committed seeds (fuzz/seeds/TARGET) and the local corpus (fuzz/corpus/TARGET, not
# committed). Builds once. Installs cargo-fuzz when missing. Fails on the first crash (libFuzzer
# writes the input to fuzz/artifacts/TARGET/ and prints how to reproduce it).
#   scripts/fuzz.sh [SECONDS] [TARGET...]
# Built without a sanitizer (`-s none`, so the stable toolchain is enough: the crate forbids
# unsafe code) and with debug assertions (overflow checks) on.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-15}
shift || true
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "==> installing cargo-fuzz"
    cargo install cargo-fuzz --locked --quiet
fi
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi
cargo fuzz build -s none -a
triple=$(rustc -vV | sed -n 's/^host: //p')
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    echo "==> fuzz $t for ${secs}s"
    set +e
    # The binary itself, not `cargo fuzz run`, which would check the build again.
    "target/$triple/release/$t" "corpus/$t" "seeds/$t" -artifact_prefix="artifacts/$t/" \
        -max_total_time="$secs" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 >"$log" 2>&1
    status=$?
    set -e
    grep -E "^(#[0-9]+ +DONE|stat::(number_of_executed_units|new_units_added)|INFO: (Loaded|seed corpus))" "$log" || true
    if [ $status -ne 0 ]; then
        grep -vE "^#[0-9]+ " "$log" | tail -40
        echo "fuzz target $t failed"
        exit 1
    fi
done
echo "==> fuzzing: ${#targets[@]} targets passed"
