#!/usr/bin/env bash
# The whole test suite: setup (tests/setup.sh), then `cargo test --workspace --release` (unit
# tests, native KVM payload tests, and the end-to-end tests that boot Linux guests — directly on
# hardware KVM, else in the nested rig), then the boot and docker benchmarks (figures beside
# their baselines; each fails the suite when what it times stops working: a VM that misses
# readiness, a docker command that fails).
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

# Benchmarks print figures beside their baselines; they fail only when what they time breaks.
t2=$SECONDS
boot_status=0
"$repo/tests/bench/boot.sh" 5 || boot_status=$?
t_boot=$((SECONDS - t2))
t3=$SECONDS
docker_status=0
bench_log=$(mktemp)
for attempt in 1 2; do
  docker_status=0
  "$repo/tests/bench/docker.sh" 3 2>&1 | tee "$bench_log" || docker_status=$?
  # Once more, loudly, only when the guest reset itself under it (see tests/e2e/docker.sh).
  [ "$docker_status" != 0 ] && [ "$attempt" = 1 ] && grep -q 'GUEST-RESET' "$bench_log" || break
  echo "run-tests: WARNING: the guest reset itself during the docker benchmark; running it once more" >&2
done
rm -f "$bench_log"
t_docker=$((SECONDS - t3))

echo "run-tests: setup ${t_setup} s, cargo test ${t_test} s, boot benchmark ${t_boot} s, docker benchmark ${t_docker} s"
if [ "$boot_status" != 0 ]; then
  echo "run-tests: the boot benchmark failed (status $boot_status): a VM did not reach readiness" >&2
fi
if [ "$docker_status" != 0 ]; then
  echo "run-tests: the docker benchmark failed (status $docker_status): what it measures stopped working; see its logs above" >&2
fi
[ "$boot_status" = 0 ] && [ "$docker_status" = 0 ]
