#!/usr/bin/env bash
# End to end on a VM host (this machine with hardware KVM, else the nested rig's test host): the
# unmodified docker CLI drives dockerd in a Berth VM through `berth start` and the host proxy.
# Each check prints `ok NAME` or `FAIL NAME` followed by its output; tests/tests/docker.rs reads
# them. Needs the BERTH_* variables of tests/setup.sh.
set -uo pipefail

# shellcheck source=tests/e2e/berth-home.sh
. "$(dirname "${BASH_SOURCE[0]}")/berth-home.sh"
berth_fresh_home berth-e2e-home
work=$(mktemp -d)


check config berth config set cpus "$(berth_guest_cpus)"
berth config set memory_mib 1024 >/dev/null
berth config set disk_size_gib 8 >/dev/null
check start berth start --timeout 300 --no-docker-context || {
  berth_show_logs
  exit 1
}
check start-again berth start
export DOCKER_HOST=unix://$BERTH_HOME/run/docker.sock

check version docker version --format 'server {{.Server.Version}} os {{.Server.Os}}'
check info docker info --format 'kernel {{.KernelVersion}} driver {{.Driver}} cgroup {{.CgroupVersion}}'

# An image made offline from Debian's busybox-static: no registry is reachable.
mkdir -p "$work/rootfs/bin" "$work/rootfs/tmp"
check busybox cp /bin/busybox "$work/rootfs/bin/busybox" || exit 1
for applet in sh echo cat sleep tty ls wc sha256sum head; do ln -s busybox "$work/rootfs/bin/$applet"; done
check import sh -c "tar -C '$work/rootfs' -c . | docker import - berth-test/busybox:latest"

check run-rm docker run --rm berth-test/busybox echo hello-from-a-container
id=$(docker run -d berth-test/busybox sh -c 'i=0; while :; do echo tick $i; i=$((i+1)); sleep 1; done')
check run-d test -n "$id"
check ps sh -c "docker ps --no-trunc --format '{{.ID}}' | grep -x '$id'"
sleep 3
check logs sh -c "docker logs '$id' | grep 'tick 1'"
check exec docker exec "$id" sh -c 'echo exec-answer $((6 * 7))'
check stop docker stop -t 1 "$id"
check rm docker rm "$id"
check gone sh -c "! docker ps -a --format '{{.ID}}' | grep -q '${id:0:12}'"

# -it through a real pseudo-terminal: `script` gives docker a tty on the host side.
check run-it script -qec "docker run -it --rm berth-test/busybox sh -c 'tty; echo tty-answer \$((2 + 3))'" /dev/null

# berth shell: stdout and stderr apart, the command's exit status; a pty when run on one.
check shell-status sh -c 'out=$(berth shell -- sh -c "echo to-stdout; echo to-stderr >&2; exit 3" 2>/dev/null); echo "status $? stdout [$out]"'
check shell-missing sh -c 'berth shell -- /nonexistent/berth-tool; echo "status $?"'
check shell-tty script -qec "berth shell -- sh -c 'tty; echo shell-tty-answer \$((4 + 4))'" /dev/null

# docker build of a Dockerfile FROM scratch.
mkdir -p "$work/build"
cp /bin/busybox "$work/build/busybox"
cat > "$work/build/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY busybox /bin/busybox
CMD ["/bin/busybox", "echo", "built-from-scratch"]
DOCKERFILE
check build docker build -q -t berth-test/scratch "$work/build"
check run-built docker run --rm berth-test/scratch

check status-json berth status --json
check status-json-running sh -c 'berth status --json | jq -e ".state == \"running\" and .guest.protocol_version == .guest.host_protocol_version and .api_version == 1"'

# The control API, as the tray app and scripts use it: curl on berth.sock.
api=$BERTH_HOME/run/berth.sock
check api-status sh -c "curl -sS --fail-with-body --unix-socket '$api' http://berth/v1/status > '$work/api-status' && cat '$work/api-status' && echo && jq -e '.state == \"running\" and .sockets.docker != null' '$work/api-status'"
check api-not-found sh -c "code=\$(curl -sS -o '$work/api-404' -w '%{http_code}' --unix-socket '$api' http://berth/v2/status); cat '$work/api-404'; echo; [ \"\$code\" = 404 ] && jq -e '.code == \"not_found\"' '$work/api-404'"
check api-bad-body sh -c "code=\$(curl -sS -o '$work/api-400' -w '%{http_code}' --unix-socket '$api' -X POST -d '{\"timeout_secs\": \"soon\"}' http://berth/v1/stop); cat '$work/api-400'; echo; [ \"\$code\" = 400 ] && jq -e '.code == \"bad_request\"' '$work/api-400'"
# A second client follows the event stream: a real guest event (dockerd killed, restarted by
# the agent's supervisor), then the CLI stopping the VM.
curl -sSN --unix-socket "$api" http://berth/v1/events > "$work/events" 2> "$work/events.err" &
events_pid=$!
sleep 1
check kill-dockerd berth shell -- sh -c 'n=0; for p in /proc/[0-9]*; do if [ "$(cat "$p/comm" 2>/dev/null)" = dockerd ]; then kill -9 "${p#/proc/}" && echo "killed dockerd ${p#/proc/}" && n=$((n + 1)); fi; done; [ "$n" -gt 0 ]'
check dockerd-back sh -c "for i in \$(seq 120); do grep -q '\"daemon_ready\"' '$work/events' && grep -q '\"daemon_exited\"' '$work/events' && docker version >/dev/null 2>&1 && exit 0; sleep 1; done; cat '$work/events'; exit 1"
check final-stop berth stop
sleep 1
kill "$events_pid" 2>/dev/null
wait "$events_pid" 2>/dev/null
check events-followed-the-stop sh -c "cat '$work/events' '$work/events.err'; [ ! -s '$work/events.err' ] && jq -r 'if .type == \"state\" then .state else .event.event end' '$work/events' | tr '\n' ' ' | grep -q 'running daemon_exited .*daemon_ready stopping stopped'"
check stop-again berth stop
rm -rf "$work"
# tests/tests/docker.rs repeats a run in which the guest reset itself (see berth-home.sh).
berth_report_guest_reset e2e
# A failed step explains itself: what the VM, the host proxy and dockerd said.
if [ "$failed" = 1 ]; then
  berth_show_logs
fi
exit "$failed"
