#!/usr/bin/env bash
# The whole test suite: setup (tests/setup.sh), then `cargo test --workspace --release` (unit
# tests, native KVM payload tests, and the end-to-end tests that boot Linux guests — directly on
# hardware KVM, else in the nested rig), then the boot benchmark (figures only, no pass/fail).
# Fails (non-zero) if anything is missing or fails; no Linux-booting test is ever skipped.
#
#   tests/run-tests.sh [CARGO TEST ARGS...]
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${BERTH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/berth}
t0=$SECONDS
"$repo/tests/setup.sh" > /dev/null
# shellcheck source=/dev/null
. "$CACHE/env.sh"
t_setup=$((SECONDS - t0))
echo "run-tests: setup ${t_setup} s; guests boot $BERTH_RIG_MODE"

t1=$SECONDS
(cd "$repo" && cargo test --workspace --release "$@")
t_test=$((SECONDS - t1))

t2=$SECONDS
bench_status=0
"$repo/tests/bench/boot.sh" 5 || bench_status=$?
t_bench=$((SECONDS - t2))

echo "run-tests: setup ${t_setup} s, cargo test ${t_test} s, benchmark ${t_bench} s"
if [ "$bench_status" != 0 ]; then
  echo "run-tests: the boot benchmark failed (status $bench_status): a VM did not reach readiness" >&2
  exit 1
fi
