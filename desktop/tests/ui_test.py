"""The desktop app driven like a person, against a real Berth: tests/e2e/desktop.sh runs this under
Xvfb and a session bus of its own, on the VM host (the nested rig's test host here), with a fresh
BERTH_HOME in which Berth is not running yet.

The window through WebDriver (tauri-driver and Debian's WebKitWebDriver): Start clicked, "running"
awaited; a container started with the docker CLI appears with its published port; it is stopped
from the window; a setting is changed there and found in the config file. The tray through
D-Bus, as a desktop shell drives it (tray.py): the menu's items and which are enabled per state,
a click on Settings… that the window follows, and a stop made with the `berth` CLI showing in
the menu, timed against the host proxy's own time stamp of the change; the menu as GTK draws it,
screenshotted in an XEmbed tray (xtray.py). The VMM killed with SIGKILL: the window and the tray
say Berth restarts after a crash, then it runs again.

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
import xtray  # noqa: E402

APP = os.environ["BERTH_DESKTOP"]
# The app's X windows are named after its executable.
APP_NAME = os.path.basename(APP)
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
            return f"state {state!r}, reason {s.content('#reason')!r}"
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
            # What Berth holds on the host: the host proxy, passt and the VMM, by name.
            rss = s.wait("the host processes' memory", lambda: "berth-vmm" in (s.content("#rss-processes") or "")
                         and s.content("#rss-processes"), 60)
            for name in ("berth-host-proxy", "passt"):
                assert name in rss, rss
            return f"berth status: {st['state']} ({st['reason']})\n{rss}"
        step("start-clicked-running", start_from_window)

        def tray_menu_running():
            label, enabled = tray.wait_item(5) and menu_state(tray)
            assert label.startswith("Berth is running"), label
            assert not enabled["Start"] and enabled["Stop"] and enabled["Restart"], enabled
            icon = tray.item()["IconName"]
            shot = os.path.join(SHOTS, "tray-menu-running.png")
            geometry = xtray.menu_screenshot(tray, APP_NAME, shot)
            label, _ = menu_state(tray)
            assert label.startswith("Berth is running"), f"after the screenshot: {label}"
            return f"menu first line {label!r}; icon {icon}\nscreenshot of the menu (XEmbed fallback) at {geometry}"
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
            # From the default shared folders to none, and back.
            s.type("#set-cpus", re.search(r"^cpus = (\d+)$", config, re.M).group(1))
            defaults = s.attribute("#set-shares", "value")
            assert defaults and not s.displayed("#shares-use-default"), (defaults, "the defaults are in the field")
            s.type("#set-shares", "")
            s.click("#settings-save")
            s.wait("the Use the defaults button", lambda: s.displayed("#shares-use-default"), 30)
            with open(CONFIG) as f:
                nothing = f.read()
            assert re.search(r"^shares = \[\]$", nothing, re.M), nothing
            s.click("#shares-use-default")
            s.wait("the defaults back in the field", lambda: s.attribute("#set-shares", "value") == defaults, 30)
            with open(CONFIG) as f:
                back = f.read()
            assert "shares" not in back, back
            return (f"saved: {message!r}\nbad cpus: {error!r}\nconfig file:\n{config}\n"
                    f"shares: the defaults {defaults!r}, cleared: 'shares = []' in the file, 'Use the defaults': no shares key")
        step("setting-saved-to-config-file", setting_changed)

        def tray_opens_settings():
            s.click("#tab-overview")
            s.wait("the overview", lambda: s.displayed("#view-overview"), 30)
            tray.click("Settings…")
            s.wait("the tray's Settings… to show the settings view", lambda: s.displayed("#view-settings"), 30)
            return "the dashboard switched to its settings view"
        step("tray-settings-clicked", tray_opens_settings)

        def vmm_killed_app_says_restarting():
            s.click("#tab-overview")
            pid = status()["vmm_pid"]
            os.kill(pid, 9)
            reason = s.wait("the dashboard to say Berth restarts after a crash",
                            lambda: s.text("#state") == "starting" and "restarting after a crash" in s.content("#reason")
                            and s.content("#reason"), 60, every=0.2)
            title = s.wait("the problem box", lambda: s.displayed("#problem") and s.text("#problem-title"), 30)
            assert title == "Berth's VM crashed and is starting again", title
            detail = s.content("#problem-detail")
            buttons = s.texts("#problem-actions button")
            label, enabled = menu_state(tray)
            assert label.startswith("Berth is starting: restarting after a crash (the VMM was killed by signal 9)"), label
            assert not enabled["Start"] and enabled["Stop"], enabled
            xtray.menu_screenshot(tray, APP_NAME, os.path.join(SHOTS, "tray-menu-crash-restarting.png"))
            s.screenshot(os.path.join(SHOTS, "dashboard-crash-restarting.png"))
            s.wait("the dashboard to say running again", lambda: s.text("#state") == "running", BOOT)
            s.wait("the problem box to go", lambda: not s.displayed("#problem"), 30)
            return (f"killed the VMM {pid}; the dashboard said {reason!r}\nproblem: {title!r}: {detail!r}, "
                    f"buttons {buttons}\ntray: {label!r}\nthen running again, the problem box gone")
        step("vmm-killed-app-says-restarting", vmm_killed_app_says_restarting)

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
