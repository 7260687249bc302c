#!/usr/bin/env bash
# Builds Berth's read-only guest root filesystem and prints the path of the ext4 image.
#
#   guest-agent/image/build-image.sh AGENT_BINARY
#
# Stage 1 (slow, ~1 min, needs the Debian mirror): a debootstrap'ed Debian tree with dockerd,
# containerd and runc, trimmed, cached as $CACHE/rootfs/tree-<key>, where <key> hashes this
# script's package list and stage-1 steps, so editing them rebuilds the tree.
# Stage 2 (fast, seconds): that tree plus AGENT_BINARY as /sbin/init (and linked as dockerd's
# userland proxy, /usr/libexec/berth/port-proxy), written by `mkfs.ext4 -d`
# into $CACHE/rootfs/root-<key of tree + agent>.ext4. An existing image is reused.
#
# Both stages build under a temporary name and rename at the end, so an interrupted build never
# leaves something that later looks valid. Progress goes to stderr; stdout is only the path.
set -euo pipefail

CACHE=${BERTH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/berth}
MIRROR=${BERTH_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# The guest's Debian release: trixie (docker.io 26.1, containerd 1.7, runc 1.1). bookworm
# (docker.io 20.10) is kept only as the baseline the benchmarks measure the current image against.
SUITE=${BERTH_GUEST_SUITE:-trixie}
case "$SUITE" in
  # docker-cli: `berth shell -- docker ...` in the guest (the benchmarks' in-guest baseline and
  # a user's last resort when the host side is broken); trixie ships it apart from dockerd.
  trixie) PACKAGES=docker.io,docker-cli,containerd,runc,tini,iptables,e2fsprogs,ca-certificates ;;
  bookworm) PACKAGES=docker.io,containerd,runc,iptables,e2fsprogs,ca-certificates ;;
  *) echo "build-image: error: BERTH_GUEST_SUITE=$SUITE: only trixie (the guest) and bookworm (the benchmarks' baseline) are built" >&2; exit 2 ;;
esac

log() { echo "build-image: $*" >&2; }
die() { echo "build-image: error: $*" >&2; exit 1; }

