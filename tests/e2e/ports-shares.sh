#!/usr/bin/env bash
# End to end on a VM host (this machine with hardware KVM, else the nested rig's test host):
# published ports (TCP, UDP, IPv4 and IPv6, loopback-only, random ports, a taken port, 200
# parallel checksummed connections), the containers' way out (host.docker.internal, a resolver
# and a server on the test host, passt killed and back), and host folders shared at the same
# path (serve, host edits seen at once, a single-file bind mount, container writes, read-only
# share, escapes refused). Every server it reaches runs on the test host itself: its loopback,
# dnsmasq, a network namespace. Prints `ok NAME` / `FAIL NAME` per check for
# tests/tests/ports_shares.rs. Needs the BERTH_* variables of tests/setup.sh; starts as root (it
# makes a network namespace and its own mount namespace for the test resolver) and runs Berth and
# every check as an ordinary user in the KVM group (berth_as_user in berth-home.sh).
set -uo pipefail

# The root part: a private mount namespace (the test resolver is bound over /etc/resolv.conf in
# it only), the test host's servers, a network namespace, a read-only share and a secret outside
# every share; then the rest runs as an ordinary user (berth_as_user), Berth included, and the
# root part cleans up after it.
if [ -z "${BERTH_E2E_USER_PART:-}" ]; then
  if [ -z "${BERTH_E2E_UNSHARED:-}" ]; then
    BERTH_E2E_UNSHARED=1 exec unshare --mount --propagation private bash "$0" "$@"
  fi
  # shellcheck source=tests/e2e/berth-home.sh
  . "$(dirname "${BASH_SOURCE[0]}")/berth-home.sh"
  srv=$(mktemp -d "${TMPDIR:-/tmp}/berth-ports-servers-XXXXXX")
  ro_share=/var/tmp/berth-ro-share
  secret_dir=/run/berth-secret
  pids=()
  cleanup() {
    [ ${#pids[@]} -eq 0 ] || kill "${pids[@]}" 2>/dev/null
    ip netns del berth-srv 2>/dev/null
    rm -rf "$srv" "$ro_share" "$secret_dir"
    berth_as_user_cleanup
  }
  trap cleanup EXIT
  mkdir -p "$srv/hostsite" "$secret_dir"
  echo served-by-the-test-host > "$srv/hostsite/host.txt"
  echo host-secret-outside-every-share > "$secret_dir/secret.txt"
  busybox httpd -f -p 127.0.0.1:18099 -h "$srv/hostsite" & pids+=($!)
  dnsmasq --keep-in-foreground --no-resolv --no-hosts --listen-address=127.0.0.1 --bind-interfaces \
    --port=53 --address=/berth-test.internal/10.9.8.7 --log-facility=- 2> "$srv/dnsmasq.log" & pids+=($!)
  printf 'nameserver 127.0.0.1\n' > "$srv/resolv.conf"
  mount --bind "$srv/resolv.conf" /etc/resolv.conf
  ip netns add berth-srv
  ip link add berth-veth0 type veth peer name berth-veth1 netns berth-srv
  ip addr add 10.55.0.1/24 dev berth-veth0 && ip link set berth-veth0 up
  ip -n berth-srv addr add 10.55.0.2/24 dev berth-veth1
  ip -n berth-srv link set berth-veth1 up && ip -n berth-srv link set lo up
  mkdir -p "$srv/nssite" && echo served-from-a-network-namespace > "$srv/nssite/ns.txt"
  ip netns exec berth-srv busybox httpd -f -p 10.55.0.2:80 -h "$srv/nssite" & pids+=($!)
  mkdir -p "$ro_share" && echo read-only-content > "$ro_share/ro.txt"
  berth_as_user_prepare || exit 1
  export ro_share secret_dir
  status=0
  self=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
  berth_as_user env BERTH_E2E_USER_PART=1 bash "$self" "$@" || status=$?
  exit "$status"
fi

# The user part: everything below runs as $BERTH_E2E_UID, a user in the KVM group, with a home
# of its own; its work directory is under the system temp directory, which Berth shares by
# default.
# shellcheck source=tests/e2e/berth-home.sh
. "$(dirname "${BASH_SOURCE[0]}")/berth-home.sh"
check unprivileged sh -c "id; [ \"\$(id -u)\" != 0 ] && echo \"HOME=\$HOME\""
berth_fresh_home berth-ports-home
work=$(mktemp -d "${TMPDIR:-/tmp}/berth-ports-XXXXXX")
pids=()
cleanup() {
  [ ${#pids[@]} -eq 0 ] || kill "${pids[@]}" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

# curl against the host's published ports: short timeouts, the body on stdout.
get() { curl -sS --max-time 20 "$@"; }
# refused URL: the connection must fail (nothing listens), not hang or answer.
refused() {
  local code
  code=$(curl -sS -o /dev/null --max-time 10 -w '%{http_code}' "$1" 2>&1)
  echo "curl $1: $code"
  case "$code" in *"Connection refused"*|*"Couldn't connect"*|*"Failed to connect"*) return 0 ;; esac
  return 1
}

# --- Berth, with a read-only share beside the default ones --------------------------------
check config berth config set cpus "$(berth_guest_cpus)"
berth config set memory_mib 1024 >/dev/null
berth config set disk_size_gib 8 >/dev/null
check config-shares berth config set shares "$HOME,${TMPDIR:-/tmp},$ro_share:ro"
check start berth start --timeout 300 --no-docker-context || {
  berth_show_logs
  exit 1
}
export DOCKER_HOST=unix://$BERTH_HOME/run/docker.sock

# An image made offline: busybox-static and net-probe with the libraries it links.
tree=$work/image
mkdir -p "$tree/bin" "$tree/tmp" "$tree/www"
cp /bin/busybox "$tree/bin/busybox"
for applet in sh echo cat sleep ls wc sha256sum head httpd wget nslookup mkdir touch rm mv stat id \
  find sort xargs dd chown chmod ln test; do
  ln -s busybox "$tree/bin/$applet"
done
cp "$BERTH_NET_PROBE" "$tree/bin/net-probe"
fs_check=$(dirname "$BERTH_NET_PROBE")/fs-check
[ -x "$fs_check" ] || { echo "FAIL image ($fs_check missing: run tests/setup.sh)"; exit 1; }
cp "$fs_check" "$tree/bin/fs-check"
for lib in $(ldd "$BERTH_NET_PROBE" | grep -oE '/[^ ]+'); do cp --parents -L "$lib" "$tree"; done
check import sh -c "tar -C '$tree' -c . | docker import - berth-test/net:latest"
img=berth-test/net

# --- Published ports -----------------------------------------------------------------------
mkdir -p "$work/site"
echo hello-from-the-share > "$work/site/index.html"
httpd_cmd=(httpd -f -p 80 -h /www)
check run-web1 docker run -d --name web1 -p 8080:80 -v "$work/site:/www" "$img" "${httpd_cmd[@]}"
check run-web2 docker run -d --name web2 -p 8081:80 -v "$work/site:/www" "$img" "${httpd_cmd[@]}"
check two-ports-at-once sh -c "curl -sS --max-time 20 http://127.0.0.1:8080/index.html & curl -sS --max-time 20 http://127.0.0.1:8081/index.html; wait"
check ipv6-loopback get "http://[::1]:8080/index.html"
check docker-port docker port web1
# -P: dockerd picks the host port of each exposed port; the host binds that one.
check random-port sh -c "docker run -d --name web3 --expose 80 -P -v '$work/site:/www' $img ${httpd_cmd[*]} >/dev/null && port=\$(docker port web3 80/tcp | head -n 1 | sed 's/.*://') && echo \"random port \$port\" && curl -sS --max-time 20 http://127.0.0.1:\$port/index.html"
check loopback-only docker run -d --name web4 -p 127.0.0.1:8082:80 -v "$work/site:/www" "$img" "${httpd_cmd[@]}"
check loopback-only-answers get http://127.0.0.1:8082/index.html
other_ip=$(ip -4 -o addr show scope global | awk '{ sub(/\/.*/, "", $4); print $4; exit }')
check loopback-only-not-elsewhere refused "http://$other_ip:8082/index.html"
check status-lists-ports sh -c "berth status --json | jq -c '.ports' && berth status --json | jq -e '[.ports[] | select(.host_port == 8080 and .container_port == 80)] | length > 0'"
check stop-closes-port sh -c "docker stop -t 1 web2 >/dev/null && $(declare -f refused); refused http://127.0.0.1:8081/index.html"

# A host port already taken: docker run fails as on native Docker, the container is not left
# running, and the next port works.
"$BERTH_NET_PROBE" tcp-echo 8090 2> /dev/null & pids+=($!)
sleep 0.5
check port-taken sh -c "! docker run -d --name taken -p 8090:80 $img ${httpd_cmd[*]}"
check port-taken-not-running sh -c "state=\$(docker inspect -f '{{.State.Running}} {{.State.Status}}' taken); echo \"\$state\"; [ \"\${state%% *}\" = false ]"
check next-port-works sh -c "docker rm -f taken >/dev/null; docker run -d --name next -p 8091:80 -v '$work/site:/www' $img ${httpd_cmd[*]} >/dev/null && curl -sS --max-time 20 http://127.0.0.1:8091/index.html"

# UDP: datagrams kept whole.
check run-udp docker run -d --name udp -p 5353:5353/udp "$img" net-probe udp-echo 5353
check udp-round-trip "$BERTH_NET_PROBE" udp-check 127.0.0.1:5353 1 1400

# 200 parallel connections, 1 MiB each way (256 KiB in the rig, where this took 133 s with 1 MiB),
# checksummed, beside one client that never reads.
parallel_bytes=1048576
[ "${BERTH_IN_RIG:-0}" = 1 ] && parallel_bytes=262144
check run-echo docker run -d --name echo -p 8095:7 "$img" net-probe tcp-echo 7
check run-echo2 docker run -d --name echo2 -p 8096:7 "$img" net-probe tcp-echo 7
check parallel-200 "$BERTH_NET_PROBE" tcp-load 127.0.0.1:8095 200 "$parallel_bytes" --stall
# A container killed mid-transfer resets only its own connections.
"$BERTH_NET_PROBE" tcp-load 127.0.0.1:8096 8 268435456 > "$work/killed.out" 2>&1 &
killed_load=$!
sleep 3
check killed-mid-transfer sh -c "docker kill echo2 >/dev/null && '$BERTH_NET_PROBE' tcp-load 127.0.0.1:8095 20 1048576"
check killed-load-failed sh -c "wait_for=60; while kill -0 $killed_load 2>/dev/null && [ \$wait_for -gt 0 ]; do sleep 1; wait_for=\$((wait_for - 1)); done; cat '$work/killed.out'; ! grep -q 'checksums ok' '$work/killed.out' && grep -q 'error' '$work/killed.out'"

# --- The way out ---------------------------------------------------------------------------
# One container per network tries every way out (a container start costs 15-20 s in the rig);
# each try is its own check, read from that container's output.
try_script='t() { n=$1; shift; "$@" 2>&1; echo "== $n rc=$?"; }
t host-docker-internal wget -qO- http://host.docker.internal:18099/host.txt
t host-gateway wget -qO- http://hgw:18099/host.txt
t dns nslookup -type=a berth-test.internal
t netns-server wget -qO- http://10.55.0.2/ns.txt'
# tried OUTPUT NAME: the lines of try NAME in OUTPUT; fails unless it exited 0.
tried() {
  printf '%s\n' "$1" | awk -v n="$2" '
    /^== / { if ($2 == n) { printf "%s", buf; print; ok = ($3 == "rc=0"); found = 1; exit } buf = ""; next }
    { buf = buf $0 "\n"; all = all $0 "\n" }
    END { if (!found) printf "no try %s in the output:\n%s", n, all; exit !(found && ok) }'
}
# Type A only: the test resolver knows no AAAA and has no upstream to ask (it answers REFUSED).
bridge_out=$(docker run --rm --add-host=hgw:host-gateway "$img" sh -c "$try_script" 2>&1)
check host-docker-internal tried "$bridge_out" host-docker-internal
check host-gateway tried "$bridge_out" host-gateway
check dns-default-bridge tried "$bridge_out" dns
check netns-server tried "$bridge_out" netns-server
check user-network docker network create berth-net1
user_out=$(docker run --rm --network berth-net1 --add-host=hgw:host-gateway "$img" sh -c "$try_script" 2>&1)
check host-docker-internal-user-network tried "$user_out" host-docker-internal
check dns-user-network tried "$user_out" dns
# passt killed while the VM runs: the host proxy starts it again and the guest's way out comes
# back; published ports never went through it.
# (Debian's passt runs as passt.avx2 where the CPU has AVX2.)
check kill-passt sh -c 'pkill -9 -x "passt(\.avx2)?" && echo killed passt'
check port-while-passt-restarts get http://127.0.0.1:8080/index.html
check way-out-after-passt sh -c "for i in \$(seq 30); do docker run --rm $img wget -qO- http://host.docker.internal:18099/host.txt && exit 0; sleep 2; done; exit 1"

# --- Swarm: ports the routing mesh publishes (no userland proxy) ---------------------------
check swarm-init docker swarm init
check service-create docker service create --detach --name berth-svc -p 8098:80 \
  --mount "type=bind,source=$work/site,target=/www" "$img" "${httpd_cmd[@]}"
check service-port-answers sh -c "for i in \$(seq 90); do curl -sS --max-time 5 http://127.0.0.1:8098/index.html 2>/dev/null && exit 0; sleep 2; done; docker service ps --no-trunc berth-svc; exit 1"
check service-port-listed sh -c "berth status --json | jq -e '[.ports[] | select(.host_port == 8098)] | length > 0'"
check service-rm-closes-port sh -c "docker service rm berth-svc >/dev/null && for i in \$(seq 30); do $(declare -f refused); refused http://127.0.0.1:8098/index.html && exit 0; sleep 1; done; exit 1"
check swarm-leave swarm_leave

# --- Shares at the same path ---------------------------------------------------------------
check share-serves get http://127.0.0.1:8080/index.html
echo changed-on-the-host > "$work/site/index.html"
check host-edit-seen-at-once get http://127.0.0.1:8080/index.html
echo first-version > "$work/test.txt"
check run-seed docker run -d --name seed -p 8083:80 -v "$work/test.txt:/www/test.txt" "$img" "${httpd_cmd[@]}"
check single-file-first get http://127.0.0.1:8083/test.txt
echo changed > "$work/test.txt"
check single-file-edited get http://127.0.0.1:8083/test.txt
mkdir -p "$work/out"
check container-writes docker run --rm -v "$work/out:/out" "$img" sh -c 'echo from-a-container > /out/c.txt && mkdir /out/d && touch /out/d/e && chown 1234:1234 /out/c.txt; echo chown-status $?'
check host-reads-container-file cat "$work/out/c.txt"
check container-files-owner sh -c "owner=\$(stat -c %u:%g '$work/out/c.txt' '$work/out/d'); echo \"\$owner\"; want=\$(stat -c %u:%g '$work'); [ \"\$(echo \"\$owner\" | sort -u)\" = \"\$want\" ]"
check no-root-owned-files sh -c "found=\$(find '$work' -uid 0 | head); [ -z \"\$found\" ] && echo \"nothing in the user's folder belongs to root\" || { echo \"root-owned: \$found\"; exit 1; }"
# A big file both ways in one container: the host's file read and checksummed in the
# container, and copied by the container into a new file the host compares.
dd if=/dev/urandom of="$work/big.bin" bs=1M count=128 status=none
big_out=$(docker run --rm -v "$work:$work" "$img" sh -c "sha256sum < '$work/big.bin' && dd if='$work/big.bin' of='$work/big-copy.bin' bs=1M 2>/dev/null && echo copied" 2>&1)
big_read() {
  local host guest
  host=$(sha256sum < "$work/big.bin" | cut -d' ' -f1)
  guest=$(printf '%s\n' "$big_out" | head -n 1 | cut -d' ' -f1)
  echo "host $host guest $guest"
  [ -n "$host" ] && [ "$host" = "$guest" ] || { printf '%s\n' "$big_out"; return 1; }
}
big_write() {
  printf '%s\n' "$big_out" | grep -qx copied && cmp "$work/big.bin" "$work/big-copy.bin" && echo copied-128MiB-identical
}
check big-file-read big_read
check big-file-write big_write
mkdir -p "$work/many"
for d in $(seq 0 199); do mkdir "$work/many/d$d"; for f in $(seq 0 9); do echo "file $d $f" > "$work/many/d$d/f$f"; done; done
check many-files sh -c "host=\$(cd '$work/many' && find . -type f | sort | xargs cat | sha256sum | cut -d' ' -f1); guest=\$(docker run --rm -v '$work/many:/m' -w /m $img sh -c 'find . -type f | sort | xargs cat | sha256sum' | cut -d' ' -f1); n=\$(docker run --rm -v '$work/many:/m' $img sh -c 'find /m -type f | wc -l'); echo \"files \$n host \$host guest \$guest\"; [ \"\$n\" = 2000 ] && [ \"\$host\" = \"\$guest\" ]"
check read-only-share-reads docker run --rm -v "$ro_share:/ro" "$img" cat /ro/ro.txt
check read-only-share-refuses sh -c "out=\$(docker run --rm -v '$ro_share:/ro' $img sh -c 'echo x > /ro/new.txt' 2>&1); echo \"\$out\"; [ ! -e '$ro_share/new.txt' ] && echo \"\$out\" | grep -qi 'read-only'"
mkdir -p "$work/sem"
cp "$(dirname "${BASH_SOURCE[0]}")/share-semantics.sh" "$work/share-semantics.sh"
# xattrs "where the host has them": the share must answer as the host's file system does.
host_xattr=$("$fs_check" xattr "$work" 2>&1)
check share-semantics docker run --rm -v "$work:$work" "$img" sh "$work/share-semantics.sh" "$work/sem" "$host_xattr"
# O_APPEND from two containers at once: every line whole, none lost.
printf '%s\n' 'i=0; while [ $i -lt 200 ]; do echo "container-$1-line-$i" >> /sem/log; i=$((i + 1)); done' > "$work/append.sh"
appenders() {
  local c
  for c in 1 2; do
    docker run -d --name "app$c" -v "$work/sem:/sem" -v "$work/append.sh:/append.sh" "$img" sh /append.sh "$c" >/dev/null || return 1
  done
  docker wait app1 app2 >/dev/null && docker rm app1 app2 >/dev/null
  local n
  n=$(grep -cE '^container-[12]-line-[0-9]+$' "$work/sem/log")
  echo "$n whole lines of 400, $(wc -l < "$work/sem/log") in all"
  [ "$n" = 400 ] && [ "$(wc -l < "$work/sem/log")" = 400 ]
}
check append-two-containers appenders
mkdir -p "$work/esc"
ln -s "$secret_dir/secret.txt" "$work/esc/absolute-link"
ln -s "../../../../../../../..$secret_dir/secret.txt" "$work/esc/relative-link"
check escapes-refused sh -c "out=\$(docker run --rm -v '$work/esc:/esc' $img sh -c 'cat /esc/absolute-link; cat /esc/relative-link; cat /esc/../../../..$secret_dir/secret.txt; ls -la /esc; echo listed-the-share' 2>&1); echo \"\$out\"; echo \"\$out\" | grep -q listed-the-share && ! echo \"\$out\" | grep -q host-secret"

# --- Change events --------------------------------------------------------------------------
# A container watches a shared folder with inotifywait (the
# plain `-m -r`, and Node's fs.watch mask); the host creates, modifies, renames and deletes
# files; each event must reach the container within 500 ms (measured on the host, polling the
# watcher's log, which it writes to another shared folder; in the rig, whose emulation put
# events at 160-512 ms, within 1500 ms, each latency printed), and the injection must leave the
# file's content and mtime as the host wrote them (stat before and after, host and container).
iw=$(command -v inotifywait)
cp -L "$iw" "$tree/bin/inotifywait"
for lib in $(ldd "$iw" | grep -oE '/[^ ]+'); do cp --parents -L "$lib" "$tree"; done
check import-inotify sh -c "tar -C '$tree' -c . | docker import - berth-test/inotify:latest"
watched=$work/watched
iwlog=$work/iwlog
mkdir -p "$watched" "$iwlog"
echo kept > "$watched/keep.txt"
node_mask="-e attrib -e create -e modify -e delete -e delete_self -e move_self -e moved_from -e moved_to"
check run-watcher docker run -d --name watcher -v "$watched:$watched" -v "$iwlog:$iwlog" \
  berth-test/inotify sh -c "inotifywait -m -r --format '%e %w%f' '$watched' > '$iwlog/plain.log' 2> '$iwlog/plain.err' &
    inotifywait -m -r $node_mask --format '%e %w%f' '$watched' > '$iwlog/node.log' 2> '$iwlog/node.err' & wait"
# Both watchers established, and the host watching (the agent publishes the bind mounts on
# container start; allow it a moment).
check watcher-ready sh -c "for i in \$(seq 100); do [ \"\$(grep -h 'Watches established' '$iwlog/plain.err' '$iwlog/node.err' 2>/dev/null | wc -l)\" = 2 ] && exit 0; sleep 0.1; done; cat '$iwlog'/*.err; exit 1"
sleep 2

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
# seen_within START_MS LINE: both watchers' logs hold LINE within $event_ms of START_MS (fs-check
# polls each log in-process every 5 ms; a fork per look would cost more than it measures).
event_ms=500
[ "${BERTH_IN_RIG:-0}" = 1 ] && event_ms=1500
seen_within() {
  "$fs_check" wait-line "$iwlog/plain.log" "$2" "$1" "$event_ms" && "$fs_check" wait-line "$iwlog/node.log" "$2" "$1" "$event_ms"
}
# host_action NAME LINE COMMAND...: runs COMMAND on the host, then both logs must show LINE.
host_action() {
  local name=$1 line=$2 start; shift 2
  start=$(now_ms)
  "$@"
  check "inotify-$name" seen_within "$start" "$line"
}
# Identity of a file as a user sees it: size, mtime (ns), content hash.
ident() { stat -c '%s %y' "$1" && sha256sum < "$1" | cut -d' ' -f1; }

host_action create "CREATE $watched/new.txt" sh -c "echo one > '$watched/new.txt'"
# The edit, its identity at once (before the injection, which waits for the host's 75 ms
# window), then the event, then the identity again on the host and in the container.
before=$(ident "$watched/keep.txt")
start=$(now_ms)
echo more >> "$watched/keep.txt"
edited=$(ident "$watched/keep.txt")
check inotify-modify seen_within "$start" "MODIFY $watched/keep.txt"
sleep 0.5
after=$(ident "$watched/keep.txt")
in_container=$(docker exec watcher sh -c "stat -c '%s %y' '$watched/keep.txt' && sha256sum < '$watched/keep.txt' | cut -d' ' -f1")
check inotify-modify-keeps-content-and-mtime sh -c "printf 'before the edit: %s\nafter it: %s\nafter the event: %s\nin the container: %s\n' '$before' '$edited' '$after' '$in_container'
  [ '$edited' = '$after' ] && [ '$after' = '$in_container' ] && [ '$edited' != '$before' ]"
host_action mkdir "CREATE,ISDIR $watched/sub" mkdir "$watched/sub"
host_action create-in-new-dir "CREATE $watched/sub/deep.js" sh -c "echo x > '$watched/sub/deep.js'"
host_action rename-from "MOVED_FROM $watched/keep.txt" mv "$watched/keep.txt" "$watched/renamed.txt"
check inotify-rename-to sh -c "grep -E '^MOVED_TO $watched/renamed\.txt\$' '$iwlog/plain.log' && grep -E '^MOVED_TO $watched/renamed\.txt\$' '$iwlog/node.log'"
host_action delete "DELETE $watched/renamed.txt" rm "$watched/renamed.txt"
host_action attrib "ATTRIB $watched/new.txt" chmod 600 "$watched/new.txt"
# A save touching 2000 files: events arrive, bounded (file events, then directory events).
start=$(now_ms)
mkdir -p "$watched/bulk"
for i in $(seq 2000); do echo "$i" > "$watched/bulk/f$i"; done
sleep 2
# No storm: the events stop once the burst is delivered (the guest raises them one by one, at a
# FUSE lookup each; under the rig's emulation that is ~100 a second, so it may take a while),
# and they are bounded: at most two per file (its create, its modify) plus directory events.
check inotify-no-storm sh -c "a=-1; for i in \$(seq 60); do b=\$(wc -l < '$iwlog/plain.log'); [ \"\$a\" = \"\$b\" ] && { echo \"quiet after \$(((i - 1) * 2)) s at \$b lines\"; exit 0; }; a=\$b; sleep 2; done; echo \"still growing after 120 s: \$b lines\"; exit 1"
check inotify-burst-bounded sh -c "n=\$(grep -c '$watched/bulk' '$iwlog/plain.log'); echo \"\$n events for 2000 files\"; [ \"\$n\" -gt 0 ] && [ \"\$n\" -lt 4000 ]"
docker rm -f watcher >/dev/null 2>&1

check final-stop berth stop
check ports-closed-after-stop refused http://127.0.0.1:8080/index.html
berth_report_guest_reset e2e
if [ "$failed" = 1 ]; then
  berth_show_logs
  for log in passt.log; do [ -f "$BERTH_HOME/logs/$log" ] && { echo "--- $log (last 30 lines)"; tail -n 30 "$BERTH_HOME/logs/$log"; }; done
fi
exit "$failed"
