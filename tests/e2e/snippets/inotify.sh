# --- Change events (issue 10, item 6) ------------------------------------------------------
# To paste into tests/e2e/ports-shares.sh after the shares checks; uses its $work, $tree (the
# busybox image tree) and check(). A container watches a shared folder with inotifywait (the
# plain `-m -r`, and Node's fs.watch mask); the host creates, modifies, renames and deletes
# files; each event must reach the container within 500 ms (measured on the host, polling the
# watcher's log, which it writes to another shared folder), and the injection must leave the
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
# seen_within START_MS LOG PATTERN: PATTERN (an extended regex) appears in LOG within 500 ms
# of START_MS.
seen_within() {
  local start=$1 log=$2 pattern=$3 t
  while :; do
    t=$(now_ms)
    if grep -qE "$pattern" "$log"; then echo "$pattern in $(basename "$log") after $((t - start)) ms"; return 0; fi
    if [ $((t - start)) -gt 500 ]; then echo "no $pattern in $(basename "$log") within 500 ms:"; cat "$log"; return 1; fi
    sleep 0.02
  done
}
# host_action NAME PATTERN COMMAND...: runs COMMAND on the host, then both logs must show PATTERN.
host_action() {
  local name=$1 pattern=$2 start; shift 2
  start=$(now_ms)
  "$@"
  check "inotify-$name" bash -c "$(declare -f now_ms seen_within); seen_within $start '$iwlog/plain.log' '$pattern' && seen_within $start '$iwlog/node.log' '$pattern'"
}
# Identity of a file as a user sees it: size, mtime (ns), content hash.
ident() { stat -c '%s %y' "$1" && sha256sum < "$1" | cut -d' ' -f1; }

host_action create "^CREATE $watched/new\.txt\$" sh -c "echo one > '$watched/new.txt'"
# The edit, its identity at once (before the injection, which waits for the host's 75 ms
# window), then the event, then the identity again on the host and in the container.
before=$(ident "$watched/keep.txt")
start=$(now_ms)
echo more >> "$watched/keep.txt"
edited=$(ident "$watched/keep.txt")
check inotify-modify bash -c "$(declare -f now_ms seen_within); seen_within $start '$iwlog/plain.log' '^MODIFY $watched/keep\.txt\$' && seen_within $start '$iwlog/node.log' '^MODIFY $watched/keep\.txt\$'"
sleep 0.5
after=$(ident "$watched/keep.txt")
in_container=$(docker exec watcher sh -c "stat -c '%s %y' '$watched/keep.txt' && sha256sum < '$watched/keep.txt' | cut -d' ' -f1")
check inotify-modify-keeps-content-and-mtime sh -c "printf 'before the edit: %s\nafter it: %s\nafter the event: %s\nin the container: %s\n' '$before' '$edited' '$after' '$in_container'
  [ '$edited' = '$after' ] && [ '$after' = '$in_container' ] && [ '$edited' != '$before' ]"
host_action mkdir "^CREATE,ISDIR $watched/sub\$" mkdir "$watched/sub"
host_action create-in-new-dir "^CREATE $watched/sub/deep\.js\$" sh -c "echo x > '$watched/sub/deep.js'"
host_action rename-from "^MOVED_FROM $watched/keep\.txt\$" mv "$watched/keep.txt" "$watched/renamed.txt"
check inotify-rename-to sh -c "grep -E '^MOVED_TO $watched/renamed\.txt\$' '$iwlog/plain.log' && grep -E '^MOVED_TO $watched/renamed\.txt\$' '$iwlog/node.log'"
host_action delete "^DELETE $watched/renamed\.txt\$" rm "$watched/renamed.txt"
host_action attrib "^ATTRIB $watched/new\.txt\$" chmod 600 "$watched/new.txt"
# A save touching 2000 files: events arrive, bounded (file events, then directory events).
start=$(now_ms)
mkdir -p "$watched/bulk"
for i in $(seq 2000); do echo "$i" > "$watched/bulk/f$i"; done
sleep 2
check inotify-burst-bounded sh -c "n=\$(grep -c '$watched/bulk' '$iwlog/plain.log'); echo \"\$n events for 2000 files\"; [ \"\$n\" -gt 0 ] && [ \"\$n\" -lt 4000 ]"
check inotify-no-storm sh -c "a=\$(wc -l < '$iwlog/plain.log'); sleep 2; b=\$(wc -l < '$iwlog/plain.log'); echo \"\$a then \$b lines\"; [ \"\$a\" = \"\$b\" ]"
docker rm -f watcher >/dev/null 2>&1
