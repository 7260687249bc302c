#!/usr/bin/env bash
# End to end on a VM host: the engine a user gets, with the real docker CLI and Debian trixie's
# compose and buildx plugins, against one Berth VM started once — BuildKit builds through the
# proxy, compose v2, a private registry, swarm's stack deploy, restart policies across `berth
# restart` and `berth stop` + `berth start`, memory and CPU limits, an OOM kill, the engine's
# socket inside a container, a `--network none` container's interfaces, and a volume across the
# stop and start. Each check prints `ok NAME` or `FAIL NAME`; tests/tests/engine.rs reads them.
# Images are made offline.
set -uo pipefail

# shellcheck source=tests/e2e/berth-home.sh
. "$(dirname "${BASH_SOURCE[0]}")/berth-home.sh"
berth_fresh_home berth-engine-home
work=$(mktemp -d)

check plugins sh -c 'docker compose version && docker buildx version'
check config berth config set cpus "$(berth_guest_cpus)"
berth config set memory_mib 1024 >/dev/null
berth config set disk_size_gib 8 >/dev/null
# With the docker context (the default): `docker --context berth` and DOCKER_HOST both reach it.
check start berth start --timeout 300 || {
  berth_show_logs
  exit 1
}
check context docker --context berth version --format 'server {{.Server.Version}} api {{.Server.APIVersion}}'
export DOCKER_HOST=unix://$BERTH_HOME/run/docker.sock
check version docker version --format 'server {{.Server.Version}} api {{.Server.APIVersion}} containerd {{range .Server.Components}}{{if eq .Name "containerd"}}{{.Version}}{{end}}{{end}}'

