#!/usr/bin/env bash
# Decides whether Linux guests boot directly on this machine's /dev/kvm or need the nested rig,
# and prints `direct` or `rig`. Also sourced: `berth_rig_mode` prints the same.
#
#   BERTH_RIG=auto (default)  rig, unless hardware KVM (module kvm_intel or kvm_amd) is loaded
#   BERTH_RIG=always          rig
#   BERTH_RIG=never           direct (a Linux guest will not boot on kvm_pvm)
#
# Inside the rig (BERTH_IN_RIG=1) the answer is always `direct`: the test host has real KVM.

berth_rig_mode() {
  if [ "${BERTH_IN_RIG:-0}" = 1 ]; then
    echo direct
    return 0
  fi
  case "${BERTH_RIG:-auto}" in
    always) echo rig ;;
    never) echo direct ;;
    auto)
      # Built-in and loaded modules both appear under /sys/module. kvm_pvm is a software
      # hypervisor that cannot boot Linux, whatever else is loaded.
      if [ -c /dev/kvm ] && [ ! -d /sys/module/kvm_pvm ] \
        && { [ -d /sys/module/kvm_intel ] || [ -d /sys/module/kvm_amd ]; }; then
        echo direct
      else
        echo rig
      fi
      ;;
    *)
      echo "detect: BERTH_RIG=${BERTH_RIG} is not one of auto, always, never" >&2
      return 2
      ;;
  esac
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  berth_rig_mode
fi
