"""The desktop app driven like a person, against a real Berth: tests/e2e/desktop.sh runs this under
Xvfb and a session bus of its own, on the VM host (the nested rig's test host here), with a fresh
BERTH_HOME in which Berth is not running yet.

The window through WebDriver (tauri-driver and Debian's WebKitWebDriver): Start clicked, "running"
awaited; a container started with the docker CLI appears with its published port; it is stopped
from the window; a setting is changed there and found in the config file. The tray through
D-Bus, as a desktop shell drives it (tray.py): the menu's items and which are enabled per state,
a click on Settings… that the window follows, and a stop made with the `berth` CLI showing in
the menu, timed against the host proxy's own time stamp of the change.

Prints `ok NAME (N s)` or `FAIL NAME (...)` per step, with indented details, for
tests/tests/desktop.rs; screenshots go to $BERTH_E2E_SHOTS."""

import json
import os
import re
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tray import Tray  # noqa: E402
from webdriver import Session  # noqa: E402

APP = os.environ["BERTH_DESKTOP"]
DRIVER = os.environ["BERTH_TAURI_DRIVER"]
SHOTS = os.environ["BERTH_E2E_SHOTS"]
CONFIG = os.environ["BERTH_CONFIG"]
IMAGE_TREE = os.environ["BERTH_E2E_IMAGE_TREE"]
# Under the rig's emulation a Berth start takes a minute or two, WebKit seconds per step.
BOOT = 420
PORT = 18090

failed = False


def step(name, fn):
    """Runs one step; a failure is reported and ends the test (later steps depend on it)."""
    global failed
    started = time.monotonic()
    try:
        detail = fn()
    except Exception as e:  # noqa: BLE001 (each step's failure is reported, whatever it is)
        print(f"FAIL {name} ({time.monotonic() - started:.0f} s)")
        for line in (str(e) + "\n" + traceback.format_exc()).splitlines():
            print(f"  | {line}")
        failed = True
        raise SystemExit(1)
    print(f"ok {name} ({time.monotonic() - started:.0f} s)")
    for line in str(detail or "").splitlines():
        print(f"  | {line}")
    sys.stdout.flush()


def sh(*args, check=True, input=None):
    done = subprocess.run(args, capture_output=True, text=True, input=input, timeout=300)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: exit {done.returncode}\n{done.stdout}{done.stderr}")
    return done.stdout.strip()


def status():
    out = subprocess.run(["berth", "status", "--json"], capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout) if out.returncode == 0 else None


def menu_state(tray):
    items = tray.menu()
    enabled = {i["label"]: i["enabled"] for i in items if not i["separator"]}
    return items[0]["label"], enabled


