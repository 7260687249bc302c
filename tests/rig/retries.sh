# shellcheck shell=bash
# Sourced: the retry log, so that a run repeated for the rig's sake is never hidden. Three places
# repeat a run whose failure is the emulator's, not Berth's: tests/rig/run-in-rig.sh when the
# emulated test host died without the command's status, tests/tests/docker.rs and
# tests/run-tests.sh when the guest reset itself in the docker e2e or the docker benchmark. Each
# still warns on stderr; when $BERTH_RETRY_LOG names a file each also appends one line to it, and
# tests/run-tests.sh, which makes that file fresh for every run, prints them all at its end
# (berth_retry_summary) whether the suite passed or failed.
#
# One line per retry (tests/src/lib.rs `retry_line` writes the same):
#
#   KIND: WHAT, attempt N of at most M: EVIDENCE
#
# KIND is `guest reset` or `test-host death`; attempt N is the one that failed and is repeated.

# berth_retry_record KIND WHAT ATTEMPT LIMIT EVIDENCE: appends the retry's line to
# $BERTH_RETRY_LOG (nothing without it); fails, saying so, when the line cannot be written.
berth_retry_record() {
  [ -n "${BERTH_RETRY_LOG:-}" ] || return 0
  local line
  line=$(printf '%s: %s, attempt %s of at most %s: %s' "$1" "$2" "$3" "$4" "$5" | tr '\n\r\t' '   ')
  # One write of one short line to a file opened for appending: concurrent writers do not mix.
  if ! printf '%s\n' "$line" >> "$BERTH_RETRY_LOG"; then
    echo "retries: error: cannot record this retry in BERTH_RETRY_LOG=$BERTH_RETRY_LOG: $line" >&2
    return 1
  fi
}

# berth_plural N NOUN: "1 NOUN", "0 NOUNs", "2 NOUNs".
berth_plural() {
  if [ "$1" = 1 ]; then echo "1 $2"; else echo "$1 $2s"; fi
}

# berth_retry_summary PREFIX FILE: the count of each kind, zeros too (so that their absence shows),
# then each line of FILE.
berth_retry_summary() {
  local prefix=$1 file=$2 resets deaths line
  if [ ! -f "$file" ]; then
    echo "$prefix: the retry log $file is missing: how many runs were retried is unknown"
    return 1
  fi
  resets=$(grep -c '^guest reset: ' "$file" || true)
  deaths=$(grep -c '^test-host death: ' "$file" || true)
  echo "$prefix: retried $(berth_plural "$resets" 'guest reset'), $(berth_plural "$deaths" 'test-host death')"
  while IFS= read -r line; do echo "$prefix: retried $line"; done < "$file"
}

# berth_console_evidence FILE...: one line saying what the consoles show: the first line that
# reads like a kernel oops or panic in any of them, in order, else how each one ends.
berth_console_evidence() {
  local file line ends=() clean=(env LC_ALL=C tr -cd '\11\12\40-\176')
  local oops='Kernel panic|Oops|BUG:|int3: |general protection fault|double fault|Unable to handle|Fatal exception|soft lockup|hard LOCKUP|self-detected stall'
  for file in "$@"; do
    [ -f "$file" ] || continue
    line=$("${clean[@]}" < "$file" | grep -aE -m 1 "$oops" || true)
    if [ -n "$line" ]; then
      echo "$(basename "$file"): ${line:0:200}"
      return 0
    fi
  done
  for file in "$@"; do
    [ -f "$file" ] || continue
    line=$("${clean[@]}" < "$file" | grep -a '[^[:space:]]' | tail -n 1 || true)
    ends+=("$(basename "$file") ends: ${line:0:200}")
  done
  local joined="" end
  for end in "${ends[@]}"; do joined+="${joined:+; }$end"; done
  echo "${joined:-no console log}"
}
