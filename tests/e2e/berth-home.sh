# shellcheck shell=bash
# Sourced by tests/e2e/docker.sh and tests/bench/docker.sh: a Berth of their own, started from
# scratch, with the binaries of tests/setup.sh (BERTH_VMM names their directory); the logs that
# explain a failed run; the guest-reset check their callers repeat a run on.

# shellcheck source=tests/rig/retries.sh
. "$(dirname "${BASH_SOURCE[0]}")/../rig/retries.sh"

# berth_fresh_home NAME: an empty $TMPDIR/NAME as BERTH_HOME, with its own berth config and docker
# config, and the build's berth, berth-host-proxy and berth-vmm first on PATH.
berth_fresh_home() {
  local bin
  bin=$(dirname "$BERTH_VMM")
  export PATH=$bin:$PATH
  export BERTH_HOME=${TMPDIR:-/tmp}/$1
  export BERTH_CONFIG=$BERTH_HOME/config.toml
  export DOCKER_CONFIG=$BERTH_HOME/docker-config
  export BERTH_HOST_PROXY=$bin/berth-host-proxy
  rm -rf "$BERTH_HOME" && mkdir -p "$BERTH_HOME" "$DOCKER_CONFIG"
}

# check NAME COMMAND...: runs COMMAND, prints `ok NAME` or `FAIL NAME (exit N)` and its output
# indented by `  | ` (tests/src/lib.rs `e2e_checks` reads them); a failure sets failed=1.
failed=0
check() {
  local name=$1; shift
  local out status started=$SECONDS
  out=$("$@" 2>&1); status=$?
  if [ "$status" = 0 ]; then echo "ok $name ($((SECONDS - started)) s)"; else echo "FAIL $name (exit $status, $((SECONDS - started)) s)"; failed=1; fi
  printf '%s\n' "$out" | sed 's/^/  | /'
  return "$status"
}

# berth_guest_cpus: the vCPUs of the Berth VM these scripts start: $BERTH_TEST_CPUS, else 2 on
# a machine with hardware KVM and 1 in the nested rig. There, a guest with two vCPUs dies within
# minutes of container work: runc flips kernel static keys (cgroup BPF, memcg) and the text
# patching that follows runs into a stale int3 on the other vCPU ("int3: 0000 [#1] SMP" at a
# 5-byte NOP, then "Fatal exception in interrupt"), or faults three times without a word. The
# emulated CPUs (QEMU's multi-threaded TCG, under the test host's KVM) do not keep code modified
# by one vCPU coherent for another. One vCPU has nothing to race.
berth_guest_cpus() {
  if [ -n "${BERTH_TEST_CPUS:-}" ]; then
    echo "$BERTH_TEST_CPUS"
  elif [ "${BERTH_IN_RIG:-0}" = 1 ]; then
    echo 1
  else
    echo 2
  fi
}

# berth_show_logs: what the VM, the host proxy and dockerd said, so that a failed run explains
# itself: the previous boot's console and this one's, the host proxy's log, and dockerd's log
# from the VM (when it still runs).
berth_show_logs() {
  local log
  for log in console.log.old console.log host-proxy.log; do
    if [ -f "$BERTH_HOME/logs/$log" ]; then
      echo "--- $log (last 60 lines)"
      tail -n 60 "$BERTH_HOME/logs/$log"
    else
      echo "--- $log: none"
    fi
  done
  echo "--- dockerd (last 40 lines)"
  timeout 60 berth logs --source dockerd 2>&1 | tail -n 40
}

# Nothing in these scripts asks the guest to reboot: a reboot or crash in the proxy's log is the
# guest resetting itself (seen in the rig with two vCPUs, see berth_guest_cpus: a triple fault
# without a kernel message, or the int3 panic). The callers repeat such a run, loudly.
berth_guest_reset_pattern="VMM exited: the guest (rebooted|crashed|kernel panicked).*"

# berth_report_guest_reset PREFIX: when the guest reset itself, prints the line its callers look
# for, "PREFIX: GUEST-RESET: " and the evidence (the host proxy's line, what the consoles show);
# else prints nothing and fails.
berth_report_guest_reset() {
  local proxy
  proxy=$(grep -aoE "$berth_guest_reset_pattern" "$BERTH_HOME/logs/host-proxy.log" 2>/dev/null | tail -n 1)
  [ -n "$proxy" ] || return 1
  echo "$1: GUEST-RESET: the guest reset itself during the run (no reboot was asked for); host proxy: $proxy;" \
    "$(berth_console_evidence "$BERTH_HOME/logs/console.log.old" "$BERTH_HOME/logs/console.log")"
}
