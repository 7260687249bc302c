#!/usr/bin/env bash
# The main job, as a user would do it (run by tests/run-main.sh on the VM host): berth start, a
# web server in a container serving a folder of the user's, published on port 8080; curl it from
# the host, edit the file on the host, curl again; berth stop. Needs the BERTH_* variables of
# tests/setup.sh.
set -euo pipefail

# shellcheck source=tests/e2e/berth-home.sh
. "$(dirname "${BASH_SOURCE[0]}")/berth-home.sh"
berth_fresh_home berth-main-home
site=$(mktemp -d "${TMPDIR:-/tmp}/berth-site-XXXXXX")
trap 'berth stop >/dev/null 2>&1; rm -rf "$site"' EXIT
step() { echo; echo "main: \$ $*"; "$@"; }

berth config set cpus "$(berth_guest_cpus)" >/dev/null
berth config set memory_mib 1024 >/dev/null
berth config set disk_size_gib 8 >/dev/null
step berth start --timeout 300 --no-docker-context || { berth_show_logs; exit 1; }
export DOCKER_HOST=unix://$BERTH_HOME/run/docker.sock

# No registry is reachable: the image is Debian's busybox-static, imported.
mkdir -p "$site/image/bin" "$site/image/www"
cp /bin/busybox "$site/image/bin/busybox"
ln -s busybox "$site/image/bin/httpd"
tar -C "$site/image" -c . | docker import - berth-main/httpd >/dev/null

echo "hello from $site on the host" > "$site/index.html"
step docker run -d --name web -p 8080:80 -v "$site:/www" berth-main/httpd httpd -f -p 80 -h /www
step curl -sS --max-time 20 http://localhost:8080/
echo "edited on the host at $(date +%T)" > "$site/index.html"
step curl -sS --max-time 20 http://localhost:8080/
step berth status
step berth stop
echo
echo "main: done: a container served $site through a published port, and saw the host's edit"