def main():
    os.makedirs(SHOTS, exist_ok=True)
    tray = Tray()
    driver = subprocess.Popen([DRIVER, "--native-driver", "/usr/bin/WebKitWebDriver", "--port", "4444"],
                              stdout=subprocess.DEVNULL, stderr=sys.stderr)
    time.sleep(1)
    s = None
    try:
        def open_dashboard():
            nonlocal s
            s = Session("http://127.0.0.1:4444", APP, timeout=300)
            state = s.wait("the dashboard's state", lambda: s.text("#state") in ("absent", "stopped") and s.text("#state"), 120)
            assert s.enabled("#btn-start") and not s.enabled("#btn-stop"), "Start only, while Berth is not running"
            return f"state {state!r}, reason {s.text('#reason')!r}"
        step("dashboard-opens", open_dashboard)

        def tray_menu_stopped():
            name, path = tray.wait_item(60)
            label, enabled = menu_state(tray)
            items = [i["label"] or "----" for i in tray.menu()]
            assert label == "Berth is not running", label
            assert enabled["Start"] and not enabled["Stop"] and not enabled["Restart"], enabled
            for item in ("Open Dashboard", "Settings…", "Open Logs", "Quit"):
                assert enabled.get(item), f"{item} missing or disabled: {enabled}"
            return f"item {path} on {name}\nmenu: " + " | ".join(items)
        step("tray-menu-not-running", tray_menu_stopped)

        def start_from_window():
            s.click("#btn-start")
            s.wait("the dashboard to say running", lambda: s.text("#state") == "running", BOOT)
            st = status()
            assert st and st["state"] == "running", st
            return f"berth status: {st['state']} ({st['reason']})"
        step("start-clicked-running", start_from_window)

        def tray_menu_running():
            label, enabled = tray.wait_item(5) and menu_state(tray)
            assert label.startswith("Berth is running"), label
            assert not enabled["Start"] and enabled["Stop"] and enabled["Restart"], enabled
            return f"menu first line {label!r}; icon {tray.item()['IconName']}"
        step("tray-menu-running", tray_menu_running)

        def container_from_cli_listed():
            sh("sh", "-c", f"tar -C '{IMAGE_TREE}' -c . | docker import - berth-test/desktop-web:latest")
            sh("docker", "run", "-d", "--name", "ui-web", "-p", f"{PORT}:80", "berth-test/desktop-web",
               "busybox", "httpd", "-f", "-p", "80", "-h", "/www")
            s.click("#tab-containers")
            row = 'tr[data-name="ui-web"]'
            s.wait("ui-web to be listed as running", lambda: s.attribute(row, "data-state") == "running", 60)
            link = s.wait("its port link", lambda: s.attribute(f'{row} a.port-link', "data-url"), 30)
            assert link == f"http://localhost:{PORT}", link
            text = s.text(f"{row} a.port-link")
            page = sh("curl", "-sS", "--max-time", "20", f"http://127.0.0.1:{PORT}/")
            s.screenshot(os.path.join(SHOTS, "dashboard-running.png"))
            return f"row: {s.text(row)!r}\nlink {link} ({text!r}) answers {page!r}"
        step("cli-container-listed-with-port", container_from_cli_listed)

        def stop_from_window():
            row = 'tr[data-name="ui-web"]'
            s.click(f'{row} button[data-action="stop"]')
            s.wait("ui-web to show exited", lambda: s.attribute(row, "data-state") == "exited", 120)
            running = sh("docker", "inspect", "-f", "{{.State.Running}}", "ui-web")
            assert running == "false", running
            return f"docker inspect: running={running}; row: {s.text(row)!r}"
        step("container-stopped-from-window", stop_from_window)

        def setting_changed():
            s.click("#tab-settings")
            s.wait("the settings form", lambda: s.attribute("#set-memory", "value"), 30)
            s.type("#set-memory", "1536")
            s.click("#settings-save")
            message = s.wait("the save's message", lambda: s.text("#settings-message"), 30)
            assert s.displayed("#restart-prompt"), "a restart-to-apply prompt while the VM runs"
            with open(CONFIG) as f:
                config = f.read()
            assert re.search(r"^memory_mib = 1536$", config, re.M), config
            s.type("#set-cpus", "zero")
            s.click("#settings-save")
            error = s.wait("the bad value's error", lambda: "cpus" in (s.text("#settings-message") or "") and s.text("#settings-message"), 30)
            with open(CONFIG) as f:
                assert f.read() == config, "a bad value changes nothing"
            s.screenshot(os.path.join(SHOTS, "dashboard-settings.png"))
            return f"saved: {message!r}\nbad cpus: {error!r}\nconfig file:\n{config}"
        step("setting-saved-to-config-file", setting_changed)

        def tray_opens_settings():
            s.click("#tab-overview")
            s.wait("the overview", lambda: s.displayed("#view-overview"), 30)
            tray.click("Settings…")
            s.wait("the tray's Settings… to show the settings view", lambda: s.displayed("#view-settings"), 30)
            return "the dashboard switched to its settings view"
        step("tray-settings-clicked", tray_opens_settings)

        def cli_stop_shows_in_tray():
            cli = subprocess.Popen(["berth", "stop"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            seen = s.wait("the tray to say stopping",
                          lambda: menu_state(tray)[0].startswith("Berth is stopping") and time.time(), 120, every=0.05)
            st = status()
            since = st["since_ms"] / 1000 if st and st["state"] == "stopping" else None
            label, enabled = menu_state(tray)
            assert not (enabled["Start"] or enabled["Stop"] or enabled["Restart"]), enabled
            out, _ = cli.communicate(timeout=300)
            assert cli.returncode == 0, out
            s.wait("the dashboard to say absent", lambda: s.text("#state") == "absent", 60)
            label, enabled = s.wait("the tray to say not running",
                                    lambda: menu_state(tray)[0].startswith("Berth is not running") and menu_state(tray), 60)
            assert enabled["Start"] and not enabled["Stop"], enabled
            lag = f"{seen - since:.2f} s after the host proxy's change" if since else "(the state moved on before it was read)"
            return f"tray said stopping {lag}, nothing enabled meanwhile; then {label!r} with Start enabled"
        step("cli-stop-shows-in-tray", cli_stop_shows_in_tray)
    finally:
        if s is not None:
            s.close()
        driver.terminate()


if __name__ == "__main__":
    main()
    sys.exit(1 if failed else 0)
