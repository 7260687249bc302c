#!/usr/bin/env bash
# Runs every fuzz target of this crate for SECONDS each (default 60), one after the other;
# stops at the first crash (its input is left in artifacts/TARGET/). A new target is a file in
# fuzz_targets/ and a [[bin]] entry in Cargo.toml.
set -euo pipefail
seconds="${1:-60}"
cd "$(dirname "$0")"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
for target in $(cargo +nightly fuzz list); do
    echo "fuzz: $target for ${seconds}s"
    cargo +nightly fuzz run "$target" -- -max_total_time="$seconds"
done
