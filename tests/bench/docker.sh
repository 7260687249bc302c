#!/usr/bin/env bash
# Docker benchmarks, each figure beside a baseline measured in the same run (no pass/fail on the
# figures; the script fails only when what it measures stops working, and then shows the logs):
#   - `berth start` to docker-ready: the first start (blank data disk: mkfs, dockerd's first
#     init), then with the VM host's page cache dropped (cold), then again (warm) with where its
#     time goes; the same with the previous guest image (BERTH_ROOTFS_BASELINE) and both sizes;
#   - `docker run --rm IMAGE true`: through the host proxy, and the docker CLI inside the guest;
#   - API socket throughput: `docker save` of a ~64 MiB image (BERTH_BENCH_SAVE_MIB) through the
#     proxy, and inside the guest;
#   - host memory (RSS) of all Berth processes once idle, while a container holds 512 MiB, 60 s
#     after it exited and after the agent's idle reclaim, each beside the memory the guest itself
#     says it uses; the VMM's own memory outside guest RAM beside Firecracker's 5 MiB; the first
#     `docker run` after the idle reclaim beside the median before it.
#   - `docker build` of a multi-stage Dockerfile, cold and warm: through the proxy, and with the
#     docker CLI (and the same buildx) inside the guest (in the rig only with BERTH_BENCH_BUILD=1).
# Runs on the VM host: directly with hardware KVM, else inside the nested rig.
#
#   tests/bench/docker.sh [RUNS]      (default 5; runs of `docker run`)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
runs=${1:-5}
# shellcheck source=tests/bench/bench-env.sh
. "$here/bench-env.sh"
bench_env BERTH_VMM BERTH_KERNEL BERTH_ROOTFS
bench_in_rig --timeout 900 -- "$here/docker.sh" "$@"

# shellcheck source=tests/e2e/berth-home.sh
. "$here/../e2e/berth-home.sh"
berth_fresh_home berth-bench-home
export DOCKER_HOST=unix://$BERTH_HOME/run/docker.sock
memory_mib=1024
cpus=$(berth_guest_cpus)
# The VM every measurement uses, in whichever home BERTH_CONFIG names.
configure_vm() {
  berth config set memory_mib $memory_mib >/dev/null
  berth config set cpus "$cpus" >/dev/null
  berth config set disk_size_gib 8 >/dev/null
  # Longer than section 5's 60 s wait after its container, so that figure comes before the reclaim.
  berth config set cmdline_extra "berth.idle_reclaim=90" >/dev/null
}
configure_vm
work=$(mktemp -d)
# On a failure, what the VM, the proxy and dockerd said, so a broken run explains itself.
diagnose() {
  echo "bench: FAILED (status $1); the logs:" >&2
  berth_show_logs >&2 || true
  # tests/run-tests.sh runs the benchmark once more after this line (see berth-home.sh).
  berth_report_guest_reset bench || true
}
trap 'status=$?; [ "$status" = 0 ] || diagnose "$status"; berth stop >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

