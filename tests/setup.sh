#!/usr/bin/env bash
# Makes everything the Linux-booting tests need, reusing what is cached, and prints `export` lines
# for it (also written to $CACHE/env.sh):
#
#   eval "$(tests/setup.sh)"      # or: tests/setup.sh >/dev/null && . ~/.cache/berth/env.sh
#
#   BERTH_VMM, BERTH_AGENT, BERTH_BOOT_TIMER, BERTH_VSOCK_STRESS, BERTH_NET_PROBE  release binaries
#   BERTH_KERNEL            the guest kernel (PVH vmlinux)
#   BERTH_ROOTFS            the read-only root image (ext4, Debian trixie)
#   BERTH_ROOTFS_BASELINE   the previous image (bookworm, dockerd 20.10), the docker benchmark's
#                           baseline; built only with BERTH_BENCH_BASELINE=1, else empty
#   BERTH_TEST_HOST_KERNEL  the nested rig's kernel (vmlinux)
#   BERTH_RIG_RUN           tests/rig/run-in-rig.sh
#   BERTH_RIG_MODE          direct | rig (tests/rig/detect.sh)
#   BERTH_DOCKER_PLUGINS    docker-compose and docker-buildx from Debian trixie (cli/docker-tools.sh)
#   BERTH_DOCKER_REGISTRY   trixie's docker-registry binary (the registry test's image)
#   BERTH_DESKTOP           the desktop app (desktop/, Tauri 2)
#   BERTH_TAURI_DRIVER      tauri-driver, the WebDriver server that drives it
#   BERTH_DESKTOP_PYTHON    a python with dbus-next and Pillow, for the desktop test's tray watcher
#                           and its screenshot of the tray menu
#   BERTH_ARTIFACTS         where tests keep files for CI's record (screenshots), outside the clone
#   CARGO_TARGET_DIR        where the binaries were built
#
# Steps: Debian packages (apt-get update only if one is missing), cargo build of the workspace's
# binaries, both kernels (kernel-config/build-kernel.sh, ~7 min each when cold), the guest image
# (guest-agent/image/build-image.sh, ~2 min when cold). Progress and timings go to stderr.
# With CI=true and no CARGO_TARGET_DIR, binaries go to $CACHE/target so a fresh clone builds warm.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${BERTH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/berth}
export BERTH_CACHE=$CACHE
mkdir -p "$CACHE"

log() { echo "setup: $*" >&2; }
die() { echo "setup: error: $*" >&2; exit 1; }
phase_start=$SECONDS
phase() {
  log "$1 done in $((SECONDS - phase_start)) s"
  phase_start=$SECONDS
}

# 1. Debian packages.
# busybox-static: the e2e tests and benchmarks make their container images from it (no registry
# is reachable); bsdutils: `script`, the pseudo-terminal for `docker run -it`; passt: the VM's
# network; dnsmasq-base, iperf3, inotify-tools: the servers, load and watchers of the network and
# share tests. The desktop app (Tauri 2): WebKitGTK, the ayatana indicator and librsvg to build
# it; Xvfb, a session bus and Debian's WebKitWebDriver to drive it; python3-venv for the test's
# D-Bus watcher; trayer (an XEmbed tray), xdotool and xwininfo for its screenshot of the menu.
packages=(qemu-system-x86 debootstrap curl jq linux-source-6.1 bc bison flex libelf-dev libssl-dev cpio
  xz-utils e2fsprogs make gcc perl util-linux iproute2 busybox-static bsdutils
  passt dnsmasq-base iperf3 inotify-tools patch
  libwebkit2gtk-4.1-dev libayatana-appindicator3-dev librsvg2-dev xvfb xauth webkit2gtk-driver
  dbus-x11 python3-venv trayer xdotool x11-utils)
# The docker CLI the tests drive: whichever is on PATH, else Debian's (docker.io carries it).
command -v docker >/dev/null || packages+=(docker.io)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "missing Debian packages (${missing[*]}); run as root or apt-get install them"
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi
phase "packages"

# 2. Binaries.
if [ -z "${CARGO_TARGET_DIR:-}" ] && [ "${CI:-}" = true ]; then
  export CARGO_TARGET_DIR=$CACHE/target
