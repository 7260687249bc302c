#!/usr/bin/env bash
# End to end on a VM host (this machine with hardware KVM, else the nested rig's test host): the
# unmodified docker CLI drives dockerd in a Berth VM through `berth start` and the host proxy.
# Each check prints `ok NAME` or `FAIL NAME` followed by its output; tests/tests/docker.rs reads
# them. Needs the BERTH_* variables of tests/setup.sh.
set -uo pipefail

# shellcheck source=tests/e2e/berth-home.sh
. "$(dirname "${BASH_SOURCE[0]}")/berth-home.sh"
# shellcheck source=tests/e2e/durability.sh
. "$(dirname "${BASH_SOURCE[0]}")/durability.sh"
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
for applet in sh echo cat sleep tty ls wc sha256sum head dd; do ln -s busybox "$work/rootfs/bin/$applet"; done
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

# Deleted data gives its space back on the host: an image of 48 MiB of random bytes grows the
# data disk's allocation, and removing it shrinks the file again (ext4 mounted with discard,
# virtio-blk DISCARD, a hole punched in data.img).
cat > "$work/allocated-kib" <<'SCRIPT'
#!/bin/sh
# The KiB of the data disk's file that the host's file system has allocated.
echo $(($(stat -c '%b * %B' "$BERTH_HOME/data.img") / 1024))
SCRIPT
chmod +x "$work/allocated-kib"
mkdir -p "$work/blob" && head -c 48M /dev/urandom > "$work/blob/blob"
alloc=$work/allocated-kib
check disk-grows sh -c "before=\$('$alloc') && tar -C '$work/blob' -c blob | docker import - berth-test/blob >/dev/null &&
  berth shell -- sync && after=\$('$alloc') && echo \"data.img allocated \$((before >> 10)) -> \$((after >> 10)) MiB\" &&
  [ \$((after - before)) -ge \$((40 << 10)) ]"
check disk-shrinks sh -c "before=\$('$alloc') && docker image rm berth-test/blob >/dev/null && berth shell -- sync &&
  for i in \$(seq 60); do after=\$('$alloc'); [ \$((before - after)) -ge \$((40 << 10)) ] && break; sleep 1; done;
  echo \"data.img allocated \$((before >> 10)) -> \$((after >> 10)) MiB after docker image rm (\$i s)\"; [ \$((before - after)) -ge \$((40 << 10)) ]"

check status-json berth status --json
check status-json-running sh -c 'berth status --json | jq -e ".state == \"running\" and .guest.protocol_version == .guest.host_protocol_version and .api_version == 1"'
# The balloon's stats queue, the guest's own figures through the VMM (every 5 s).
check balloon-stats sh -c 'for i in $(seq 20); do berth status --json | jq -e ".balloon.stats.free_memory_bytes > 0 and .balloon.stats.total_memory_bytes > 0" >/dev/null && { berth status | grep "^balloon:"; exit 0; }; sleep 1; done; berth status --json | jq .balloon; exit 1'

# berth diagnose of a running VM: every piece there, the guest's among them, and a registry
# credential in the docker config left out.
mkdir -p "$work/diag-docker"
printf '{"auths": {"registry.example": {"auth": "ZTJlOnMzY3JldC1kaWFn"}}}\n' > "$work/diag-docker/config.json"
check diagnose sh -c "out=\$(DOCKER_CONFIG='$work/diag-docker' berth diagnose --output '$work/diag.tar.gz') && [ \"\$out\" = '$work/diag.tar.gz' ] &&
  tar -tzf '$work/diag.tar.gz' > '$work/diag.list' &&
  for f in README.txt logs/console.log logs/host-proxy.log settings/docker-config.json status.json versions.txt \
           docker/version.json docker/info.json guest/dmesg.txt guest/system.txt guest/logs/dockerd.log; do
    grep -qx \"diag/\$f\" '$work/diag.list' || { echo \"missing \$f in:\"; cat '$work/diag.list'; exit 1; }
  done &&
  tar -xzOf '$work/diag.tar.gz' diag/README.txt | tee /dev/stderr | grep -qx 'Everything was collected.' &&
  tar -xzOf '$work/diag.tar.gz' diag/guest/dmesg.txt | grep -q '^\[ *[0-9]' &&
  tar -xzOf '$work/diag.tar.gz' diag/docker/version.json | jq -e '.Version | length > 0' &&
  ! tar -xzOf '$work/diag.tar.gz' | grep -q ZTJlOnMzY3JldC1kaWFn &&
  echo \"\$(grep -c . '$work/diag.list') files, \$(stat -c %s '$work/diag.tar.gz') bytes\""

