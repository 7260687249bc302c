#!/usr/bin/env bash
# Builds what is needed (tests/setup.sh), then boots Berth's guest with our VMM, directly on
# hardware KVM or inside the nested rig, with the guest console on stdout, and powers it off at
# readiness. The data disk persists at $CACHE/data.img, so a second run mounts what the first
# formatted (boot=2, data=mounted).
#
#   tests/run-vm.sh [EXTRA KERNEL ARGS...]     # e.g. berth.hostname=dev
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
start=$SECONDS
"$repo/tests/setup.sh" > /dev/null
CACHE=${BERTH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/berth}
# shellcheck source=/dev/null
. "$CACHE/env.sh"
setup_s=$((SECONDS - start))

data=$CACHE/data.img
[ -f "$data" ] || truncate -s 8G "$data"
log=$(mktemp "$CACHE/run-vm-XXXXXX.log")
trap 'rm -f "$log"' EXIT

vm=("$BERTH_VMM" --kernel "$BERTH_KERNEL" --memory 1024 --cpus 2
  --disk "$BERTH_ROOTFS,ro" --disk "$data" --console
  --cmdline "root=/dev/vda ro rootfstype=ext4 berth.data=/dev/vdb berth.on_ready=poweroff $*")
# The data disk is on the build machine's disk: in the rig it is shared writable over 9p.
if [ "$BERTH_RIG_MODE" = rig ]; then
  run=("$BERTH_RIG_RUN" --timeout 600 --share "$CACHE" -- "${vm[@]}")
else
  run=(timeout 600 "${vm[@]}")
fi

echo "run-vm: booting ($BERTH_RIG_MODE) $BERTH_KERNEL with $BERTH_ROOTFS, data disk $data"
vm_start=$(date +%s%N)
set +e
"${run[@]}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
wall_ms=$(( ($(date +%s%N) - vm_start) / 1000000 ))

echo
echo "run-vm: summary"
echo "  readiness:  $(grep -a -m1 'berth-agent: ready' "$log" | tr -d '\r' | sed 's/.*\(berth-agent: ready\)/\1/' || echo 'none (the agent never reported ready)')"
case "$status" in
  0) what="guest powered off" ;;
  2) what="guest rebooted" ;;
  3) what="guest kernel panicked" ;;
  124) what="timed out" ;;
  125) what="the rig's test host failed (see above)" ;;
  *) what="VMM error" ;;
esac
echo "  exit:       $status ($what)"
echo "  wall time:  $((wall_ms / 1000)).$(printf '%03d' $((wall_ms % 1000))) s for the boot$([ "$BERTH_RIG_MODE" = rig ] && echo ', test host included'), ${setup_s} s for setup"
exit "$status"
