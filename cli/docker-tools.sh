#!/usr/bin/env bash
# The host side of docker a Berth user needs, from Debian trixie's packages (on a bookworm host
# too: a private apt list beside the system's, nothing installed through dpkg):
#
#   cli/docker-tools.sh install     # the CLI plugins `docker compose` (v2) and `docker buildx`
#                                   # into $DOCKER_CONFIG/cli-plugins (default ~/.docker/cli-plugins),
#                                   # where the docker CLI finds them for this user, and the docker
#                                   # CLI itself into ~/.local/bin when none is on PATH
#   cli/docker-tools.sh extract PKG # unpacks trixie's PKG (e.g. docker-registry) and prints the
#                                   # directory holding its files
#   cli/docker-tools.sh versions    # what `install` installs, as `name version` lines
#
# Packages are fetched once into $BERTH_CACHE/debian-trixie (keyed by their version) and reused
# offline afterwards; the package index is refreshed only when a package is not cached yet.
# Progress goes to stderr; `extract` prints only the directory on stdout.
set -euo pipefail

CACHE=${BERTH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/berth}
MIRROR=${BERTH_DEBIAN_MIRROR:-http://deb.debian.org/debian}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
dir=$CACHE/debian-trixie
PLUGIN_DIR=${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins
BIN_DIR=${BERTH_BIN_DIR:-$HOME/.local/bin}

log() { echo "docker-tools: $*" >&2; }
die() { echo "docker-tools: error: $*" >&2; exit 1; }

apt_opts() {
  printf '%s\n' -o "Dir::Etc::SourceList=$dir/sources.list" -o Dir::Etc::SourceParts=/dev/null \
    -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/apt-cache" -o Debug::NoLocking=1
  # apt's download sandbox user cannot write into a private cache under root's home.
  [ "$(id -u)" != 0 ] || printf '%s\n' -o APT::Sandbox::User=root
}

# Refreshes the private trixie index (a few seconds, 15 MB).
update_index() {
  command -v apt-get >/dev/null || die "apt-get is missing: these tools come from Debian's packages"
  [ -f "$KEYRING" ] || die "$KEYRING is missing: apt-get install debian-archive-keyring"
  mkdir -p "$dir/lists/partial" "$dir/apt-cache/archives/partial"
  echo "deb [signed-by=$KEYRING] $MIRROR trixie main" > "$dir/sources.list"
  log "reading Debian trixie's package index from $MIRROR"
  mapfile -t opts < <(apt_opts)
  apt-get -q "${opts[@]}" update >&2 || die "cannot read trixie's package index from $MIRROR"
}

# The trixie version of package $1 (from the private index).
candidate() {
  mapfile -t opts < <(apt_opts)
  apt-cache "${opts[@]}" policy "$1" 2>/dev/null | awk '/Candidate:/ { print $2 }'
}

# Unpacks package $1 (downloading it when not cached) and prints its directory.
extract() {
  local pkg=$1 have
  # The newest unpacked version in the cache serves without the network.
  have=$(ls -d "$dir/pkg/$pkg"_* 2>/dev/null | sort -V | tail -1 || true)
  if [ -n "$have" ] && [ -f "$have/.complete" ]; then
    echo "$have"
    return
  fi
  # An index older than a day may name versions the mirror no longer has.
  if [ -z "$(find "$dir/lists/.fresh" -mmin -1440 2>/dev/null)" ]; then
    update_index
    touch "$dir/lists/.fresh"
  fi
  local version
  version=$(candidate "$pkg")
  [ -n "$version" ] && [ "$version" != "(none)" ] || die "trixie has no package $pkg"
  local out=$dir/pkg/${pkg}_$version
  local tmp=$out.tmp.$$
  rm -rf "$tmp" && mkdir -p "$tmp"
  log "downloading $pkg $version"
  mapfile -t opts < <(apt_opts)
  (cd "$tmp" && apt-get -q "${opts[@]}" download "$pkg=$version" >&2) || die "cannot download $pkg $version"
  dpkg-deb -x "$tmp"/*.deb "$tmp/root" || die "cannot unpack $pkg $version"
  rm -f "$tmp"/*.deb
  echo "$version" > "$tmp/.complete"
  rm -rf "$out" && mv "$tmp" "$out"
  echo "$out"
}

# Installs file $1 as $2 unless the same file is there already (atomic: a running docker never
# sees half a plugin).
install_file() {
  local src=$1 dst=$2
  cmp -s "$src" "$dst" 2>/dev/null && return
  mkdir -p "$(dirname "$dst")"
  install -m 0755 "$src" "$dst.tmp.$$"
  mv -f "$dst.tmp.$$" "$dst"
  log "installed $dst"
}

# Where `install` ran for root while the tools are for another user (sudo): hand the files over.
own() {
  if [ "$(id -u)" = 0 ] && [ -n "${SUDO_UID:-}" ]; then
    chown -R "$SUDO_UID:${SUDO_GID:-$SUDO_UID}" "$@"
  fi
}

cmd=${1:-}
case "$cmd" in
  install)
    compose=$(extract docker-compose)
    buildx=$(extract docker-buildx)
    install_file "$compose/root/usr/libexec/docker/cli-plugins/docker-compose" "$PLUGIN_DIR/docker-compose"
    install_file "$buildx/root/usr/libexec/docker/cli-plugins/docker-buildx" "$PLUGIN_DIR/docker-buildx"
    own "$PLUGIN_DIR"
    if ! command -v docker >/dev/null; then
      cli=$(extract docker-cli)
      install_file "$cli/root/usr/bin/docker" "$BIN_DIR/docker"
      own "$BIN_DIR/docker"
      case ":$PATH:" in
        *":$BIN_DIR:"*) ;;
        *) log "$BIN_DIR is not on PATH: add it (export PATH=\"$BIN_DIR:\$PATH\") to run docker" ;;
      esac
    fi
    docker=$(command -v docker || echo "$BIN_DIR/docker")
    "$docker" compose version >/dev/null || die "docker compose does not run after installing it in $PLUGIN_DIR"
    "$docker" buildx version >/dev/null || die "docker buildx does not run after installing it in $PLUGIN_DIR"
    log "docker $("$docker" version --format '{{.Client.Version}}' 2>/dev/null), compose $("$docker" compose version --short), buildx $("$docker" buildx version | awk '{ print $2 }')"
    ;;
  extract)
    [ $# -eq 2 ] || die "usage: $0 extract PACKAGE"
    extract "$2"
    ;;
  versions)
    for pkg in docker-compose docker-buildx docker-cli; do
      d=$(extract "$pkg")
      echo "$pkg $(cat "$d/.complete")"
    done
    ;;
  *)
    echo "usage: $0 install | extract PACKAGE | versions" >&2
    exit 2
    ;;
esac
