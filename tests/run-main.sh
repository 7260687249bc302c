#!/usr/bin/env bash
# The main job on a fresh machine: builds what is missing (tests/setup.sh), then on the VM host
# (this machine with hardware KVM, else the nested rig) starts Berth and shows a container
# answering through a published port with a host folder shared into it, and seeing a host edit
# (tests/e2e/main-job.sh). Run as root (setup installs Debian packages and builds the image).
#
#   tests/run-main.sh
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${BERTH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/berth}
"$repo/tests/setup.sh" > /dev/null
# shellcheck source=/dev/null
. "$CACHE/env.sh"
if [ "$BERTH_RIG_MODE" = rig ]; then
  exec "$BERTH_RIG_RUN" --timeout 900 --name "main job" -- bash "$repo/tests/e2e/main-job.sh"
fi
exec timeout 900 bash "$repo/tests/e2e/main-job.sh"
