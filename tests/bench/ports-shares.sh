#!/usr/bin/env bash
# Network and file-share benchmarks, each figure beside a baseline measured in the same run (no
# pass/fail on the figures; the script fails only when what it measures stops working):
#   - TCP throughput (iperf3, 5 s each) host -> container and container -> host through a
#     published port, beside iperf3 over the VM host's own loopback and beside passt's own port
#     forwarding (-t) into the same guest;
#   - connection setup (connect + first byte echoed, p50/p99 of 1000) through a published port,
#     beside the VM host's loopback;
#   - outbound throughput, container -> a server on the VM host through passt
#     (host.docker.internal), beside the loopback;
#   - an npm-install-like tree (20k files of 1-16 KiB in 2k directories, BERTH_BENCH_TREE_FILES:
#     unpack, stat, read and checksum, delete) and a 1 GiB sequential write and read
#     (BERTH_BENCH_SEQ_MIB; tests/run-tests.sh runs smaller sizes in the rig): in a
#     container on a share, in a container on a docker volume (the guest's own disk), and natively
#     on the VM host; share/native and share/volume.
# Runs on the VM host: directly with hardware KVM, else inside the nested rig.
#
#   tests/bench/ports-shares.sh
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/bench/bench-env.sh
. "$here/bench-env.sh"
bench_env BERTH_VMM BERTH_KERNEL BERTH_ROOTFS BERTH_NET_PROBE
fs_bench=$(dirname "$BERTH_NET_PROBE")/fs-bench
[ -x "$fs_bench" ] || { echo "bench: $fs_bench missing; run tests/setup.sh" >&2; exit 1; }
command -v iperf3 >/dev/null || { echo "bench: iperf3 missing; run tests/setup.sh" >&2; exit 1; }

bench_in_rig --memory 4096 --timeout 1500 --name "ports and shares benchmark" -- "$here/ports-shares.sh" "$@"

# shellcheck source=tests/e2e/berth-home.sh
. "$here/../e2e/berth-home.sh"
berth_fresh_home berth-bench-net-home
export DOCKER_HOST=unix://$BERTH_HOME/run/docker.sock
memory_mib=1536
seq_mib=${BERTH_BENCH_SEQ_MIB:-1024}
tree_files=${BERTH_BENCH_TREE_FILES:-20000}
berth config set memory_mib $memory_mib >/dev/null
berth config set cpus "$(berth_guest_cpus)" >/dev/null
berth config set disk_size_gib 8 >/dev/null
work=$(mktemp -d "${TMPDIR:-/tmp}/berth-bench-XXXXXX")
pids=()
diagnose() {
  echo "bench: FAILED (status $1); the logs:" >&2
  berth_show_logs >&2 || true
  berth_report_guest_reset bench || true
}
trap 'status=$?; [ "$status" = 0 ] || diagnose "$status"; [ ${#pids[@]} -eq 0 ] || kill "${pids[@]}" 2>/dev/null; berth stop >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
# limit SECONDS COMMAND...: COMMAND, killed after SECONDS with a line naming it, so a step that
# hangs fails this script (and prints the logs) well inside the rig's own timeout.
limit() {
  local s=$1 status=0
  shift
  timeout --kill-after=5 "$s" "$@" || status=$?
  [ "$status" != 124 ] && [ "$status" != 137 ] || echo "bench: timed out after ${s} s: $*" >&2
  return "$status"
}
# ratio A B: A/B, or n/a when B is 0 (a figure below the clock's resolution: the rig's test host
# counts time in 4 ms jiffies).
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) printf "n/a"; else printf "%.2f", a / b }'; }

where="directly on hardware KVM"
[ "${BERTH_IN_RIG:-0}" = 1 ] && where="in the nested rig (the VM host is the emulated test host: absolute figures are far from hardware, ratios matter)"
echo "bench: ports and shares benchmarks, $where"

# passt's own forwarding of host port 5203 to the guest's port 5201, the baseline for ours.
export BERTH_PASST_TCP_PORTS=5203:5201
limit 420 berth start --timeout 300 --no-docker-context >/dev/null