# The control API, as the tray app and scripts use it: curl on berth.sock.
api=$BERTH_HOME/run/berth.sock
check api-status sh -c "curl -sS --fail-with-body --unix-socket '$api' http://berth/v1/status > '$work/api-status' && cat '$work/api-status' && echo && jq -e '.state == \"running\" and .sockets.docker != null' '$work/api-status'"
check api-not-found sh -c "code=\$(curl -sS -o '$work/api-404' -w '%{http_code}' --unix-socket '$api' http://berth/v2/status); cat '$work/api-404'; echo; [ \"\$code\" = 404 ] && jq -e '.code == \"not_found\"' '$work/api-404'"
check api-bad-body sh -c "code=\$(curl -sS -o '$work/api-400' -w '%{http_code}' --unix-socket '$api' -X POST -d '{\"timeout_secs\": \"soon\"}' http://berth/v1/stop); cat '$work/api-400'; echo; [ \"\$code\" = 400 ] && jq -e '.code == \"bad_request\"' '$work/api-400'"
# The guest's clock follows the host's (host-proxy/src/daemon/clock.rs): set an hour off in the
# guest, and frozen for a minute with the VMM stopped by SIGSTOP; each time, within 10 s (plus
# the berth shell's own time) the guest is within a second of the host.
cat > "$work/clock-follows" <<'SCRIPT'
#!/bin/sh
# clock-follows: waits up to 20 s for the guest's clock to be within 1 s of the host's.
for i in $(seq 20); do
  g=$(berth shell -- date +%s | tr -d '\r'); h=$(date +%s)
  off=$((g - h)); [ "$off" -lt 0 ] && off=$((-off))
  [ "$off" -le 1 ] && { echo "guest within ${off} s of the host after ${i} tries"; exit 0; }
  sleep 1
done
echo "the guest is still ${off} s off the host"; exit 1
SCRIPT
chmod +x "$work/clock-follows"
check clock-set-off sh -c "berth shell -- date -s @\$((\$(date +%s) + 3600)) >/dev/null && echo \"guest set to \$(berth shell -- date -u +%H:%M)\" && '$work/clock-follows'"
check clock-after-sigstop sh -c "pid=\$(berth status --json | jq -r .vmm_pid) && kill -STOP \"\$pid\" && sleep 60 && kill -CONT \"\$pid\" && '$work/clock-follows'"

# Crash recovery (host-proxy/src/daemon/recovery.rs): a guest kernel panic, then a VMM killed
# with SIGKILL; each time the host proxy starts the VM again on its own, its status says so,
# the Docker socket answers meanwhile (503, or 200 once back; never a hang), and a container
# with --restart=always runs again.
cat > "$work/recovered" <<'SCRIPT'
#!/bin/sh
# recovered WHAT: waits for the state "restarting after a crash (WHAT...", asks the Docker socket
# once, then waits for the VM to run again with the container back.
status() { berth status --json 2>/dev/null | jq -r '"\(.state) \(.reason)"'; }
for i in $(seq 120); do
  now=$(status); case $now in *"restarting after a crash ($1"*) break ;; esac; sleep 0.5
