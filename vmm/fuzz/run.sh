#!/usr/bin/env bash
# Runs every fuzz target of this crate for SECONDS each (default 60), one after the other;
# stops at the first crash (its input is left in artifacts/TARGET/). A new target is a file in
# fuzz_targets/ and a [[bin]] entry in Cargo.toml. Needs the nightly toolchain; installs
# cargo-fuzz when missing. Builds go to $CACHE/fuzz/target and each target's corpus grows in
# $CACHE/fuzz/corpus/TARGET, so repeated runs (CI's) start warm.
#
#   vmm/fuzz/run.sh [SECONDS]
#   vmm/fuzz/run.sh --build       (builds every target, runs none: tests/run-tests.sh does this
#                                  in the background while the tests run)
set -euo pipefail
build_only=0
[ "${1:-}" = --build ] && { build_only=1; shift; }
seconds="${1:-60}"
cd "$(dirname "$0")"
CACHE=${BERTH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/berth}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
rustup toolchain list 2>/dev/null | grep -q '^nightly' \
  || { echo "fuzz: the nightly toolchain is missing (rustup toolchain install nightly)" >&2; exit 1; }
mkdir -p "$CACHE/fuzz/target"
if [ "$build_only" = 1 ]; then
  cargo +nightly fuzz build --target-dir "$CACHE/fuzz/target"
  echo "fuzz: built $(cargo +nightly fuzz list | tr '\n' ' ')"
  exit 0
fi
for target in $(cargo +nightly fuzz list); do
    corpus=$CACHE/fuzz/corpus/$target
    mkdir -p "$corpus"
    echo "fuzz: $target for ${seconds}s (corpus $(find "$corpus" -type f | wc -l) inputs)"
    log=$(mktemp)
    if ! cargo +nightly fuzz run --target-dir "$CACHE/fuzz/target" "$target" "$corpus" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 > "$log" 2>&1; then
        tail -n 60 "$log" >&2
        rm -f "$log"
        echo "fuzz: $target failed or found a crash (its input: vmm/fuzz/artifacts/$target)" >&2
        exit 1
    fi
    echo "fuzz: $target: $(grep -E '^#[0-9]+' "$log" | tail -n 1)"
    rm -f "$log"
done