# The image: busybox, iperf3, net-probe and fs-bench with their libraries.
tree=$work/image
mkdir -p "$tree/bin" "$tree/tmp"
cp /bin/busybox "$tree/bin/busybox"
for applet in sh cat ip; do ln -s busybox "$tree/bin/$applet"; done
for bin in "$(command -v iperf3)" "$BERTH_NET_PROBE" "$fs_bench"; do
  cp "$bin" "$tree/bin/"
  for lib in $(ldd "$bin" | grep -oE '/[^ ]+'); do cp --parents -nL "$lib" "$tree"; done
done
tar -C "$tree" -c . | limit 120 docker import - berth-bench/net >/dev/null
img=berth-bench/net

# --- TCP throughput -----------------------------------------------------------------------
gbps() { jq -r '.end.sum_received.bits_per_second / 1e9 * 1000 | round / 1000'; }
limit 120 docker run -d --name iperf -p 5201:5201 "$img" iperf3 -s >/dev/null
iperf3 -s -p 5202 -B 127.0.0.1 >/dev/null 2>&1 & pids+=($!)
sleep 2
iperf() { limit 60 iperf3 -c 127.0.0.1 -t 5 -J "$@" | gbps; }
in_port=$(iperf -p 5201)
out_port=$(iperf -p 5201 -R)
in_passt=$(iperf -p 5203)
out_passt=$(iperf -p 5203 -R)
loop_in=$(iperf -p 5202)
loop_out=$(iperf -p 5202 -R)
echo "bench: TCP host -> container through the published port ${in_port} Gbit/s; passt -t ${in_passt} Gbit/s; host loopback ${loop_in} Gbit/s;" \
  "published/passt $(ratio "$in_port" "$in_passt"), published/loopback $(ratio "$in_port" "$loop_in")"
echo "bench: TCP container -> host through the published port ${out_port} Gbit/s; passt -t ${out_passt} Gbit/s; host loopback ${loop_out} Gbit/s;" \
  "published/passt $(ratio "$out_port" "$out_passt"), published/loopback $(ratio "$out_port" "$loop_out")"

# --- Connection setup -----------------------------------------------------------------------
limit 120 docker run -d --name echo -p 8097:7 "$img" net-probe tcp-echo 7 >/dev/null
"$BERTH_NET_PROBE" tcp-echo 8098 2>/dev/null & pids+=($!)
sleep 2
read -r _ _ _ _ p50 _ _ p99 _ <<< "$(limit 300 "$BERTH_NET_PROBE" latency 127.0.0.1:8097 1000 | tr -d ',')"
read -r _ _ _ _ lp50 _ _ lp99 _ <<< "$(limit 300 "$BERTH_NET_PROBE" latency 127.0.0.1:8098 1000 | tr -d ',')"
echo "bench: connect + first byte, 1000 connections: published port p50 ${p50} ms p99 ${p99} ms; host loopback p50 ${lp50} ms p99 ${lp99} ms;" \
  "p50 published/loopback $(ratio "$p50" "$lp50")"

# --- Outbound ---------------------------------------------------------------------------------
iperf3 -s -p 5204 >/dev/null 2>&1 & pids+=($!)
sleep 1
outbound=$(limit 120 docker run --rm "$img" iperf3 -c host.docker.internal -p 5204 -t 5 -J | gbps)
echo "bench: TCP container -> a server on the VM host through passt ${outbound} Gbit/s; host loopback ${loop_in} Gbit/s; outbound/loopback $(ratio "$outbound" "$loop_in")"

