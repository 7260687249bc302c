#!/usr/bin/env bash
# Boot benchmark: our VMM against QEMU's microvm on the same kernel, image and VM size, timed
# from spawn until the agent's readiness line appears on the console. No pass/fail.
#
#   tests/bench/boot.sh [RUNS]       # default 5 runs each
#
# Needs the environment of tests/setup.sh (bench-env.sh reads the cache's env.sh when it is not exported). Where
# Linux guests need the nested rig, the script runs itself inside it.
# Both get: root image read-only as /dev/vda, `berth.data=none berth.on_ready=poweroff quiet`,
# 512 MiB, 1 vCPU. QEMU's microvm without ACPI only halts on power-off, so it is killed a second
# after the readiness line; that does not change the figure.
set -euo pipefail

runs=${1:-5}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/bench/bench-env.sh
. "$here/bench-env.sh"
bench_env BERTH_VMM BERTH_KERNEL BERTH_ROOTFS BERTH_BOOT_TIMER
bench_in_rig --timeout 1200 -- "$here/boot.sh" "$@"

cmdline="root=/dev/vda ro rootfstype=ext4 berth.data=none berth.docker=off berth.on_ready=poweroff quiet"
memory=512
cpus=1

ours() {
  "$BERTH_BOOT_TIMER" --timeout 120 --exit-wait 10 -- \
    "$BERTH_VMM" --kernel "$BERTH_KERNEL" --cmdline "$cmdline" --memory "$memory" --cpus "$cpus" \
    --disk "$BERTH_ROOTFS,ro" --console
}
qemu() {
  "$BERTH_BOOT_TIMER" --timeout 120 --exit-wait 1 -- \
    qemu-system-x86_64 -M microvm,accel=kvm,acpi=off -cpu host -m "$memory" -smp "$cpus" \
    -nodefaults -no-user-config -nographic -no-reboot -serial stdio \
    -kernel "$BERTH_KERNEL" -append "console=ttyS0 reboot=k panic=-1 $cmdline" \
    -drive "file=$BERTH_ROOTFS,format=raw,readonly=on,if=none,id=r" -device virtio-blk-device,drive=r
}

# stats MS... -> "median min" (integers, ms)
stats() { printf '%s\n' "$@" | sort -n | awk '{ a[NR] = $1 } END { m = (NR % 2) ? a[(NR + 1) / 2] : int((a[NR / 2] + a[NR / 2 + 1]) / 2); print m, a[1] }'; }

where="directly on hardware KVM"
[ "${BERTH_IN_RIG:-0}" = 1 ] && where="inside the nested rig (test host under QEMU TCG; figures are far above real hardware)"
echo "bench: boot to 'berth-agent: ready', $runs runs each, ${memory} MiB, $cpus vCPU, $where"
ours_ms=() qemu_ms=() failed=0
for i in $(seq "$runs"); do
  # Alternate, so a slow phase of the machine hits both.
  if o=$(ours 2>/dev/null); then ours_ms+=("$o"); o="$o ms"; else o="no readiness"; failed=1; fi
  if q=$(qemu 2>/dev/null); then qemu_ms+=("$q"); q="$q ms"; else q="no readiness"; failed=1; fi
  echo "bench: run $i: berth-vmm $o, qemu $q"
done
if [ ${#ours_ms[@]} -gt 0 ] && [ ${#qemu_ms[@]} -gt 0 ]; then
  read -r om omin <<< "$(stats "${ours_ms[@]}")"
  read -r qm qmin <<< "$(stats "${qemu_ms[@]}")"
  printf 'bench: berth-vmm  median %6d ms  min %6d ms  (%d runs)\n' "$om" "$omin" "${#ours_ms[@]}"
  printf 'bench: qemu       median %6d ms  min %6d ms  (%d runs)\n' "$qm" "$qmin" "${#qemu_ms[@]}"
  awk -v o="$om" -v q="$qm" 'BEGIN { printf "bench: ratio berth-vmm/qemu (medians) %.2f\n", o / q }'
fi
exit "$failed"
