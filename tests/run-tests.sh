#!/usr/bin/env bash
# The whole test suite: setup (tests/setup.sh), then `cargo test --workspace --release` (unit
# tests, native KVM payload tests, and the end-to-end tests that boot Linux guests — directly on
# hardware KVM, else in the nested rig), then the boot, docker, and ports and shares benchmarks (figures beside
# their baselines; each fails the suite when what it times stops working: a VM that misses
# readiness, a docker command that fails).
# Fails (non-zero) if anything is missing or fails; no Linux-booting test is ever skipped.
# A run repeated for the emulator's sake (a test-host death in the rig, a guest reset in the
# docker e2e or benchmark) is recorded in a fresh $BERTH_RETRY_LOG; at the end, passed or failed,
# the suite prints how many of each it retried and every one of them (tests/rig/retries.sh).
#
#   tests/run-tests.sh [CARGO TEST ARGS...]
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${BERTH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/berth}
# shellcheck source=tests/rig/retries.sh
. "$repo/tests/rig/retries.sh"
mkdir -p "$CACHE/rig"
BERTH_RETRY_LOG=$(mktemp "$CACHE/rig/retries-XXXXXX")
export BERTH_RETRY_LOG
# Whatever ends the suite, its retries are told, and its exit status stays its own.
finish() {
  local status=$?
  set +e
  [ -n "${fuzz_build:-}" ] && kill -- "-$fuzz_build" 2>/dev/null
  berth_retry_summary run-tests "$BERTH_RETRY_LOG"
  rm -f "$BERTH_RETRY_LOG"
  exit "$status"
}
trap finish EXIT
t0=$SECONDS
"$repo/tests/setup.sh" > /dev/null
# shellcheck source=/dev/null
. "$CACHE/env.sh"
t_setup=$((SECONDS - t0))
echo "run-tests: setup ${t_setup} s; guests boot $BERTH_RIG_MODE"

# The fuzz targets (a nightly build with sanitizers, minutes when cold) build in the background
# at the lowest priority while the tests run: the rig leaves part of a core idle. The fuzz run
# below waits for it.
fuzz_build_log=$(mktemp)
setsid nice -n 19 "$repo/vmm/fuzz/run.sh" --build > "$fuzz_build_log" 2>&1 &
fuzz_build=$!

# Under the rig's emulation BuildKit moves a build context at about 1.25 MiB/s: the engine e2e
# sends 64 MiB there (200 MiB by hand and on hardware KVM).
if [ "$BERTH_RIG_MODE" = rig ]; then
  export BERTH_E2E_CONTEXT_MIB=${BERTH_E2E_CONTEXT_MIB:-64}
fi

t1=$SECONDS
(cd "$repo" && cargo test --workspace --release "$@")
t_test=$((SECONDS - t1))

# The guest-facing parsers of the net and fs devices, fuzzed briefly (longer by hand:
# vmm/fuzz/run.sh SECONDS).
t_f=$SECONDS
fuzz_status=0
wait "$fuzz_build" || fuzz_status=$?
fuzz_build=
if [ "$fuzz_status" != 0 ]; then
  tail -n 60 "$fuzz_build_log" >&2
  echo "run-tests: building the fuzz targets failed (status $fuzz_status)" >&2
  exit 1
fi
rm -f "$fuzz_build_log"
echo "run-tests: fuzz targets built in the background; waited $((SECONDS - t_f)) s for them"
"$repo/vmm/fuzz/run.sh" "${BERTH_FUZZ_SECONDS:-20}"
t_fuzz=$((SECONDS - t_f))

# Benchmarks print figures beside their baselines; they fail only when what they time breaks.
t2=$SECONDS
boot_status=0
"$repo/tests/bench/boot.sh" 5 || boot_status=$?
t_boot=$((SECONDS - t2))
t3=$SECONDS
docker_status=0
bench_log=$(mktemp)
# In the rig: a 32 MiB `docker save` (2.3 MiB/s there), and the build section only when asked
# (BERTH_BENCH_BUILD=1: four builds, about 4 minutes there).
if [ "$BERTH_RIG_MODE" = rig ]; then
  export BERTH_BENCH_SAVE_MIB=${BERTH_BENCH_SAVE_MIB:-32}
fi
for attempt in 1 2; do
  docker_status=0
  "$repo/tests/bench/docker.sh" 3 2>&1 | tee "$bench_log" || docker_status=$?
  # Once more, loudly, only when the guest reset itself under it (see tests/e2e/docker.sh).
  [ "$docker_status" != 0 ] && [ "$attempt" = 1 ] && grep -q 'GUEST-RESET' "$bench_log" || break
  echo "run-tests: WARNING: the guest reset itself during the docker benchmark; running it once more" >&2
  reset=$(grep -a 'GUEST-RESET' "$bench_log" | tail -n 1 | tr -d '\r')
  berth_retry_record "guest reset" "docker benchmark (tests/bench/docker.sh)" "$attempt" 2 \
    "${reset#*GUEST-RESET: }"
done
rm -f "$bench_log"
t_docker=$((SECONDS - t3))
t4=$SECONDS
net_status=0
# Under the rig's emulation the full sizes (20k files, 1 GiB) take longer than CI has; by hand
# and on hardware KVM they run whole.
if [ "$BERTH_RIG_MODE" = rig ]; then
  export BERTH_BENCH_TREE_FILES=${BERTH_BENCH_TREE_FILES:-2000} BERTH_BENCH_SEQ_MIB=${BERTH_BENCH_SEQ_MIB:-256}
fi
"$repo/tests/bench/ports-shares.sh" || net_status=$?
t_net=$((SECONDS - t4))

echo "run-tests: setup ${t_setup} s, cargo test ${t_test} s, fuzz ${t_fuzz} s, boot benchmark ${t_boot} s, docker benchmark ${t_docker} s, ports and shares benchmark ${t_net} s"
if [ "$boot_status" != 0 ]; then
  echo "run-tests: the boot benchmark failed (status $boot_status): a VM did not reach readiness" >&2
fi
if [ "$docker_status" != 0 ]; then
  echo "run-tests: the docker benchmark failed (status $docker_status): what it measures stopped working; see its logs above" >&2
fi
if [ "$net_status" != 0 ]; then
  echo "run-tests: the ports and shares benchmark failed (status $net_status): what it measures stopped working; see its logs above" >&2
fi
[ "$boot_status" = 0 ] && [ "$docker_status" = 0 ] && [ "$net_status" = 0 ]
