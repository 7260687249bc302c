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
  # The docker CLI finds compose and buildx (tests/setup.sh: cli/docker-tools.sh) in this config.
  if [ -n "${BERTH_DOCKER_PLUGINS:-}" ]; then
    mkdir -p "$DOCKER_CONFIG/cli-plugins"
    for bin in "$BERTH_DOCKER_PLUGINS"/docker-*; do
      ln -s "$bin" "$DOCKER_CONFIG/cli-plugins/"
    done
  fi
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
# else prints nothing and fails. Lines of the proxy's log up to BERTH_RESETS_AFTER_LINE are
# skipped (a crash the caller caused on purpose).
berth_report_guest_reset() {
  local proxy
  proxy=$(tail -n +$((${BERTH_RESETS_AFTER_LINE:-0} + 1)) "$BERTH_HOME/logs/host-proxy.log" 2>/dev/null |
    grep -aoE "$berth_guest_reset_pattern" | tail -n 1)
  [ -n "$proxy" ] || return 1
  echo "$1: GUEST-RESET: the guest reset itself during the run (no reboot was asked for); host proxy: $proxy;" \
    "$(berth_console_evidence "$BERTH_HOME/logs/console.log.old" "$BERTH_HOME/logs/console.log")"
}

# --- Berth as an ordinary user ---------------------------------------------------------------
# A user is what Berth runs as for its users: not root, a member of the group that may open
# /dev/kvm. The e2e's root part (root: it makes network namespaces and bind mounts) prepares one,
# then runs the rest of the script as it with berth_as_user. It needs no account: a uid and gid
# of their own (BERTH_E2E_UID, default 4242), a home under /var/tmp, and the open-file limits of
# a systemd user session (soft 1024, hard 524288; the VMM raises its soft limit to the hard one).

# berth_as_user_prepare (as root, in a private mount namespace): the user, its group on
# /dev/kvm (in the rig, where the test host's /dev/kvm belongs to root alone, it is given one;
# elsewhere /dev/kvm must already belong to a group, as udev does), and a view of the build's
# cache and of this repository where a user can read them (they may lie under root's 0700 home).
berth_as_user_prepare() {
  BERTH_E2E_UID=${BERTH_E2E_UID:-4242}
  BERTH_E2E_GID=$BERTH_E2E_UID
  [ "$(id -u)" = 0 ] || { echo "FAIL unprivileged (the root part of the e2e must run as root)"; return 1; }
  if [ "${BERTH_IN_RIG:-0}" = 1 ]; then
    BERTH_E2E_KVM_GID=$(getent group kvm | cut -d: -f3)
    BERTH_E2E_KVM_GID=${BERTH_E2E_KVM_GID:-4243}
    chgrp "$BERTH_E2E_KVM_GID" /dev/kvm && chmod 0660 /dev/kvm || return 1
  else
    BERTH_E2E_KVM_GID=$(stat -c %g /dev/kvm)
    if [ "$BERTH_E2E_KVM_GID" = 0 ] || [ "$(stat -c %a /dev/kvm | cut -c2)" -lt 6 ]; then
      echo "FAIL unprivileged (/dev/kvm is $(stat -c '%U:%G %a' /dev/kvm): give it a kvm group with read-write, as udev does, so an ordinary user can run Berth)"
      return 1
    fi
  fi
  berth_user_views=()
  berth_as_user_home=/var/tmp/berth-e2e-home-$BERTH_E2E_UID
  rm -rf "$berth_as_user_home" "${TMPDIR:-/tmp}"/berth-ports-home
  install -d -o "$BERTH_E2E_UID" -g "$BERTH_E2E_GID" -m 0700 "$berth_as_user_home"
  local repo v view
  local val
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  if ! berth_as_user test -r "$repo/tests/e2e/berth-home.sh"; then
    berth_user_view "$repo" || return 1
    berth_as_user_repo=$berth_user_view_path
  else
    berth_as_user_repo=$repo
  fi
  if [ -n "${BERTH_CACHE:-}" ] && ! berth_as_user test -r "$BERTH_VMM"; then
    berth_user_view "$BERTH_CACHE" || return 1
    view=$berth_user_view_path
    for v in BERTH_VMM BERTH_AGENT BERTH_BOOT_TIMER BERTH_VSOCK_STRESS BERTH_NET_PROBE BERTH_KERNEL BERTH_ROOTFS \
      BERTH_DOCKER_PLUGINS BERTH_DOCKER_REGISTRY; do
      val=${!v:-}
      case "$val" in "$BERTH_CACHE"/*) export "$v=$view${val#"$BERTH_CACHE"}" ;; esac
    done
    export BERTH_CACHE=$view
  fi
  for v in BERTH_VMM BERTH_NET_PROBE BERTH_KERNEL BERTH_ROOTFS; do
    berth_as_user test -r "${!v}" || { echo "FAIL unprivileged (uid $BERTH_E2E_UID cannot read $v=${!v})"; return 1; }
  done
  # Where root may not raise limits (a container), the hard limit stays what it is.
  ulimit -Hn 524288 2>/dev/null || true
  ulimit -Sn 1024
}

# berth_user_view DIR: DIR bind-mounted where a user can reach it (in the caller's mount
# namespace), at $berth_user_view_path.
berth_user_views=()
berth_user_view() {
  berth_user_view_path=/run/berth-e2e-view-$$-${#berth_user_views[@]}
  mkdir -p "$berth_user_view_path" && mount --bind "$1" "$berth_user_view_path" \
    || { echo "FAIL unprivileged (bind $1 for the user)"; return 1; }
  berth_user_views+=("$berth_user_view_path")
}

# berth_as_user COMMAND...: COMMAND as the prepared user, in the KVM group, with its home, no
# capabilities, and this environment otherwise. A script path under the repository is given as
# the user's view of it ("$0" of the caller becomes the same file in the view).
berth_as_user() {
  local args=() a repo
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  for a in "$@"; do
    case "$a" in "$repo"/*) [ -n "${berth_as_user_repo:-}" ] && a=$berth_as_user_repo${a#"$repo"} ;; esac
    args+=("$a")
  done
  setpriv --reuid="$BERTH_E2E_UID" --regid="$BERTH_E2E_GID" --groups="$BERTH_E2E_KVM_GID" --inh-caps=-all \
    env HOME="${berth_as_user_home:-/nonexistent}" USER=berth-e2e LOGNAME=berth-e2e "${args[@]}"
}

# berth_as_user_cleanup (root): the user's home and the views go.
berth_as_user_cleanup() {
  local view
  [ -n "${berth_as_user_home:-}" ] && rm -rf "$berth_as_user_home"
  for view in "${berth_user_views[@]}"; do umount "$view" 2>/dev/null && rmdir "$view"; done
  return 0
}

# swarm_leave: `docker swarm leave --force`, once more when the first one timed out (dockerd in
# the rig answered "context deadline exceeded" while it tore the raft node down); either way
# the node must end up outside the swarm.
swarm_leave() {
  local state
  if ! docker swarm leave --force; then
    echo "the leave failed; looking again in 5 s"
    sleep 5
    state=$(docker info --format '{{.Swarm.LocalNodeState}}')
    [ "$state" = inactive ] || docker swarm leave --force || return 1
  fi
  state=$(docker info --format '{{.Swarm.LocalNodeState}}')
  echo "swarm state: $state"
  [ "$state" = inactive ]
}