# --- MTU -------------------------------------------------------------------------------------
# The guest's link MTU (passt's 65520-byte frames less the Ethernet header) against 1500: the
# paths through passt, outbound and passt's -t, measured again with eth0 at 1500, then restored.
guest_mtu() { limit 120 docker run --rm --privileged --net=host "$img" cat /sys/class/net/eth0/mtu; }
big_mtu=$(guest_mtu)
limit 120 docker run --rm --privileged --net=host "$img" ip link set eth0 mtu 1500
[ "$(guest_mtu)" = 1500 ] || { echo "bench: could not set the guest's MTU to 1500" >&2; exit 1; }
outbound_1500=$(limit 120 docker run --rm "$img" iperf3 -c host.docker.internal -p 5204 -t 5 -J | gbps)
in_passt_1500=$(iperf -p 5203)
limit 120 docker run --rm --privileged --net=host "$img" ip link set eth0 mtu "$big_mtu"
echo "bench: MTU ${big_mtu} vs 1500 through passt: outbound ${outbound} vs ${outbound_1500} Gbit/s ($(ratio "$outbound" "$outbound_1500")x);" \
  "host -> guest through passt -t ${in_passt} vs ${in_passt_1500} Gbit/s ($(ratio "$in_passt" "$in_passt_1500")x)"

# --- Shares -----------------------------------------------------------------------------------
# phases OUTPUT: "unpack stat read delete" seconds from fs-bench's lines.
phases() { awk '/^fs-bench: (unpack|stat|read|delete|seq-write|seq-read) / { printf "%s ", $3 }'; }
total() { awk '{ s = 0; for (i = 1; i <= NF; i++) s += $i; printf "%.3f", s }'; }
mkdir -p "$work/share"
docker volume create berth-bench-vol >/dev/null
share_out=$(limit 400 docker run --rm -v "$work/share:/w" "$img" fs-bench tree /w "$tree_files")
volume_out=$(limit 400 docker run --rm -v berth-bench-vol:/w "$img" fs-bench tree /w "$tree_files")
native_out=$("$fs_bench" tree "$work/share" "$tree_files")
for out in "$share_out" "$volume_out" "$native_out"; do
  grep -q "tree $tree_files files" <<< "$out" || { echo "bench: fs-bench tree failed: $out" >&2; exit 1; }
done
sums=$(printf '%s\n' "$share_out" "$volume_out" "$native_out" | grep -o 'checksum [0-9a-f]*' | sort -u | wc -l)
[ "$sums" = 1 ] || { echo "bench: the tree's checksums differ between share, volume and native" >&2; exit 1; }
s=$(phases <<< "$share_out"); v=$(phases <<< "$volume_out"); n=$(phases <<< "$native_out")
st=$(total <<< "$s"); vt=$(total <<< "$v"); nt=$(total <<< "$n")
echo "bench: npm-like tree of $tree_files files (unpack stat read delete, s): share [$s] ${st} s; volume [$v] ${vt} s; native [$n] ${nt} s;" \
  "share/native $(ratio "$st" "$nt"), share/volume $(ratio "$st" "$vt")"
share_seq=$(limit 400 docker run --rm -v "$work/share:/w" "$img" fs-bench seq /w "$seq_mib" | phases)
volume_seq=$(limit 400 docker run --rm -v berth-bench-vol:/w "$img" fs-bench seq /w "$seq_mib" | phases)
native_seq=$("$fs_bench" seq "$work/share" "$seq_mib" | phases)
read -r sw sr <<< "$share_seq"; read -r vw vr <<< "$volume_seq"; read -r nw nr <<< "$native_seq"
mibps() { awk -v m="$seq_mib" -v t="$1" 'BEGIN { printf "%.0f", m / t }'; }
echo "bench: sequential ${seq_mib} MiB write: share $(mibps "$sw") MiB/s, volume $(mibps "$vw") MiB/s, native $(mibps "$nw") MiB/s;" \
  "share/native time $(ratio "$sw" "$nw"), share/volume $(ratio "$sw" "$vw")"
echo "bench: sequential ${seq_mib} MiB read: share $(mibps "$sr") MiB/s, volume $(mibps "$vr") MiB/s, native $(mibps "$nr") MiB/s;" \
  "share/native time $(ratio "$sr" "$nr"), share/volume $(ratio "$sr" "$vr")"
