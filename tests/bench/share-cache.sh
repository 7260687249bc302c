#!/usr/bin/env bash
# The shares' cache modes against each other (by hand, not in CI: three `berth start`s): for
# each of auto (the default), always and never (BERTH_SHARE_CACHE), the npm-like tree of
# fs-bench in a container on a share, a warm re-read of the same tree (what a second build or
# test run does), and whether a host edit is seen by the next read in the container. Prints each
# mode's seconds and its ratio to auto. Runs on the VM host: directly with hardware KVM, else
# inside the nested rig.
#
#   tests/bench/share-cache.sh [FILES]    (default 2000)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/bench/bench-env.sh
. "$here/bench-env.sh"
bench_env BERTH_VMM BERTH_KERNEL BERTH_ROOTFS
fs_bench=$(dirname "$BERTH_VMM")/fs-bench
[ -x "$fs_bench" ] || { echo "bench: $fs_bench missing; run tests/setup.sh" >&2; exit 1; }
bench_in_rig --memory 4096 --timeout 2400 --name "share cache benchmark" -- "$here/share-cache.sh" "$@"
files=${1:-2000}

# shellcheck source=tests/e2e/berth-home.sh
. "$here/../e2e/berth-home.sh"
berth_fresh_home berth-bench-cache-home
export DOCKER_HOST=unix://$BERTH_HOME/run/docker.sock
berth config set memory_mib 1536 >/dev/null
berth config set cpus "$(berth_guest_cpus)" >/dev/null
berth config set disk_size_gib 8 >/dev/null
work=$(mktemp -d "${TMPDIR:-/tmp}/berth-bench-cache-XXXXXX")
trap 'status=$?; [ "$status" = 0 ] || { berth_show_logs >&2 || true; }; berth stop >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) printf "n/a"; else printf "%.2f", a / b }'; }
phases() { awk '/^fs-bench: (unpack|stat|read|delete) / { printf "%s ", $3 }'; }
total() { awk '{ s = 0; for (i = 1; i <= NF; i++) s += $i; printf "%.3f", s }'; }

tree=$work/image
mkdir -p "$tree/bin" "$tree/tmp"
cp /bin/busybox "$tree/bin/busybox"
for applet in sh cat sleep; do ln -s busybox "$tree/bin/$applet"; done
cp "$fs_bench" "$tree/bin/"
for lib in $(ldd "$fs_bench" | grep -oE '/[^ ]+'); do cp --parents -nL "$lib" "$tree"; done
img=berth-bench/cache

declare -A tree_s reread_s seen
for mode in auto always never; do
  BERTH_SHARE_CACHE=$mode berth start --timeout 300 --no-docker-context >/dev/null
  tar -C "$tree" -c . | docker import - "$img" >/dev/null
  mkdir -p "$work/$mode"
  out=$(docker run --rm -v "$work/$mode:/w" "$img" fs-bench tree /w "$files")
  grep -q "tree $files files" <<< "$out" || { echo "bench: fs-bench tree failed under $mode: $out" >&2; exit 1; }
  tree_s[$mode]=$(phases <<< "$out" | total)
  # A tree left in place, read twice in one container: the second read is what caching buys.
  mkdir -p "$work/$mode/keep"
  for i in $(seq "$files"); do printf '%05d\n' "$i" > "$work/$mode/keep/f$i"; done
  reread_s[$mode]=$(docker run --rm -v "$work/$mode:/w" "$img" sh -c 'fs-bench read /w/keep && fs-bench read /w/keep' |
    awk '/^fs-bench: read-tree / { t = $3 } END { printf "%.3f", t }')
  # Coherence: a container holds the file open and re-reads it after the host's edit.
  echo before > "$work/$mode/edit.txt"
  docker run -d --name reader -v "$work/$mode:/w" "$img" sh -c \
    'exec 3< /w/edit.txt; cat /w/edit.txt > /dev/null; sleep 3; cat /w/edit.txt > /w/seen.txt; cat <&3 > /w/seen-open.txt' >/dev/null
  sleep 1
  echo after-the-host-edit > "$work/$mode/edit.txt"
  docker wait reader >/dev/null && docker rm reader >/dev/null
  seen[$mode]="next open: $(cat "$work/$mode/seen.txt"), open before: $(cat "$work/$mode/seen-open.txt")"
  berth stop >/dev/null
done
for mode in auto always never; do
  echo "bench: share cache $mode: tree of $files files ${tree_s[$mode]} s ($(ratio "${tree_s[$mode]}" "${tree_s[auto]}")x auto);" \
    "warm re-read ${reread_s[$mode]} s ($(ratio "${reread_s[$mode]}" "${reread_s[auto]}")x auto); host edit 2 s later: ${seen[$mode]}"
done
