# shellcheck shell=bash
# Sourced by the benchmarks: the environment of tests/setup.sh, and the benchmark run again
# inside the nested rig where this machine's /dev/kvm cannot boot Linux.

bench_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# bench_env VAR...: $CACHE/env.sh loaded unless BERTH_VMM is already exported; exits naming
# the first VAR whose path does not exist.
bench_env() {
  local cache=${BERTH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/berth} v
  if [ -z "${BERTH_VMM:-}" ]; then
    [ -f "$cache/env.sh" ] || { echo "bench: run tests/setup.sh first (no $cache/env.sh)" >&2; exit 1; }
    # shellcheck source=/dev/null
    . "$cache/env.sh"
  fi
  for v in "$@"; do
    [ -e "${!v:-}" ] || { echo "bench: $v=${!v:-} missing; run tests/setup.sh" >&2; exit 1; }
  done
}

# bench_in_rig RIG-OPTION... -- SCRIPT ARG...: replaces this process with run-in-rig.sh when
# Linux guests need the rig (tests/rig/detect.sh); returns otherwise.
bench_in_rig() {
  # shellcheck source=tests/rig/detect.sh
  . "$bench_here/../rig/detect.sh"
  if [ "$(berth_rig_mode)" = rig ]; then
    exec "$bench_here/../rig/run-in-rig.sh" "$@"
  fi
}
