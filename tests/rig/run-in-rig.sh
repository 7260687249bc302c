#!/usr/bin/env bash
# Runs a command inside the nested rig: a "test host" Linux with real KVM, booted by QEMU with
# software emulation of an AMD CPU that has SVM. Needed where /dev/kvm cannot boot Linux guests
# (kvm_pvm); on a machine with hardware KVM the tests run directly instead (tests/rig/detect.sh).
#
#   tests/rig/run-in-rig.sh [--memory MIB] [--cpus N] [--timeout S] [--share DIR]... [--name WHAT] -- COMMAND...
#
# The test host's root filesystem is this machine's, read-only over virtio-9p, so binaries,
# kernels, images and tools are at the same paths inside. Writable inside: tmpfs on /tmp, /run,
# /var/tmp, /dev/shm; a per-run scratch directory ($BERTH_RIG_SCRATCH, removed afterwards); and
# each --share DIR and $BERTH_ARTIFACTS (when set), at their own paths. The command runs with
# this environment and working directory, BERTH_IN_RIG=1 and TMPDIR=/tmp; its output, and the
# test host's console, go to stdout as they come.
#
# Exit status: the command's; 124 if the rig was killed after --timeout seconds; 125 if the test
# host stopped without the command's status (it did not boot, or crashed) or the rig could not
# start.
#
# A test host that dies without the command's status is booted again, up to three boots; each
# repeat warns on stderr and, when $BERTH_RETRY_LOG names a file, is recorded there as a
# `test-host death` (tests/rig/retries.sh) of WHAT (--name; default: the command), with QEMU's
# status and what the test host's console showed last. So is one that froze: rig-init.sh writes
# the test host's process list to the scratch directory every 20 s, and when that stops for
# BERTH_RIG_FREEZE_S (150) seconds nothing inside is running any more. On a timeout that list
# is printed, showing where the command was stuck.
#
# Environment: BERTH_TEST_HOST_KERNEL (its vmlinux or bzImage; default: built or found by
# kernel-config/build-kernel.sh test-host), BERTH_RIG_MEMORY, BERTH_RIG_CPUS, BERTH_RIG_TIMEOUT,
# BERTH_RIG_TCG_THREAD (multi, the default, or single: QEMU's TCG threading, for investigations),
# BERTH_RIG_NPT (1: the test host's KVM uses nested paging), BERTH_RIG_APPEND (its kernel's
# extra command line).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
CACHE=${BERTH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/berth}

memory=${BERTH_RIG_MEMORY:-3072}
cpus=${BERTH_RIG_CPUS:-2}
timeout=${BERTH_RIG_TIMEOUT:-900}
msize=${BERTH_RIG_MSIZE:-512000}
tcg_thread=${BERTH_RIG_TCG_THREAD:-multi}
shares=()
what=
# shellcheck source=tests/rig/retries.sh
. "$here/retries.sh"

die() { echo "run-in-rig: error: $*" >&2; exit 125; }
usage() { sed -n '6p' "${BASH_SOURCE[0]}" | sed 's/^#   //' >&2; exit 125; }

while [ $# -gt 0 ]; do
  case "$1" in
    --memory) memory=$2; shift 2 ;;
    --cpus) cpus=$2; shift 2 ;;
    --timeout) timeout=$2; shift 2 ;;
    --share) shares+=("$(cd "$2" && pwd)") || die "--share $2: no such directory"; shift 2 ;;
    --name) what=$2; shift 2 ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) usage ;;
  esac