ms() { date +%s%3N; }
median() { sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : int((a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
# Milliseconds from `berth start` until it returns, i.e. until dockerd answers /_ping.
start_ms() {
  local t0
  t0=$(ms)
  # `|| return`: a command substitution does not inherit `set -e`, and a failed start must not
  # pass for a fast one (a cold start once "took" 6.8 s: passt had not come up in time).
  berth start --timeout 300 --no-docker-context >/dev/null || return 1
  echo $(($(ms) - t0))
}
# start_breakdown LABEL: a warm `berth start` with where its time goes, from the host's view
# (the VMM process appearing, `berth start` returning once dockerd answers through the proxy)
# and the guest's uptimes on the console (agent start, data disk mounted, containerd and dockerd
# answering: dockerd's supervisor finding containerd's socket, then dockerd's /_ping). The
# kernel's entry is put at the agent's console line minus the agent's uptime.
# Prints one line; sets breakdown_total (ms).
start_breakdown() {
  local label=$1 log=$BERTH_HOME/logs/console.log t0 pid vmm_at="" agent_seen="" now
  rm -f "$log"
  t0=$(ms)
  berth start --timeout 300 --no-docker-context >/dev/null &
  pid=$!
  # Until both marks are seen; then only the wait, so the polling does not slow what it times.
  while { [ -z "$vmm_at" ] || [ -z "$agent_seen" ]; } && kill -0 "$pid" 2>/dev/null; do
    now=$(ms)
    [ -n "$vmm_at" ] || { pgrep -x berth-vmm >/dev/null && vmm_at=$now; }
    [ -n "$agent_seen" ] || { grep -aq 'berth-agent: starting' "$log" 2>/dev/null && agent_seen=$now; }
    sleep 0.02
  done
  wait "$pid" || { echo "bench: berth start ($label) failed" >&2; return 1; }
  local api_at
  api_at=$(ms)
  uptime_ms() { grep -aoE "$1 uptime=[0-9.]+s" "$log" | tail -n 1 | grep -oE '[0-9.]+s$' | tr -d s | awk '{ printf "%d", $1 * 1000 }'; }
  local agent data containerd dockerd kernel_at
  agent=$(uptime_ms 'berth-agent: starting v[^ ]*')
  data=$(uptime_ms 'berth-agent: ready')
  containerd=$(uptime_ms 'dockerd found [^ ]*containerd.sock')
  dockerd=$(uptime_ms 'dockerd ready')
  for v in vmm_at agent_seen agent data containerd dockerd; do
    [ -n "${!v}" ] || { echo "bench: berth start ($label): no '$v' mark (console: $log)" >&2; return 1; }
  done
  kernel_at=$((agent_seen - agent))
  breakdown_total=$((api_at - t0))
  echo "bench: berth start to docker-ready ($label): ${breakdown_total} ms = berth start → VMM running $((vmm_at - t0))" \
    "→ kernel entry $((kernel_at - vmm_at)) → agent start ${agent} → data disk mounted $((data - agent))" \
    "→ containerd ready $((containerd - data)) → dockerd ready $((dockerd - containerd))" \
    "→ first API answer through the proxy $((api_at - kernel_at - dockerd)) (ms each; dockerd's ready mark is the agent's /_ping, whose polling interval is in it)"
}
drop_page_cache() {
  sync
  echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || { echo "bench: cannot drop the page cache (needs root)" >&2; return 1; }
}
where="directly on hardware KVM"
[ "${BERTH_IN_RIG:-0}" = 1 ] && where="in the nested rig (the VM host is the emulated test host: absolute figures are far above hardware, ratios matter)"
echo "bench: docker benchmarks, $where; guest ${memory_mib} MiB, $cpus vCPU(s)"

# 1. The previous guest image first (bookworm, dockerd 20.10), in a home of its own: its first
# start (which formats the data disk), then a warm start with the breakdown.
if [ -n "${BERTH_ROOTFS_BASELINE:-}" ]; then
  current=(BERTH_HOME="$BERTH_HOME" BERTH_CONFIG="$BERTH_CONFIG" BERTH_ROOTFS="$BERTH_ROOTFS" DOCKER_HOST="$DOCKER_HOST")
  baseline_home=$BERTH_HOME-bookworm
  export BERTH_HOME=$baseline_home BERTH_CONFIG=$baseline_home/config.toml BERTH_ROOTFS=$BERTH_ROOTFS_BASELINE
  export DOCKER_HOST=unix://$baseline_home/run/docker.sock
  rm -rf "$BERTH_HOME" && mkdir -p "$BERTH_HOME"
  configure_vm
  base_first=$(start_ms)
  berth stop >/dev/null
  start_breakdown "warm, baseline $(basename "$BERTH_ROOTFS")"
  bookworm_start=$breakdown_total
  base_version=$(docker version --format '{{.Server.Version}}')
  berth stop >/dev/null
  rm -rf "$BERTH_HOME"
  export "${current[@]}"
else
  echo "bench: no baseline image (bookworm, dockerd 20.10): BERTH_BENCH_BASELINE=1 tests/setup.sh builds it, then this benchmark compares"
fi

# 2. The current image: first start (blank data disk), cold page cache, warm with the breakdown.
first=$(start_ms)
berth stop >/dev/null
drop_page_cache
cold=$(start_ms)
berth stop >/dev/null
start_breakdown "warm, $(basename "$BERTH_ROOTFS")"
warm=$breakdown_total
echo "bench: berth start to docker-ready: first start (blank data disk) ${first} ms; cold page cache ${cold} ms; warm ${warm} ms; cold/warm $(ratio "$cold" "$warm")"
if [ -n "${BERTH_ROOTFS_BASELINE:-}" ]; then
  size() { du -m --apparent-size "$1" | cut -f1; }
  used() { debugfs -R stats "$1" 2>/dev/null | awk -F: '/^Block count/ { c = $2 } /^Free blocks/ { f = $2 } /^Block size/ { b = $2 } END { printf "%d", (c - f) * b / 1048576 }'; }
  echo "bench: guest image: $(docker version --format '{{.Server.Version}}') $(size "$BERTH_ROOTFS") MiB image, $(used "$BERTH_ROOTFS") MiB used;" \
    "baseline $base_version $(size "$BERTH_ROOTFS_BASELINE") MiB image, $(used "$BERTH_ROOTFS_BASELINE") MiB used;" \
    "first start current/baseline $(ratio "$first" "$base_first"); warm start current/baseline $(ratio "$warm" "$bookworm_start")"
fi

# An image made offline, and a large one (incompressible) for `docker save`.
mkdir -p "$work/rootfs/bin"
cp /bin/busybox "$work/rootfs/bin/busybox"
for applet in sh true cat wc test head touch sleep; do ln -s busybox "$work/rootfs/bin/$applet"; done
tar -C "$work/rootfs" -c . | docker import - bench/busybox >/dev/null
head -c $((${BERTH_BENCH_SAVE_MIB:-64} << 20)) /dev/urandom > "$work/rootfs/blob"
tar -C "$work/rootfs" -c . | docker import - bench/large >/dev/null
rm -f "$work/rootfs/blob"

# 3. docker run --rm true, through the proxy and with the docker CLI inside the guest.
docker run --rm bench/busybox true # warm-up: the first run loads what later runs find cached
proxy_runs=$(for _ in $(seq "$runs"); do t0=$(ms); docker run --rm bench/busybox true || exit 1; echo $(($(ms) - t0)); done)
# `berth shell` has no exit status: the guest prints a number per successful run, and all of
# them must be there.
guest_runs=$(berth shell -- sh -c "for i in \$(seq $runs); do t0=\$(date +%s%3N); docker run --rm bench/busybox true && echo \$((\$(date +%s%3N) - t0)); done" | tr -d '\r' | grep -E '^[0-9]+$' || true)
[ "$(printf '%s\n' "$guest_runs" | grep -c .)" = "$runs" ] || { echo "bench: docker run inside the guest failed: got '$guest_runs'" >&2; exit 1; }
proxy_run=$(printf '%s\n' "$proxy_runs" | median)
guest_run=$(printf '%s\n' "$guest_runs" | median)
echo "bench: docker run --rm true, median of $runs: through the proxy ${proxy_run} ms, docker CLI inside the guest ${guest_run} ms, proxy/guest $(ratio "$proxy_run" "$guest_run")" \
  "(each: proxy $(echo $proxy_runs), guest $(echo $guest_runs))"

# 4. docker save throughput: through the proxy, and inside the guest.
t0=$(ms); bytes=$(docker save bench/large | wc -c); proxy_save=$(($(ms) - t0))
guest_out=$(berth shell -- sh -c 't0=$(date +%s%3N); n=$(docker save bench/large | wc -c) && echo "saved $n $(($(date +%s%3N) - t0))"' | tr -d '\r')
read -r _ guest_bytes guest_save <<< "$(printf '%s\n' "$guest_out" | grep '^saved ' | tail -n 1)"
[ "${guest_bytes:-0}" = "$bytes" ] || { echo "bench: docker save inside the guest gave ${guest_bytes:-nothing} bytes, through the proxy $bytes: '$guest_out'" >&2; exit 1; }
mibps() { awk -v b="$bytes" -v t="$1" 'BEGIN { printf "%.1f", b / 1048576 / (t / 1000) }'; }
echo "bench: docker save of $((bytes >> 20)) MiB: through the proxy $(mibps "$proxy_save") MiB/s (${proxy_save} ms), inside the guest $(mibps "$guest_save") MiB/s (${guest_save} ms), proxy/guest throughput $(ratio "$guest_save" "$proxy_save")"

# 5. Host memory once idle, beside what the guest says it uses; then while a container holds
# 512 MiB, and 60 s after it exited (free page reporting gives the freed pages back); then after
# the agent's idle reclaim of the page cache (berth.idle_reclaim, 90 s idle here), with the first
# `docker run` after it beside the median of section 3.
rss() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
vmm_kib=0 proxy_kib=0 total_kib=0 guest_used_kib=0
# measure: the RSS of every berth-vmm and berth-host-proxy, and the guest's MemTotal - MemAvailable.
measure() {
  local pid
  vmm_kib=0 proxy_kib=0
  for pid in $(pgrep -x berth-vmm || true); do vmm_kib=$((vmm_kib + $(rss "$pid"))); done
  for pid in $(pgrep -x berth-host-prox || true); do proxy_kib=$((proxy_kib + $(rss "$pid"))); done
  [ "$vmm_kib" -gt 0 ] && [ "$proxy_kib" -gt 0 ] || { echo "bench: no running berth-vmm or berth-host-proxy to measure" >&2; exit 1; }
  guest_used_kib=$(berth status --json | awk -F: '/"mem_total_kib"/ { t = $2 + 0 } /"mem_available_kib"/ { a = $2 + 0 } END { print t - a }')
  [ "${guest_used_kib:-0}" -gt 0 ] || { echo "bench: the guest's memory figures are missing from berth status --json" >&2; exit 1; }
  total_kib=$((vmm_kib + proxy_kib))
}
sleep 10
measure
idle_kib=$total_kib
echo "bench: host RSS of Berth once idle: $((total_kib >> 10)) MiB (berth-vmm $((vmm_kib >> 10)) MiB, berth-host-proxy $((proxy_kib >> 10)) MiB);" \
  "the guest uses $((guest_used_kib >> 10)) MiB of its ${memory_mib} MiB (MemTotal - MemAvailable); host RSS/guest used $(ratio "$total_kib" "$guest_used_kib")"
docker run -d --name bench-hold --tmpfs /m:size=600m bench/busybox sh -c 'head -c 536870912 /dev/zero > /m/x && touch /m/done && sleep 3600' >/dev/null
for _ in $(seq 120); do docker exec bench-hold test -e /m/done 2>/dev/null && break; sleep 1; done
docker exec bench-hold test -e /m/done || { echo "bench: the container did not fill 512 MiB within 120 s" >&2; exit 1; }
measure
echo "bench: host RSS while a container holds 512 MiB: $((total_kib >> 10)) MiB; the guest uses $((guest_used_kib >> 10)) MiB; host RSS/guest used $(ratio "$total_kib" "$guest_used_kib")"
docker rm -f bench-hold >/dev/null
sleep 60
measure
echo "bench: host RSS 60 s after it exited: $((total_kib >> 10)) MiB, idle before it $((idle_kib >> 10)) MiB, $(((total_kib - idle_kib) >> 10)) MiB above;" \
  "the guest uses $((guest_used_kib >> 10)) MiB; host RSS/guest used $(ratio "$total_kib" "$guest_used_kib")"
# guest_cpu: the guest's busy and total CPU ticks (the first line of /proc/stat), as "BUSY TOTAL".
guest_cpu() {
  berth shell -- cat /proc/stat | awk '/^cpu / { t = 0; for (i = 2; i <= 9; i++) t += $i; print t - $5 - $6, t; exit }'
}
cpu_before=$(guest_cpu)
reclaimed=
for _ in $(seq 150); do
  reclaimed=$(grep -aE "berth-agent: idle for [0-9]+ s: " "$BERTH_HOME/logs/console.log" | tail -n 1 || true)
  [ -n "$reclaimed" ] && break
  sleep 2
done
if [ -z "$reclaimed" ]; then
  # The agent's idle threshold is 10% of the CPUs' time (guest-agent/src/reclaim.rs); under the
  # rig's emulation an idle guest can sit near it. Said, with the figure, not failed: the
  # reclaim is a saving, not a function that broke.
  cpu_after=$(guest_cpu)
  busy=$(awk -v a="$cpu_before" -v b="$cpu_after" 'BEGIN { split(a, x, " "); split(b, y, " "); t = y[2] - x[2]; printf "%.1f", (t > 0 ? 100 * (y[1] - x[1]) / t : 0) }')
  echo "bench: the agent's idle pass (reclaim, compaction) did not come within 300 s: the guest's CPUs were ${busy}% busy meanwhile (idle is under 10%); no after-reclaim figures this run"
else
  sleep 10 # free page reporting waits ~2 s before it reports what was freed
  measure
  t0=$(ms); docker run --rm bench/busybox true; after_reclaim_run=$(($(ms) - t0))
  echo "bench: after the idle reclaim (${reclaimed#*berth-agent: }): host RSS $((total_kib >> 10)) MiB, idle before it $((idle_kib >> 10)) MiB;" \
    "the guest uses $((guest_used_kib >> 10)) MiB; host RSS/guest used $(ratio "$total_kib" "$guest_used_kib")"
  echo "bench: docker run --rm true right after the idle reclaim ${after_reclaim_run} ms, median before it ${proxy_run} ms, after/before $(ratio "$after_reclaim_run" "$proxy_run")"
fi
# The VMM's own memory, Firecracker's way: Rss of every mapping in smaps but guest RAM (the
# anonymous mappings at least as large as the guest's RAM below the 3 GiB MMIO gap, or above
# it: the kernel may merge a neighbouring anonymous mapping into the guest's, as in the rig).
vmm_pid=$(pgrep -x berth-vmm | head -n 1)
low_kib=$(( (memory_mib < 3072 ? memory_mib : 3072) << 10 )) high_kib=$(( (memory_mib > 3072 ? memory_mib - 3072 : 0) << 10 ))
own_kib=0 ram=0
while read -r first second _ _ _ path; do
  case $first in
    Rss:) [ "$ram" = 1 ] || own_kib=$((own_kib + second)) ;;
    *-*) [ -n "${first##*[!0-9a-f-]*}" ] || continue
      size=$(( (16#${first#*-} - 16#${first%-*}) >> 10 ))
      ram=0; [ -z "$path" ] && { [ "$size" -ge "$low_kib" ] || { [ "$high_kib" -gt 0 ] && [ "$size" -ge "$high_kib" ]; }; } && ram=1 ;;
  esac
done < "/proc/$vmm_pid/smaps"
echo "bench: berth-vmm's own memory (smaps Rss outside guest RAM): $((own_kib >> 10)) MiB of its $((vmm_kib >> 10)) MiB RSS; Firecracker's anchor 5 MiB, own/anchor $(ratio "$own_kib" 5120)"

# 6. docker build of a multi-stage Dockerfile (BuildKit), cold (the build cache pruned) and warm
# (the same build again), through the proxy and with the docker CLI inside the guest. The guest's
# CLI gets the same buildx plugin, copied in through the default share of the temp directory, and
# builds a copy of the context on the guest's own disk.
if [ "${BERTH_IN_RIG:-0}" = 1 ] && [ "${BERTH_BENCH_BUILD:-0}" != 1 ]; then
  echo "bench: docker build: not run in the rig unless BERTH_BENCH_BUILD=1 (four builds, about 4 minutes there)"
else
  [ -n "${BERTH_DOCKER_PLUGINS:-}" ] || { echo "bench: BERTH_DOCKER_PLUGINS is not set (tests/setup.sh installs buildx)" >&2; exit 1; }
  build_mib=${BERTH_BENCH_BUILD_CONTEXT_MIB:-8}
  bctx=$work/build
  mkdir -p "$bctx/src"
  for i in $(seq 64); do head -c $(((build_mib << 20) / 64)) /dev/urandom > "$bctx/src/f$i"; done
  cat > "$bctx/Dockerfile" <<'DOCKERFILE'
FROM bench/busybox AS deps
RUN i=0; while [ $i -lt 200 ]; do echo "dep $i" > /dep-$i; i=$((i + 1)); done; cat /dep-* | wc -l > /deps
FROM bench/busybox AS build
COPY --from=deps /deps /deps
COPY src /src
RUN cat /src/* | wc -c > /size && cat /deps /size > /out
FROM bench/busybox
COPY --from=build /out /out
CMD ["cat", "/out"]
DOCKERFILE
  cp "$BERTH_DOCKER_PLUGINS/docker-buildx" "$work/docker-buildx"
  prune() { docker builder prune -af >/dev/null && { docker rmi bench/built >/dev/null 2>&1 || true; }; }
  proxy_build() { local t0; t0=$(ms); docker build -q -t bench/built "$bctx" >/dev/null || return 1; echo $(($(ms) - t0)); }
  prune
  proxy_cold=$(proxy_build)
  proxy_warm=$(proxy_build)
  [ "$(docker run --rm bench/built | tail -n 1)" = "$((build_mib << 20))" ] || { echo "bench: the built image does not hold the context's size" >&2; exit 1; }
  prune
  guest_out=$(berth shell -- sh -c "set -e; rm -rf /tmp/bctx /tmp/bdc; cp -r '$bctx' /tmp/bctx; mkdir -p /tmp/bdc/cli-plugins; cp '$work/docker-buildx' /tmp/bdc/cli-plugins/; export DOCKER_CONFIG=/tmp/bdc
    for run in cold warm; do t0=\$(date +%s%3N); docker build -q -t bench/built /tmp/bctx >/dev/null; echo \"built \$run \$((\$(date +%s%3N) - t0))\"; done; rm -rf /tmp/bctx /tmp/bdc" | tr -d '\r')
  guest_cold=$(printf '%s\n' "$guest_out" | awk '/^built cold / { print $3 }')
  guest_warm=$(printf '%s\n' "$guest_out" | awk '/^built warm / { print $3 }')
  [ -n "$guest_cold" ] && [ -n "$guest_warm" ] || { echo "bench: docker build inside the guest failed: '$guest_out'" >&2; exit 1; }
  echo "bench: docker build (multi-stage, ${build_mib} MiB context): cold through the proxy ${proxy_cold} ms, inside the guest ${guest_cold} ms, proxy/guest $(ratio "$proxy_cold" "$guest_cold");" \
    "warm through the proxy ${proxy_warm} ms, inside the guest ${guest_warm} ms, proxy/guest $(ratio "$proxy_warm" "$guest_warm")"
fi
