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

# Nothing in these scripts asks the guest to reboot: a reboot or crash in the proxy's log is the
# guest resetting itself (seen in the rig: no kernel message, KVM reports a triple fault, in
# about one run in three under the emulated nested SVM). The callers repeat such a run.
berth_guest_reset_seen() {
  grep -qE "VMM exited: the guest (rebooted|crashed)" "$BERTH_HOME/logs/host-proxy.log" 2>/dev/null
}