done
[ $# -gt 0 ] || usage
# What the retry log calls this run: the command, on one line, paths in this checkout relative.
if [ -z "$what" ]; then
  what=$(printf '%s ' "$@" | tr -s '\n\t ' '   ')
  what=${what//"$repo/"/}
  what=${what% }
  [ ${#what} -le 80 ] || what="${what:0:77}..."
fi

# Where tests keep files for CI's record (tests/setup.sh's BERTH_ARTIFACTS): writable inside.
if [ -n "${BERTH_ARTIFACTS:-}" ] && [ -d "$BERTH_ARTIFACTS" ]; then
  shares+=("$(cd "$BERTH_ARTIFACTS" && pwd)")
fi

# The test host puts tmpfs on /tmp, /var/tmp, /run and /dev/shm; a checkout there (CI may clone
# into /tmp) would vanish inside, so it comes in as a share at its own path.
case "$repo/" in
  /tmp/* | /var/tmp/* | /run/* | /dev/shm/*) shares+=("$repo") ;;
esac

qemu=qemu-system-x86_64
if ! command -v "$qemu" >/dev/null; then
  [ "$(id -u)" = 0 ] || die "$qemu is missing: apt-get install qemu-system-x86 (tests/setup.sh does)"
  echo "run-in-rig: installing qemu-system-x86" >&2
  { apt-get install -y -q qemu-system-x86 || { apt-get update -q && apt-get install -y -q qemu-system-x86; }; } >&2 \
    || die "could not install qemu-system-x86"
fi

kernel=${BERTH_TEST_HOST_KERNEL:-}
if [ -z "$kernel" ]; then
  kernel=$("$repo/kernel-config/build-kernel.sh" test-host)/vmlinux || die "no test-host kernel"
fi
[ -f "$kernel" ] || die "test-host kernel $kernel not found"

mkdir -p "$CACHE/rig"
scratch=$(mktemp -d "$CACHE/rig/run-XXXXXX")
qemu_pid=
cleanup() {
  [ -z "$qemu_pid" ] || kill "$qemu_pid" 2>/dev/null || true
  [ "${BERTH_RIG_KEEP:-0}" = 1 ] || rm -rf "$scratch"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The command, environment and working directory, for rig-init.sh.
printf '%q ' exec "$@" > "$scratch/cmd"
echo >> "$scratch/cmd"
while IFS= read -r name; do
  case "$name" in
    PWD|OLDPWD|SHLVL|_|SHELLOPTS|BASHOPTS|TMPDIR|HOSTNAME|TERM|TERMCAP|COLUMNS|LINES) continue ;;
  esac
  printf 'export %s=%q\n' "$name" "${!name}"
done < <(compgen -e) > "$scratch/env"
pwd > "$scratch/cwd"

append="root=/dev/root rootfstype=9p rootflags=trans=virtio,version=9p2000.L,msize=$msize,cache=loose ro"
append+=" init=$here/rig-init.sh console=ttyS0 reboot=t panic=-1 loglevel=3"
# tsc_early_khz: under software emulation the test host's PIT calibration of the TSC fails
# whenever the machine is busy ("tsc: Unable to calibrate against PIT"); its KVM then has no TSC
# frequency and a nested guest's vCPU spins in KVM_RUN forever (kvm_guest_time_update keeps
# asking for a clock update). QEMU's emulated TSC runs at this machine's TSC rate, so say it.
tsc_khz=$(awk '/^cpu MHz/ { printf "%d", $4 * 1000; exit }' /proc/cpuinfo)
[ -n "$tsc_khz" ] && [ "$tsc_khz" -gt 0 ] || die "cannot read this machine's TSC frequency from /proc/cpuinfo"
append+=" tsc_early_khz=$tsc_khz"
# kvm_amd.npt=0: the test host's KVM runs its guests on shadow page tables, not nested paging.
# With nested paging (QEMU emulating NPT under TCG) a Berth guest under container load
# triple-faulted without a kernel message (docker save in tests/bench/docker.sh, one vCPU); with
# shadow paging the same benchmark ran through. BERTH_RIG_NPT=1 turns nested paging back on.
[ "${BERTH_RIG_NPT:-0}" = 1 ] || append+=" kvm_amd.npt=0"
append+=" ${BERTH_RIG_APPEND:-}"
append+=" berth.rig_scratch=$scratch berth.rig_msize=$msize"
fs_args=(
  -fsdev "local,id=root,path=/,security_model=none,readonly=on,multidevs=remap"
  -device virtio-9p-device,fsdev=root,mount_tag=/dev/root
  -fsdev "local,id=scratch,path=$scratch,security_model=none,multidevs=remap"
  -device virtio-9p-device,fsdev=scratch,mount_tag=berth-scratch
)
for i in "${!shares[@]}"; do
  append+=" berth.rig_share.$i=${shares[$i]}"
  fs_args+=(
    -fsdev "local,id=share$i,path=${shares[$i]},security_model=none,multidevs=remap"
    -device "virtio-9p-device,fsdev=share$i,mount_tag=berth-share-$i"
  )
done

# A test host whose self-watch (rig-init.sh) is this many seconds old has frozen.
freeze_after=${BERTH_RIG_FREEZE_S:-150}
# watch_age: seconds since the test host last wrote $scratch/watch; 0 before its first.
watch_age() {
  local written
  written=$(stat -c %Y "$scratch/watch" 2>/dev/null) || { echo 0; return; }
  echo $(($(date +%s) - written))
}
# show_watch: the test host's last look at its processes, for a run that hung.
show_watch() {
  [ -f "$scratch/watch" ] || { echo "run-in-rig: the test host never reported its processes" >&2; return; }
  echo "run-in-rig: the test host's processes $(watch_age) s before it was killed:" >&2
  sed 's/^/run-in-rig:   /' "$scratch/watch" >&2
}

# One boot of the test host; sets $elapsed, returns 0 with $scratch/status written, 124 on
# timeout, 125 when the test host stopped without the command's status. Its console goes to
# stdout and, for the evidence of a death, to $console (this boot's only).
console=$scratch/test-host-console.log
boot_test_host() {
  rm -f "$scratch/status"
  start=$(date +%s.%N)
  # stdin is /dev/null: the console is output only, and a terminal is never put in raw mode.
  "$qemu" -M microvm,acpi=off -accel "tcg,thread=$tcg_thread" -cpu max -m "$memory" -smp "$cpus" \
    -nodefaults -no-user-config -display none -no-reboot \
    -chardev "stdio,id=console,logfile=$console,logappend=off" -serial chardev:console \
    -kernel "$kernel" -append "$append" "${fs_args[@]}" < /dev/null &
  qemu_pid=$!

  local timed_out=0 frozen=0 deadline=$((SECONDS + timeout)) tick=0
  rm -f "$scratch/watch"
  while kill -0 "$qemu_pid" 2>/dev/null; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      timed_out=1
    elif [ $((tick += 1)) -ge 20 ]; then
      tick=0
      # rig-init.sh rewrites $scratch/watch every 20 s: a stale one is a test host that stopped
      # running programs, which no deadline inside it can end.
      [ "$(watch_age)" -lt "$freeze_after" ] || frozen=1
    fi
    if [ "$timed_out" = 1 ] || [ "$frozen" = 1 ]; then
      kill "$qemu_pid" 2>/dev/null || true
      sleep 2
      kill -9 "$qemu_pid" 2>/dev/null || true
      break
    fi
    sleep 0.5
  done
  qemu_status=0
  wait "$qemu_pid" || qemu_status=$?
  qemu_pid=
  elapsed=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')
  [ "$timed_out" = 1 ] && return 124
  [ "$frozen" = 1 ] && return 126
  [ -f "$scratch/status" ] || return 125
  return 0
}

# The emulated test host itself sometimes dies (seen: an int3 oops at a kernel text-patching site
# under multi-threaded TCG, about once in tens of nested VM starts). That is the emulator's fault,
# not a result of the command, so such a run is repeated (up to three attempts), loudly and on the
# record (tests/rig/retries.sh). A timeout is not retried.
attempt=1
while :; do
  result=0
  boot_test_host || result=$?
  if [ "$result" = 124 ]; then
    echo "run-in-rig: timed out after ${timeout}s; the test host was killed" >&2
    show_watch
    exit 124
  fi
  if [ "$result" = 126 ]; then
    # Everything in the test host sleeping with no timer waking it: seen under TCG with the
    # nested VM running (ports benchmark, 2026-12-03), the emulator's fault like a death.
    echo "run-in-rig: WARNING: the test host froze: it has not run its self-watch for $(watch_age) s (${elapsed}s in)" >&2
    show_watch
    qemu_status="frozen, self-watch $(watch_age) s old"
  fi
  [ "$result" = 0 ] && break
  if [ "$attempt" -ge 3 ]; then
    die "the test host stopped without an exit status from the command (QEMU status $qemu_status, ${elapsed}s), three times: it did not boot or it crashed; see its console above"
  fi
  echo "run-in-rig: WARNING: the test host died without the command's status (QEMU status $qemu_status, ${elapsed}s); running the command once more in a fresh test host" >&2
  berth_retry_record "test-host death" "$what" "$attempt" 3 \
    "QEMU status $qemu_status after ${elapsed}s; $(berth_console_evidence "$console")" \
    || die "the retry could not be recorded"
  attempt=$((attempt + 1))
done
status=$(cat "$scratch/status")
echo "run-in-rig: command exited with status $status (rig ${elapsed}s)" >&2
exit "$status"