[ $# -eq 1 ] || { echo "usage: $0 AGENT_BINARY" >&2; exit 2; }
agent=$1
[ -f "$agent" ] && [ -r "$agent" ] || die "agent binary $agent not found (cargo build --release -p berth-agent)"
[ "$(id -u)" = 0 ] || die "must run as root (debootstrap and device nodes in the tree)"
for tool in debootstrap mkfs.ext4 sha256sum flock; do
  command -v "$tool" >/dev/null || die "$tool is missing: run tests/setup.sh (apt-get install debootstrap e2fsprogs)"
done

# The tree that debootstrap makes, trimmed. Runs in a fresh temporary directory $1.
stage1() {
  local tree=$1
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$tree" "$MIRROR" >&2
  # Nothing in the guest installs packages or reads documentation.
  rm -rf "$tree"/var/lib/apt/lists/* "$tree"/var/cache/apt/* "$tree"/var/cache/debconf/*-old \
    "$tree"/usr/share/doc/* "$tree"/usr/share/man/* "$tree"/usr/share/info/* \
    "$tree"/usr/share/lintian "$tree"/usr/share/linda "$tree"/usr/share/bug
  find "$tree"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
  # What no part of the guest runs: containerd's debugging client, the v1 shims (dockerd starts
  # io.containerd.runc.v2), docker's own userland proxy (the agent is dockerd's), and glibc's
  # character-set converters. About 60 MB.
  rm -f "$tree"/usr/bin/ctr "$tree"/usr/bin/containerd-shim "$tree"/usr/bin/containerd-shim-runc-v1 \
    "$tree"/usr/sbin/docker-proxy "$tree"/usr/bin/docker-proxy
  rm -rf "$tree"/usr/lib/x86_64-linux-gnu/gconv
  # The data disk is mounted on /var/lib/berth and bound onto these by the agent; anything the
  # packages put there would be hidden anyway.
  rm -rf "$tree"/var/lib/docker "$tree"/var/lib/containerd "$tree"/var/log
  mkdir -p "$tree"/var/lib/berth "$tree"/var/lib/docker "$tree"/var/lib/containerd "$tree"/var/log
  chmod 0711 "$tree"/var/lib/docker "$tree"/var/lib/containerd
  # debootstrap copies the build machine's identity in; the guest gets its own at boot
  # (berth.hostname= on the command line), so the image carries none.
  rm -f "$tree"/etc/hostname "$tree"/etc/machine-id "$tree"/var/lib/dbus/machine-id
  : > "$tree"/etc/resolv.conf
  printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' > "$tree"/etc/hosts
  # The root is read-only and has no init of its own: /sbin/init is the agent (stage 2).
  rm -f "$tree"/sbin/init "$tree"/usr/sbin/init
  # dockerd 20.10 (the bookworm baseline) writes a key into /etc/docker at start, which is
  # read-only here; the agent adds this image's settings to its daemon.json. dockerd 26 writes none.
  if [ "$SUITE" = bookworm ]; then
    mkdir -p "$tree"/etc/berth
    echo '{ "deprecated-key-path": "/var/lib/docker/key.json" }' > "$tree"/etc/berth/daemon.json
  fi
}

# The tree plus the agent, as an ext4 image at $2, from a disposable copy $1 of the tree.
stage2() {
  local staging=$1 image=$2
  install -m 0755 -o 0 -g 0 "$agent" "$staging"/usr/sbin/init
  # dockerd's userland-proxy-path: the agent recognises the name (argv[0]) and runs as the proxy.
  install -d -m 0755 -o 0 -g 0 "$staging"/usr/libexec/berth
  ln -s /usr/sbin/init "$staging"/usr/libexec/berth/port-proxy
  local kib files
  kib=$(du -sk --apparent-size "$staging" | cut -f1)
  files=$(find "$staging" -xdev | wc -l)
  # Content + 15% + 48 MiB for ext4's metadata and block rounding of small files.
  local size_mib=$(( kib * 115 / 100 / 1024 + 48 ))
  truncate -s "${size_mib}M" "$image"
  mkfs.ext4 -q -F -L berth-root -O ^has_journal -b 4096 -m 0 -N $(( files + files / 5 + 1024 )) \
    -E root_owner=0:0 -d "$staging" "$image" >&2
}

tree_key=$( { echo "$SUITE $MIRROR $PACKAGES"; declare -f stage1; } | sha256sum | cut -c1-16)
image_key=$( { echo "$tree_key"; declare -f stage2; sha256sum < "$agent"; } | sha256sum | cut -c1-16)
dir=$CACHE/rootfs
tree=$dir/tree-$tree_key
image=$dir/root-$image_key.ext4
mkdir -p "$dir"

if [ -f "$image" ]; then
  echo "$image"
  exit 0
fi

# One build at a time per cache; a second caller waits, then finds the result.
exec 9>"$dir/.lock"
flock 9
if [ -f "$image" ]; then
  echo "$image"
  exit 0
fi

tmp_paths=()
cleanup() { [ ${#tmp_paths[@]} -eq 0 ] || rm -rf "${tmp_paths[@]}"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ ! -d "$tree" ]; then
  start=$SECONDS
  log "stage 1: debootstrap $SUITE with $PACKAGES (about a minute)"
  rm -rf "$dir"/tree-*.tmp.*
  tmp_tree=$tree.tmp.$$
  tmp_paths+=("$tmp_tree")
  mkdir -p "$tmp_tree"
  stage1 "$tmp_tree"
  mv "$tmp_tree" "$tree"
  log "stage 1: $tree ($(du -sh "$tree" | cut -f1), $((SECONDS - start)) s)"
fi

start=$SECONDS
rm -rf "$dir"/root-*.tmp.* "$dir"/staging-*
staging=$dir/staging-$image_key.$$
tmp_image=$image.tmp.$$
tmp_paths+=("$staging" "$tmp_image")
# Hard links cost nothing; stage 2 only adds new files, so the cached tree is never written.
cp -al "$tree" "$staging"
stage2 "$staging" "$tmp_image"
mv "$tmp_image" "$image"
rm -rf "$staging"
# Images of older agent builds are dropped after a day or two.
find "$dir" -maxdepth 1 -name 'root-*.ext4' ! -name "$(basename "$image")" -mtime +1 -delete
log "stage 2: $image ($(du -h --apparent-size "$image" | cut -f1), $((SECONDS - start)) s)"
echo "$image"