fi
target=${CARGO_TARGET_DIR:-$repo/target}
case "$target" in /*) ;; *) target=$repo/$target ;; esac
(cd "$repo" && cargo build --release --workspace --bins >&2)
for bin in berth-vmm berth-agent boot-timer vsock-stress net-probe fs-bench fs-check berth-desktop; do
  [ -x "$target/release/$bin" ] || die "cargo build did not produce $target/release/$bin"
done
phase "cargo build"

# 3. Kernels.
guest_kernel=$("$repo/kernel-config/build-kernel.sh" guest) || die "guest kernel build failed"
phase "guest kernel"
test_host_kernel=$("$repo/kernel-config/build-kernel.sh" test-host) || die "test-host kernel build failed"
phase "test-host kernel"

# 4. Guest image.
rootfs=$("$repo/guest-agent/image/build-image.sh" "$target/release/berth-agent") || die "guest image build failed"
# The previous image (bookworm, dockerd 20.10), when asked for (BERTH_BENCH_BASELINE=1): the
# docker benchmark's baseline for start time and size. A one-off comparison for the move to
# trixie, kept out of CI's time (its image and two more starts).
rootfs_baseline=
if [ "${BERTH_BENCH_BASELINE:-0}" = 1 ]; then
  rootfs_baseline=$(BERTH_GUEST_SUITE=bookworm "$repo/guest-agent/image/build-image.sh" "$target/release/berth-agent") ||
    die "baseline (bookworm) guest image build failed"
fi
phase "guest images"

# 5. The host side of docker: trixie's compose and buildx plugins for this user (and a docker CLI
# if none is on PATH), a copy in the cache that the e2e tests link into their own docker configs,
# and Debian's registry binary for the registry test's image.
"$repo/cli/docker-tools.sh" install || die "cannot install the docker CLI plugins"
DOCKER_CONFIG=$CACHE/docker-tools "$repo/cli/docker-tools.sh" install 2>/dev/null ||
  die "cannot install the docker CLI plugins into $CACHE/docker-tools"
registry=$("$repo/cli/docker-tools.sh" extract docker-registry)/root/usr/bin/docker-registry
[ -x "$registry" ] || die "trixie's docker-registry package has no $registry"
phase "docker tools"

# 6. What drives the desktop app in its test: tauri-driver (the WebDriver server Tauri's apps
# need, from crates.io) and a Python venv with dbus-next and Pillow (PyPI): the test's
# StatusNotifier watcher, and its screen grab of the tray menu. Each is kept in the cache under its version.
tauri_driver_version=2.1.0
tauri_driver=$CACHE/tauri-driver-$tauri_driver_version/bin/tauri-driver
if [ ! -x "$tauri_driver" ]; then
  log "building tauri-driver $tauri_driver_version"
  CARGO_TARGET_DIR=$CACHE/tauri-driver-build cargo install tauri-driver --locked \
    --version "$tauri_driver_version" --root "$CACHE/tauri-driver-$tauri_driver_version" >&2 ||
    die "cannot build tauri-driver $tauri_driver_version"
  rm -rf "$CACHE/tauri-driver-build"
fi
dbus_next_version=0.2.3
pillow_version=13.0.0
desktop_venv=$CACHE/desktop-venv-$dbus_next_version-pillow-$pillow_version
if ! "$desktop_venv/bin/python" -c 'import dbus_next, PIL.ImageGrab' 2>/dev/null; then
  log "making the desktop test's Python venv (dbus-next $dbus_next_version, Pillow $pillow_version)"
  rm -rf "$desktop_venv"
  python3 -m venv "$desktop_venv" >&2 &&
    "$desktop_venv/bin/pip" install -q "dbus-next==$dbus_next_version" "Pillow==$pillow_version" >&2 ||
    die "cannot make $desktop_venv with dbus-next and Pillow from PyPI"
fi
mkdir -p "$CACHE/artifacts"
phase "desktop test tools"

# shellcheck source=tests/rig/detect.sh
. "$repo/tests/rig/detect.sh"
mode=$(berth_rig_mode)

env_file=$CACHE/env.sh
{
  printf 'export BERTH_CACHE=%q\n' "$CACHE"
  printf 'export CARGO_TARGET_DIR=%q\n' "$target"
  printf 'export BERTH_VMM=%q\n' "$target/release/berth-vmm"
  printf 'export BERTH_AGENT=%q\n' "$target/release/berth-agent"
  printf 'export BERTH_BOOT_TIMER=%q\n' "$target/release/boot-timer"
  printf 'export BERTH_VSOCK_STRESS=%q\n' "$target/release/vsock-stress"
  printf 'export BERTH_NET_PROBE=%q\n' "$target/release/net-probe"
  printf 'export BERTH_KERNEL=%q\n' "$guest_kernel/vmlinux"
  printf 'export BERTH_ROOTFS=%q\n' "$rootfs"
  printf 'export BERTH_ROOTFS_BASELINE=%q\n' "$rootfs_baseline"
  printf 'export BERTH_TEST_HOST_KERNEL=%q\n' "$test_host_kernel/vmlinux"
  printf 'export BERTH_RIG_RUN=%q\n' "$repo/tests/rig/run-in-rig.sh"
  printf 'export BERTH_RIG_MODE=%q\n' "$mode"
  printf 'export BERTH_DOCKER_PLUGINS=%q\n' "$CACHE/docker-tools/cli-plugins"
  printf 'export BERTH_DESKTOP=%q\n' "$target/release/berth-desktop"
  printf 'export BERTH_TAURI_DRIVER=%q\n' "$tauri_driver"
  printf 'export BERTH_DESKTOP_PYTHON=%q\n' "$desktop_venv/bin/python"
  printf 'export BERTH_ARTIFACTS=%q\n' "$CACHE/artifacts"
  printf 'export BERTH_DOCKER_REGISTRY=%q\n' "$registry"
} > "$env_file.tmp"
mv "$env_file.tmp" "$env_file"
log "wrote $env_file (guests boot: $mode)"
cat "$env_file"
