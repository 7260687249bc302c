# Sourced by tests/e2e/docker.sh and tests/bench/docker.sh: a Berth of their own, started from
# scratch, with the binaries of tests/setup.sh (BERTH_VMM names their directory).

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

# Nothing in these scripts asks the guest to reboot: a reboot or crash in the proxy's log is the
# guest resetting itself (seen in the rig with two vCPUs, see berth_guest_cpus: a triple fault
# without a kernel message, or the int3 panic). The callers repeat such a run, loudly.
berth_guest_reset_seen() {
  grep -qE "VMM exited: the guest (rebooted|crashed|kernel panicked)" "$BERTH_HOME/logs/host-proxy.log" 2>/dev/null
}
