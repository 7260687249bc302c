#!/usr/bin/env bash
# Builds a Berth kernel from Debian's linux-source-6.1 package and prints the directory holding
# `vmlinux` (PVH ELF), `bzImage` and `config`.
#
#   kernel-config/build-kernel.sh guest       # the guest kernel (guest.config + guest-only.config
#                                             # over tinyconfig)
#   kernel-config/build-kernel.sh test-host   # the nested rig's test host (guest + test-host.config)
#
# Berth's own drivers (drivers/*.c here: berth_notify, the host-file-change events) are copied into
# the source tree for both flavors, but only guest-only.config enables them, so the test host's key
# (and its 20-minute build) does not depend on them.
#
# Results are cached under $BERTH_CACHE/kernel (default ~/.cache/berth/kernel), keyed by a hash of
# this script, the fragments and the source package version; a cached build is reused at once.
# Build output goes to stderr so that stdout is only the directory.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
flavor=${1:-}
# Our driver sources, each copied to drivers/misc/ with a Kconfig entry and a Makefile line.
drivers=("$here/drivers/berth_notify.c")
# Our changes to Linux's own files (patches/*.patch, -p1), applied once to the shared source
# tree. They only add what the guest asks for (a mount option), so they are part of the guest's
# key and not of the test host's.
patches=("$here"/patches/*.patch)
case "$flavor" in
  guest)
    fragments=("$here/guest.config" "$here/guest-only.config")
    keyed=("${fragments[@]}" "${drivers[@]}" "${patches[@]}")
    ;;
  test-host)
    fragments=("$here/guest.config" "$here/test-host.config")
    keyed=("${fragments[@]}")
    ;;
  *) echo "usage: $0 guest|test-host" >&2; exit 2 ;;
esac

cache=${BERTH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/berth}
tarball=/usr/src/linux-source-6.1.tar.xz
if [ ! -f "$tarball" ]; then
  echo "build-kernel: $tarball is missing: apt-get install linux-source-6.1 (tests/setup.sh does)" >&2
  exit 1
fi
version=$(dpkg-query -W -f='${Version}' linux-source-6.1)
# Bump when the way the kernel is built changes (not for comments or locking): it is part of the key.
recipe=2
key=$( { echo "$version recipe $recipe"; cat "$here/docker-flags.txt" "${keyed[@]}"; } | sha256sum | cut -c1-16)
out="$cache/kernel/$flavor-$key"
if [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then
  echo "$out"
  exit 0
fi

log() { echo "build-kernel: $*" >&2; }

# One build per flavor at a time (CI, tests and a developer may all ask at once); whoever waited
# finds the finished kernel.
mkdir -p "$cache/kernel"
exec 9> "$cache/kernel/.lock-$flavor"
if ! flock -n 9; then
  log "waiting for another $flavor kernel build to finish"
  flock 9
fi
if [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then
  echo "$out"
  exit 0
fi
src="$cache/kernel/src-$version"
if [ ! -f "$src/.extracted" ]; then
  log "extracting linux-source $version"
  rm -rf "$src" && mkdir -p "$src"
  tar -xJf "$tarball" -C "$src" --strip-components=1
  touch "$src/.extracted"
fi

# Idempotent: files are rewritten only when they differ (an unchanged tree stays incremental) and
# the Kconfig and Makefile lines are added once.
install_drivers() {
  local misc="$src/drivers/misc"
  for c in "${drivers[@]}"; do
    cmp -s "$c" "$misc/$(basename "$c")" || cp "$c" "$misc/$(basename "$c")"
  done
  local kconfig
  kconfig=$(cat <<'KCONFIG'
config BERTH_NOTIFY
	bool "Berth: inotify events for host-side changes to virtio-fs shares"
	depends on PROC_FS && FSNOTIFY
	help
	  /proc/berth-notify, written by Berth's guest agent, raises fsnotify
	  events for files the host created, changed, deleted or renamed in a
	  virtio-fs share.
KCONFIG
)
  [ "$(cat "$misc/Kconfig.berth" 2>/dev/null)" = "$kconfig" ] || printf '%s\n' "$kconfig" > "$misc/Kconfig.berth"
  grep -qxF 'source "drivers/misc/Kconfig.berth"' "$misc/Kconfig" ||
    echo 'source "drivers/misc/Kconfig.berth"' >> "$misc/Kconfig"
  grep -qxF 'obj-$(CONFIG_BERTH_NOTIFY) += berth_notify.o' "$misc/Makefile" ||
    echo 'obj-$(CONFIG_BERTH_NOTIFY) += berth_notify.o' >> "$misc/Makefile"
}
install_drivers

# Each patch once: one that reverses cleanly is in already.
apply_patches() {
  local p
  for p in "${patches[@]}"; do
    if patch -p1 -R --dry-run -s -f -d "$src" < "$p" >/dev/null 2>&1; then
      continue
    fi
    log "applying $(basename "$p")"
    patch -p1 -N -s -d "$src" < "$p" >&2 || { log "cannot apply $p to $src"; exit 1; }
  done
}
apply_patches

obj="$cache/kernel/obj-$flavor"
mkdir -p "$obj"
log "configuring $flavor ($key)"
make -s -C "$src" O="$obj" tinyconfig >&2
"$src/scripts/kconfig/merge_config.sh" -m -O "$obj" "$obj/.config" "${fragments[@]}" >/dev/null
make -s -C "$src" O="$obj" olddefconfig >&2

# Every option a fragment sets must have survived olddefconfig: a dropped one means a missing
# dependency, and a kernel silently without it is worse than a failed build.
# A later fragment may override an earlier one (merge_config.sh's rule), so only the last word on
# each option is checked.
declare -A wanted=()
order=()
for frag in "${fragments[@]}"; do
  while IFS= read -r line; do
    case "$line" in
      CONFIG_*=*) opt=${line%%=*} ;;
      "# CONFIG_"*" is not set") opt=${line#\# }; opt=${opt%% *} ;;
      *) continue ;;
    esac
    [ -n "${wanted[$opt]+set}" ] || order+=("$opt")
    wanted[$opt]=$line
  done < "$frag"
done
missing=()
for opt in "${order[@]}"; do
  line=${wanted[$opt]}
  case "$line" in
    CONFIG_*=*) grep -qxF "$line" "$obj/.config" || missing+=("$line (have: $(grep -E "^(# )?$opt[= ]" "$obj/.config" || echo unset))") ;;
    *) grep -qx "$opt=y" "$obj/.config" && missing+=("$line (have: $opt=y)") ;;
  esac
done
# A fragment that turns one of docker-flags.txt's optional options off on purpose (the guest
# drops DUMMY) has the last word.
while read -r flag; do
  [ "${wanted[CONFIG_$flag]:-}" = "# CONFIG_$flag is not set" ] && continue
  grep -qx "CONFIG_$flag=y" "$obj/.config" || missing+=("CONFIG_$flag=y (docker-flags.txt)")
done < <(grep -v '^#' "$here/docker-flags.txt" | tr ' ' '\n' | grep .)
if [ ${#missing[@]} -gt 0 ]; then
  log "these options did not make it into the $flavor config:"
  printf '  %s\n' "${missing[@]}" >&2
  exit 1
fi

log "building $flavor kernel with $(nproc) jobs (a few minutes)"
make -s -C "$src" O="$obj" -j"$(nproc)" vmlinux bzImage >&2
tmp="$out.tmp.$$"
rm -rf "$tmp" && mkdir -p "$tmp"
cp "$obj/vmlinux" "$tmp/vmlinux"
cp "$obj/arch/x86/boot/bzImage" "$tmp/bzImage"
cp "$obj/.config" "$tmp/config"
rm -rf "$out" && mv "$tmp" "$out"
log "built $out ($(du -h "$out/bzImage" | cut -f1) bzImage)"
echo "$out"