done
echo "status: $now"
case $now in *"restarting after a crash ($1"*) ;; *) exit 1 ;; esac
code=$(curl -sS -o "$BERTH_E2E_WORK/ping" -w '%{http_code}' --max-time 20 --unix-socket "$BERTH_HOME/run/docker.sock" http://docker/_ping) || { echo "the Docker socket hung or failed: $code"; exit 1; }
echo "docker socket meanwhile: $code $(cat "$BERTH_E2E_WORK/ping")"
[ "$code" = 200 ] || { [ "$code" = 503 ] && jq -e '.message | length > 0' "$BERTH_E2E_WORK/ping" >/dev/null; } || exit 1
for i in $(seq 300); do
  [ "$(berth status --json | jq -r .state)" = running ] && break
  sleep 1
done
# dockerd starts --restart=always containers as it comes up.
for i in $(seq 60); do
  [ "$(docker inspect -f '{{.State.Running}}' berth-always 2>/dev/null)" = true ] && break
  sleep 1
done
echo "back: $(status), berth-always running $(docker inspect -f '{{.State.Running}} restarts {{.RestartCount}}' berth-always)"
[ "$(docker inspect -f '{{.State.Running}}' berth-always)" = true ]
SCRIPT
chmod +x "$work/recovered"
export BERTH_E2E_WORK=$work
check restart-always docker run -d --name berth-always --restart=always berth-test/busybox sleep 100000
# The container the durability rounds write from (tests/e2e/durability.sh), made now so that it
# too is on the disk before the first crash.
check durability-writer durability_prepare
# dockerd does not fsync its record of the container: the guest writes dirty data back within
# ~4 s (datadisk.rs, shorten_writeback; the kernel's default is 30 s) and ext4 commits its journal
# every 5 s, so after 15 s it is on the disk and survives the panic.
check writeback-window sh -c "out=\$(berth shell -- cat /proc/sys/vm/dirty_expire_centisecs /proc/sys/vm/dirty_writeback_centisecs | tr -d '\r' | tr '\n' ' '); echo \"\$out\"; [ \"\$out\" = '300 100 ' ]"
sleep 15
check crash-panic sh -c "berth shell -- sh -c 'echo c > /proc/sysrq-trigger' >/dev/null 2>&1; '$work/recovered' 'the guest kernel panicked'"
# The proxy's log now holds the panic this script asked for: the guest-reset check at the end
# looks only after it.
berth_expected_resets=$(wc -l < "$BERTH_HOME/logs/host-proxy.log")
# Then the VMM killed with SIGKILL while a container writes fsync'd records to a volume, three
# times (tests/e2e/durability.sh): each record whose fsync returned survives, none is torn.
for round in 1 2 3; do
  check "crash-kill-vmm-$round" durability_round "$round" "$work/recovered" 'the VMM was killed by signal 9'
done
check crash-status sh -c "berth status | tee /dev/stderr | head -n 1 | grep -q 'running'"
# A second client follows the event stream: a real guest event (dockerd killed, restarted by
# the agent's supervisor), then the CLI stopping the VM.
curl -sSN --unix-socket "$api" http://berth/v1/events > "$work/events" 2> "$work/events.err" &
events_pid=$!
sleep 1
check kill-dockerd berth shell -- sh -c 'n=0; for p in /proc/[0-9]*; do if [ "$(cat "$p/comm" 2>/dev/null)" = dockerd ]; then kill -9 "${p#/proc/}" && echo "killed dockerd ${p#/proc/}" && n=$((n + 1)); fi; done; [ "$n" -gt 0 ]'
check dockerd-back sh -c "for i in \$(seq 120); do grep -q '\"daemon_ready\"' '$work/events' && grep -q '\"daemon_exited\"' '$work/events' && docker version >/dev/null 2>&1 && exit 0; sleep 1; done; cat '$work/events'; exit 1"
check final-stop berth stop
# Four crashes later, the stopped VM's data disk is clean.
check data-disk-fsck durability_fsck
sleep 1
kill "$events_pid" 2>/dev/null
wait "$events_pid" 2>/dev/null
check events-followed-the-stop sh -c "cat '$work/events' '$work/events.err'; [ ! -s '$work/events.err' ] && jq -r 'if .type == \"state\" then .state else .event.event end' '$work/events' | tr '\n' ' ' | grep -q 'running daemon_exited .*daemon_ready stopping stopped'"
check stop-again berth stop
rm -rf "$work"
# tests/tests/docker.rs repeats a run in which the guest reset itself (see berth-home.sh).
BERTH_RESETS_AFTER_LINE=${berth_expected_resets:-0} berth_report_guest_reset e2e
# A failed step explains itself: what the VM, the host proxy and dockerd said.
if [ "$failed" = 1 ]; then
  berth_show_logs
fi
exit "$failed"
