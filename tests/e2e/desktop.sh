#!/usr/bin/env bash
# The desktop app (desktop/) end to end on a VM host (this machine with hardware KVM, else the
# nested rig's test host): the real app under Xvfb and a session bus of its own, driven through
# WebDriver and through its tray menu over D-Bus (desktop/tests/ui_test.py), against a real
# Berth started from the window. Prints `ok NAME` / `FAIL NAME` per step for
# tests/tests/desktop.rs; the screenshots go to $BERTH_ARTIFACTS/desktop/TIME/ (said at the end).
# Needs the BERTH_* variables of tests/setup.sh.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/e2e/berth-home.sh
. "$here/berth-home.sh"

for v in BERTH_DESKTOP BERTH_TAURI_DRIVER BERTH_DESKTOP_PYTHON BERTH_ARTIFACTS BERTH_VMM; do
  [ -n "${!v:-}" ] || { echo "FAIL setup ($v is not set: run tests/setup.sh)"; exit 1; }
done
berth_fresh_home berth-e2e-desktop
export XDG_CONFIG_HOME=$BERTH_HOME/xdg-config XDG_CACHE_HOME=$BERTH_HOME/xdg-cache
cat > "$BERTH_CONFIG" <<CONF
cpus = $(berth_guest_cpus)
memory_mib = 1024
CONF
export BERTH_E2E_SHOTS=$BERTH_ARTIFACTS/desktop/$(date -u +%Y%m%dT%H%M%SZ)

# The container's image, made offline: busybox-static serving one page.
tree=$BERTH_HOME/image-tree
mkdir -p "$tree/bin" "$tree/www"
cp /bin/busybox "$tree/bin/busybox"
echo "hello-from-the-desktop-test" > "$tree/www/index.html"
export BERTH_E2E_IMAGE_TREE=$tree
# The docker CLI the test drives, on Berth's socket (the app's `berth start` sets a context too).
export DOCKER_HOST=unix://$BERTH_HOME/run/docker.sock

# Under the rig's emulation WebKit's GL compositing (Mesa's llvmpipe, whose generated code QEMU
# runs) draws garbled glyphs and blank boxes in the screenshots; without it the pages render as
# they do on this machine.
[ "${BERTH_IN_RIG:-0}" = 1 ] && export WEBKIT_DISABLE_COMPOSITING_MODE=1

status=0
xvfb-run -a -s "-screen 0 1280x800x24" dbus-run-session -- \
  "$BERTH_DESKTOP_PYTHON" "$here/../../desktop/tests/ui_test.py" 2> "$BERTH_HOME/ui-test.stderr" || status=$?
if [ "$status" != 0 ]; then
  echo "desktop: the UI test failed (status $status); its stderr (WebKit, tauri-driver, the app):"
  grep -v -e 'dbus-daemon' -e 'portal' -e 'pw.conf' -e '^$' "$BERTH_HOME/ui-test.stderr" | tail -n 80 | sed 's/^/  | /'
  berth_show_logs
  berth_report_guest_reset e2e
fi
berth stop > /dev/null 2>&1
mkdir -p "$BERTH_E2E_SHOTS" && cp "$BERTH_HOME/ui-test.stderr" "$BERTH_E2E_SHOTS/"
echo "desktop: screenshots in $BERTH_E2E_SHOTS: $(cd "$BERTH_E2E_SHOTS" 2>/dev/null && echo *.png)"
exit "$status"
