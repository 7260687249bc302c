#!/bin/bash
# PID 1 of the nested rig's test host (started by tests/rig/run-in-rig.sh; not for use elsewhere).
#
# The root filesystem is the build machine's, read-only over virtio-9p. This script mounts the
# pseudo filesystems, tmpfs on the places programs write to, and the writable 9p shares at their
# build-machine paths; then it runs the command from the scratch share with the caller's
# environment and working directory, its output on the console, writes its exit status to the
# scratch share and restarts the machine (reboot=t plus QEMU's -no-reboot: QEMU exits).
#
# PID 1 must never exit (the kernel would panic), so nothing here uses `set -e`: every failure is
# turned into an exit status of 125 with one `rig:` line.

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

restart() {
  sync
  # reboot(2) with LINUX_REBOOT_CMD_RESTART; bash has no way to call it and /sbin/reboot here
  # is systemctl, which wants systemd.
  perl -e 'syscall(169, 0xfee1dead, 672274793, 0x01234567, 0)'
  echo "rig: reboot(2) failed; halting" >&2
  while :; do sleep 3600; done
}

fail() {
  echo "rig: $*" >&2
  [ -n "${scratch:-}" ] && [ -d "$scratch" ] && echo 125 > "$scratch/status"
  restart
}

mnt() { mountpoint -q "${@: -1}" || mount "$@"; }

mnt -t proc proc /proc
mnt -t sysfs sysfs /sys
mnt -t devtmpfs -o mode=0755 devtmpfs /dev
mkdir -p /dev/pts /dev/shm
# devtmpfs has no /dev/fd; bash process substitution and many tools need it.
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
mnt -t devpts -o gid=5,mode=0620,ptmxmode=0666 devpts /dev/pts
mnt -t tmpfs -o mode=1777 tmpfs /dev/shm
mnt -t tmpfs -o mode=0755 tmpfs /run
mnt -t tmpfs -o mode=1777 tmpfs /tmp
mnt -t tmpfs -o mode=1777 tmpfs /var/tmp
mountpoint -q /sys/fs/cgroup || mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
ip link set lo up 2>/dev/null
# passt (a Berth VM's network) needs a host interface with an address and a default route; the
# test host has only lo and the kernel's dummy0. Traffic for elsewhere goes nowhere, as it
# should: every server the tests reach lives on this test host.
if ip link show dummy0 >/dev/null 2>&1; then
  ip addr add 10.0.2.15/24 dev dummy0 && ip link set dummy0 up && ip route add default via 10.0.2.2 \
    || echo "rig: cannot configure dummy0 for passt" >&2
fi

# berth.rig_scratch=PATH and berth.rig_share.N=PATH name the writable shares by their host paths.
scratch=
msize=
shares=()
read -ra cmdline < /proc/cmdline
for arg in "${cmdline[@]}"; do
  case "$arg" in
    berth.rig_scratch=*) scratch=${arg#*=} ;;
    berth.rig_share.*=*) shares+=("${arg#berth.rig_share.}") ;;
    berth.rig_msize=*) msize=${arg#*=} ;;
  esac
done
[ -n "$scratch" ] || fail "no berth.rig_scratch= on the kernel command line"
for share in "berth-scratch=$scratch" "${shares[@]}"; do
  tag=${share%%=*} path=${share#*=}
  [ "$tag" = berth-scratch ] || tag=berth-share-$tag
  # The mount point exists on the read-only root (the caller made it); if it is under a tmpfs
  # mounted above, make it there.
  [ -d "$path" ] || mkdir -p "$path" 2>/dev/null
  mount -t 9p -o "trans=virtio,version=9p2000.L,msize=${msize:-262144},cache=none" "$tag" "$path" \
    || fail "cannot mount the 9p share $tag on $path"
done
[ -f "$scratch/cmd" ] || fail "$scratch/cmd is missing: the scratch share is not what run-in-rig.sh wrote"

if [ ! -c /dev/kvm ]; then
  fail "/dev/kvm is missing in the test host: its kernel lacks KVM, or QEMU's -cpu has no SVM/VMX"
fi

# The caller's environment, then what differs in here.
# shellcheck source=/dev/null
. "$scratch/env"
export BERTH_IN_RIG=1 BERTH_RIG_SCRATCH="$scratch" TMPDIR=/tmp HOSTNAME=berth-rig
hostname berth-rig 2>/dev/null
cd "$(cat "$scratch/cwd")" 2>/dev/null || cd /

# The test host's look at itself every 20 s, for run-in-rig.sh: its processes and where each
# sleeps. A file that stops changing means the test host stopped running programs (frozen); a
# fresh one on a timeout shows what the command was stuck in.
(
  while :; do
    {
      echo "uptime $(cut -d' ' -f1 /proc/uptime) s, $(grep -E '^MemAvailable' /proc/meminfo | tr -s ' ')"
      ps -eo pid,ppid,stat,wchan:24,etimes,args --sort=pid 2>/dev/null | grep -v -e ' \[' -e ' ps -eo' | cut -c1-220
    } > "$scratch/watch.tmp" 2>/dev/null && mv -f "$scratch/watch.tmp" "$scratch/watch"
    sleep 20
  done
) < /dev/null > /dev/null 2>&1 &
watch_pid=$!
bash "$scratch/cmd" < /dev/null
status=$?
kill "$watch_pid" 2>/dev/null
if [ "$status" != 0 ]; then
  # The console shows only critical kernel messages (loglevel=3); on a failure show the rest.
  dmesg --level=err,warn 2>/dev/null | grep -v -e 'RSDP' -e "support for 'kvm_intel'" \
    -e 'no channels available for device root' | sed 's/^/rig: test host: /' >&2
fi
echo "$status" > "$scratch/status.tmp" && mv "$scratch/status.tmp" "$scratch/status"
restart
