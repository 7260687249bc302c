#!/usr/bin/env bash
# No lost writes under kill -9: a container appends numbered 512-byte records to a named volume,
# each with its own fsync (dd conv=fsync), and says `synced N` on stdout only once that fsync
# returned; the host keeps what it read. At a random moment the VMM is killed with SIGKILL, the
# host proxy starts the VM again (host-proxy/src/daemon/recovery.rs), the data disk mounts (its
# journal replayed), and every record the host saw synced must be in the file, intact, and no
# record in it torn. After the last round, with the VM stopped, `e2fsck -fn` finds the data
# disk's file system clean.
#
# tests/e2e/docker.sh sources this and runs three rounds (durability_round); by hand, a Berth of
# its own and as many rounds as asked (100 for the note):
#
#   tests/e2e/durability.sh ROUNDS
#
# Needs the BERTH_* variables of tests/setup.sh (. ~/.cache/berth/env.sh); in the nested rig,
# tests/rig/run-in-rig.sh --timeout SECONDS -- tests/e2e/durability.sh ROUNDS.

# durability_verify FILE SYNCED: prints what FILE holds beside the SYNCED records the host saw;
# fails when one of them is missing or wrong, or any record in the file is torn (a complete
# record neither right nor all zeros, or a partial one at its end). A record past SYNCED that is
# all zeros was written to the file's size but not yet to the disk: told, not a failure.
durability_verify() {
  local file=$1 synced=$2 size blocks count expected counts lost torn zero status=0
  size=$(stat -c %s "$file") || return 1
  blocks=$((size / 512))
  count=$((blocks > synced ? blocks : synced))
  expected=$(mktemp)
  local i
  for ((i = 1; i <= count; i++)); do printf '%-511s\n' "record $i"; done > "$expected"
  # cmp -l: one line per differing byte, its 1-based offset and both bytes in octal; it stops
  # at the end of the shorter file.
  counts=$(cmp -l "$file" "$expected" 2>/dev/null | awk -v synced="$synced" '
    { b = int(($1 - 1) / 512) + 1; diff[b]++; if ($2 != 0) nonzero[b] = 1 }
    END {
      for (b in diff) {
        if (b + 0 <= synced) lost++
        else if (nonzero[b] || diff[b] != 512) torn++
        else zero++
      }
      print lost + 0, torn + 0, zero + 0
    }')
  rm -f "$expected"
  read -r lost torn zero <<< "$counts"
  # Records the host saw synced beyond the file's end are lost too.
  [ "$blocks" -lt "$synced" ] && lost=$((lost + synced - blocks))
  echo "records: $synced synced as the host saw, $blocks in the file ($size bytes); lost $lost, torn $torn, all-zero past the last sync $zero"
  [ "$lost" = 0 ] || { echo "LOST: a record whose fsync returned is missing or wrong"; status=1; }
  [ "$torn" = 0 ] || { echo "TORN: a record in the file is neither whole nor empty"; status=1; }
  [ $((size % 512)) = 0 ] || { echo "TORN: the file ends in a partial record ($((size % 512)) bytes)"; status=1; }
  return "$status"
}

# durability_prepare: the container the writers run in, berth-durable with the volume of the
# same name at /v; --restart=always brings it back with the VM after each kill, so a round
# needs a `docker exec` (seconds in the rig), not a `docker run`.
durability_prepare() {
  docker run -d --name berth-durable --restart=always -v berth-durable:/v berth-test/busybox sleep 1000000 > /dev/null
}

# durability_round R WAIT...: one round (file log.R on the volume): the writer, the kill after
# 1-5 s of writing, WAIT... (a command that waits for the VM to run again after the crash),
# then the records read back and verified. Uses $work for its files.
durability_round() {
  local r=$1 out pause pid writer synced i t0 mountpoint
  shift
  out=$work/durable.$r.out
  t0=$SECONDS
  for _ in $(seq 120); do
    [ "$(docker inspect -f '{{.State.Running}}' berth-durable 2>/dev/null)" = true ] && break
    sleep 1
  done
  docker exec berth-durable sh -c "
    i=0
    while :; do
      i=\$((i + 1))
      printf '%-511s\n' \"record \$i\" | dd of=/v/log.$r bs=512 seek=\$((i - 1)) iflag=fullblock conv=notrunc,fsync 2>/dev/null || exit 1
      echo \"synced \$i\"
    done" > "$out" 2>&1 &
  writer=$!
  for _ in $(seq 240); do
    grep -q '^synced' "$out" && break
    kill -0 "$writer" 2>/dev/null || break
    sleep 0.5
  done
  grep -q '^synced' "$out" || { echo "the writer never synced a record:"; cat "$out"; kill "$writer" 2>/dev/null; return 1; }
  echo "the writer synced its first record $((SECONDS - t0)) s into the round"
  pause=$((RANDOM % 5 + 1))
  sleep "$pause"
  pid=$(berth status --json | jq -r .vmm_pid)
  kill -9 "$pid" || return 1
  echo "killed the VMM $pid after ${pause} s of writing (last the host saw: $(grep -a '^synced' "$out" | tail -n 1))"
  t0=$SECONDS
  "$@" || return 1
  echo "running again $((SECONDS - t0)) s after the kill"
  # The docker client has lost its connection with the VM; give it a minute to notice.
  for _ in $(seq 60); do kill -0 "$writer" 2>/dev/null || break; sleep 1; done
  kill "$writer" 2>/dev/null
  wait "$writer" 2>/dev/null
  # A partial last line can only be a prefix of a larger number: never more than was synced.
  synced=$(tr -d '\r' < "$out" | awk '/^synced [0-9]+$/ { n = $2 } END { print n + 0 }')
  grep -aq "EXT4-fs (vdb): recovery complete" "$BERTH_HOME/logs/console.log" &&
    echo "the data disk's journal was replayed at mount" ||
    echo "the data disk mounted without a journal to replay"
  # Read in the guest, straight from the volume's directory: no container to start.
  mountpoint=$(docker volume inspect -f '{{.Mountpoint}}' berth-durable) &&
    berth shell -- cat "$mountpoint/log.$r" > "$work/durable.$r.log" || {
    echo "reading the records back failed"
    return 1
  }
  durability_verify "$work/durable.$r.log" "$synced"
}

# durability_fsck: e2fsck -fn of the stopped VM's data disk.
durability_fsck() {
  e2fsck -fn "$BERTH_HOME/data.img"
}

# --- by hand: a Berth of its own, ROUNDS rounds ------------------------------------------------
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -uo pipefail
  rounds=${1:?usage: tests/e2e/durability.sh ROUNDS}
  # shellcheck source=tests/e2e/berth-home.sh
  . "$(dirname "${BASH_SOURCE[0]}")/berth-home.sh"
  berth_fresh_home berth-durability-home
  work=$(mktemp -d)
  trap 'berth stop > /dev/null 2>&1; rm -rf "$work"' EXIT
  berth config set cpus "$(berth_guest_cpus)" > /dev/null
  berth config set memory_mib 1024 > /dev/null
  berth start --timeout 300 --no-docker-context > /dev/null || { berth_show_logs; exit 1; }
  export DOCKER_HOST=unix://$BERTH_HOME/run/docker.sock
  mkdir -p "$work/rootfs/bin"
  cp /bin/busybox "$work/rootfs/bin/busybox"
  for applet in sh cat dd sleep; do ln -s busybox "$work/rootfs/bin/$applet"; done
  tar -C "$work/rootfs" -c . | docker import - berth-test/busybox:latest > /dev/null || exit 1
  durability_prepare || exit 1
  # back: waits for the VM to run again; five crashes in ten minutes leave it down
  # (recovery.rs), and then a start brings it back, as a user would.
  back() {
    local state
    sleep 2
    for _ in $(seq 600); do
      state=$(berth status --json | jq -r .state)
      [ "$state" = running ] && return 0
      [ "$state" = crashed ] && { echo "down after five crashes in ten minutes: berth start"; berth start --timeout 300 > /dev/null || return 1; }
      sleep 1
    done
    return 1
  }
  passed=0 failed_rounds=0
  for r in $(seq "$rounds"); do
    if out=$(durability_round "$r" back 2>&1); then passed=$((passed + 1)); echo "ok round $r"; else failed_rounds=$((failed_rounds + 1)); echo "FAIL round $r"; fi
    printf '%s\n' "$out" | sed 's/^/  | /'
  done
  berth stop > /dev/null
  if fsck=$(durability_fsck 2>&1); then echo "ok e2fsck -fn"; else echo "FAIL e2fsck -fn"; failed_rounds=$((failed_rounds + 1)); fi
  printf '%s\n' "$fsck" | sed 's/^/  | /'
  echo "durability: $passed of $rounds rounds kept every synced record"
  [ "$failed_rounds" = 0 ]
fi