# Images made offline. tree_with DIR FILE[=PATH]...: each FILE (a host binary) in DIR at PATH
# (default: its own path), with the shared libraries and loader it needs.
tree_with() {
  local dir=$1 f src dst lib
  shift
  for f in "$@"; do
    src=${f%%=*}
    dst=${f#*=}
    install -D -m 0755 "$src" "$dir$dst"
    for lib in $(ldd "$src" 2>/dev/null | grep -oE '/[^ ]+' | sort -u); do
      [ -e "$dir$lib" ] || install -D -m 0755 "$lib" "$dir$lib"
    done
  done
}
mkdir -p "$work/busybox/bin" "$work/busybox/tmp" "$work/busybox/srv"
cp /bin/busybox "$work/busybox/bin/busybox"
for applet in $(/bin/busybox --list); do
  [ "$applet" = busybox ] || ln -s busybox "$work/busybox/bin/$applet"
done
check import sh -c "tar -C '$work/busybox' -c . | docker import - berth-test/busybox:latest"

# --- BuildKit through the proxy, with today's CLI defaults (buildx, the docker driver) --------
check buildx-default sh -c 'docker buildx ls; docker buildx inspect | grep -E "^Driver: +docker$"'
ctx=$work/build
mkdir -p "$ctx/ignored"
# A large context the build reads (200 MiB; BERTH_E2E_CONTEXT_MIB, which CI sets lower in the
# rig), streamed through the proxy by BuildKit's file sync.
context_mib=${BERTH_E2E_CONTEXT_MIB:-200}
check context-size sh -c "head -c ${context_mib}M /dev/urandom > '$ctx/big.bin' && du -m --apparent-size '$ctx/big.bin'"
big_sum=$(sha256sum "$ctx/big.bin" | cut -c1-64)
echo do-not-send > "$ctx/secret.txt"
echo do-not-send > "$ctx/ignored/file"
printf 'secret.txt\nignored/\n' > "$ctx/.dockerignore"
cat > "$ctx/Dockerfile" <<'DOCKERFILE'
# The whole context, read through a bind mount of it (no layer keeps the big file); a stage of its
# own, so a change of build arg below does not redo it.
FROM berth-test/busybox AS context
RUN --mount=type=bind,target=/ctx ls -A /ctx > /ctx-list && sha256sum /ctx/big.bin | cut -c1-64 > /big.sum

FROM berth-test/busybox AS build
ARG GREETING=unset
ARG BUST=1
# A cache mount keeps its contents from one build to the next.
RUN --mount=type=cache,target=/cache sh -c 'n=$(cat /cache/n 2>/dev/null || echo 0); n=$((n + 1)); echo $n > /cache/n; echo "bust $BUST run $n" > /cache-runs'
RUN echo "$GREETING" > /greeting

FROM scratch
COPY --from=build /bin/busybox /bin/busybox
COPY --from=context /big.sum /ctx-list /
COPY --from=build /greeting /cache-runs /
CMD ["/bin/busybox", "cat", "/greeting", "/big.sum", "/ctx-list", "/cache-runs"]
DOCKERFILE
check build-cold docker build --progress=plain --build-arg GREETING=hello-buildkit -t berth-test/buildkit "$ctx"
check run-built sh -c "out=\$(docker run --rm berth-test/buildkit) && echo \"\$out\" && echo \"\$out\" | grep -qx '$big_sum' && ! echo \"\$out\" | grep -qE 'secret|ignored'"
check history docker history --no-trunc --format '{{.CreatedBy}}' berth-test/buildkit
# The same build again: every step cached. Then one with the cache mount's step redone.
check build-warm sh -c "out=\$(docker build --progress=plain --build-arg GREETING=hello-buildkit -t berth-test/buildkit '$ctx' 2>&1) || { echo \"\$out\"; exit 1; }; echo \"\$out\" | grep CACHED; n=\$(echo \"\$out\" | grep -c CACHED); echo \"cached steps: \$n\"; [ \"\$n\" -ge 6 ]"
check build-cache-mount sh -c "docker build -q --build-arg GREETING=hello-buildkit --build-arg BUST=2 -t berth-test/buildkit '$ctx' >/dev/null && docker run --rm berth-test/buildkit | tail -n 1"

# --- Compose v2: two services that reach each other by name -----------------------------------
proj=$work/compose
mkdir -p "$proj"
cat > "$proj/compose.yaml" <<'YAML'
services:
  web:
    image: berth-test/busybox
    init: true
    environment:
      GREETING: hello-compose
    command: ["sh", "-c", "echo \"$$GREETING from web\" > /srv/index.html && exec httpd -f -p 80 -h /srv"]
    ports:
      - "8097:80"
    volumes:
      - data:/data
  client:
    image: berth-test/busybox
    init: true
    depends_on:
      - web
    command: ["sh", "-c", "while :; do wget -qO- http://web/ && echo reached-web; date >> /data/log; sleep 2; done"]
    volumes:
      - data:/data
volumes:
  data:
YAML
compose=(docker compose -f "$proj/compose.yaml" -p berthdemo)
check compose-up "${compose[@]}" up -d
check compose-ps "${compose[@]}" ps --format '{{.Service}} {{.State}}'
check compose-port sh -c 'for i in $(seq 30); do curl -fsS http://127.0.0.1:8097/ && exit 0; sleep 1; done; exit 1'
check compose-logs-f sh -c 'timeout 20 "$@" logs -f client | grep -m 1 reached-web' _ "${compose[@]}"
check compose-exec "${compose[@]}" exec -T client sh -c 'wget -qO- http://web/ && wc -l < /data/log'
check compose-down "${compose[@]}" down -v
check compose-volume-gone sh -c '! docker volume ls --format "{{.Name}}" | grep -x berthdemo_data && ! docker ps -a --format "{{.Names}}" | grep berthdemo'

# --- A private registry: Debian's docker-registry as an image made offline ---------------------
reg=$work/registry
tree_with "$reg" "$BERTH_DOCKER_REGISTRY=/usr/bin/docker-registry"
mkdir -p "$reg/etc/docker/registry" "$reg/var/lib/registry" "$reg/tmp"
cat > "$reg/etc/docker/registry/config.yml" <<'YAML'
version: 0.1
storage:
  filesystem:
    rootdirectory: /var/lib/registry
http:
  addr: :5000
YAML
check registry-image sh -c "tar -C '$reg' -c . | docker import -c 'ENTRYPOINT [\"/usr/bin/docker-registry\", \"serve\", \"/etc/docker/registry/config.yml\"]' -c 'EXPOSE 5000' - berth-test/registry"
check registry-run docker run -d --name registry -p 5000:5000 berth-test/registry
push=$work/push
mkdir -p "$push/bin"
cp /bin/busybox "$push/bin/busybox"
push_token=pushed-$RANDOM-$RANDOM
echo "$push_token" > "$push/token"
check registry-tag sh -c "tar -C '$push' -c . | docker import - berth-test/pushme && docker tag berth-test/pushme localhost:5000/berth-test/pushme:v1"
check registry-push sh -c 'for i in $(seq 20); do curl -fsS http://127.0.0.1:5000/v2/ >/dev/null 2>&1 && break; sleep 1; done; docker push localhost:5000/berth-test/pushme:v1'
check registry-rmi sh -c 'docker rmi localhost:5000/berth-test/pushme:v1 berth-test/pushme && ! docker image inspect localhost:5000/berth-test/pushme:v1 >/dev/null 2>&1'
check registry-pull sh -c 'docker pull localhost:5000/berth-test/pushme:v1 && docker run --rm localhost:5000/berth-test/pushme:v1 /bin/busybox cat /token'
check registry-catalog curl -fsS http://127.0.0.1:5000/v2/_catalog
docker rm -f registry >/dev/null 2>&1

# --- The engine's socket inside a container: the docker CLI there lists the containers ---------
cli=$work/cli
cp -a "$work/busybox" "$cli"
tree_with "$cli" "$(command -v docker)"
check socket-image sh -c "tar -C '$cli' -c . | docker import - berth-test/docker-cli"

# --- Restart policies, then limits, an OOM kill, interfaces ------------------------------------
check restart-always docker run -d --init --name always --restart=always berth-test/busybox sleep 100000
check restart-unless-stopped docker run -d --init --name unless --restart=unless-stopped berth-test/busybox sleep 100000
check restart-no docker run -d --init --name never berth-test/busybox sleep 100000
check socket-in-container docker run --rm -v /var/run/docker.sock:/var/run/docker.sock berth-test/docker-cli \
  "$(command -v docker)" ps --format '{{.Names}}'
# dockerd in a cgroup of its own (the agent's berth-daemons) sees the swap controller: no
# "does not support swap limit" warning, and --memory-swap is kept.
check daemons-cgroup berth shell -- sh -c 'for p in /proc/[0-9]*; do [ "$(cat "$p/comm" 2>/dev/null)" = dockerd ] && echo "dockerd $(cat "$p/cgroup")"; done | grep "^dockerd "'
check limits sh -c 'out=$(docker run --rm -m 64m --cpus 0.5 --memory-swap 96m berth-test/busybox cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max /sys/fs/cgroup/memory.swap.max 2>&1); s=$?; echo "$out"; [ "$s" = 0 ] && ! echo "$out" | grep -qi "swap limit"'
check oom-killed sh -c 'docker run --name oom -m 32m --memory-swap 32m berth-test/busybox dd if=/dev/zero of=/dev/null bs=64M count=1; echo "exit $?"; docker inspect -f "oomkilled {{.State.OOMKilled}}" oom; docker rm oom >/dev/null'
check network-none docker run --rm --network none berth-test/busybox ls /sys/class/net

# --- Swarm on one node: a service and a stack with published ports -----------------------------
check swarm-init docker swarm init
cat > "$work/stack.yaml" <<'YAML'
version: "3.8"
services:
  web:
    image: berth-test/busybox
    command: ["sh", "-c", "echo hello-from-the-stack > /srv/index.html && exec httpd -f -p 80 -h /srv"]
    ports:
      - "8096:80"
YAML
check stack-deploy docker stack deploy -c "$work/stack.yaml" berthstack
check stack-answers sh -c 'for i in $(seq 180); do curl -fsS --max-time 2 http://127.0.0.1:8096/ 2>/dev/null && exit 0; sleep 1; done; docker stack ps --no-trunc berthstack; exit 1'
check stack-services docker stack services --format '{{.Name}} {{.Replicas}} {{.Ports}}' berthstack
check stack-rm docker stack rm berthstack
check swarm-leave swarm_leave

# The containers running within a minute are `always` and `unless` (the restart policies), not `never`.
restart_policies_held() {
  local r
  for _ in $(seq 60); do
    r=$(docker ps --format '{{.Names}}' | sort | tr '\n' ' ')
    [ "$r" = "always unless " ] && break
    sleep 1
  done
  echo "running: $r"
  [ "$r" = "always unless " ]
}
check berth-restart berth restart --timeout 300
check restarted-after-restart restart_policies_held
# A volume's data survives berth stop and berth start.
token=persisted-$RANDOM-$RANDOM
check volume-create docker volume create berth-test-volume
check volume-write docker run --rm -v berth-test-volume:/data berth-test/busybox sh -c "echo $token > /data/token && cat /data/token"
check stop-vm berth stop
check status-stopped berth status
check start-vm berth start --timeout 300
check volume-read sh -c "docker run --rm -v berth-test-volume:/data berth-test/busybox cat /data/token | grep -x $token"
check restarted-after-stop-start restart_policies_held
# Where the restarted VM's time went: the guest's own marks (agent, data disk, containerd, dockerd).
check restart-timeline grep -aoE '(starting v[^ ]*|ready|dockerd found [^ ]+|dockerd ready) uptime=[0-9.]+s' "$BERTH_HOME/logs/console.log"
check final-stop berth stop
rm -rf "$work"
berth_report_guest_reset e2e
if [ "$failed" = 1 ]; then
  berth_show_logs
fi
exit "$failed"
