"""The tray menu as a person sees it, for a screenshot: with no StatusNotifierWatcher on the bus
the app's indicator (libayatana-appindicator) falls back to an XEmbed icon, as older panels
show them; trayer, an XEmbed system tray, holds it on the test's Xvfb display, a click on it
opens the menu that GTK draws, and the whole screen is grabbed (Pillow, over XCB).
Needs trayer and xdotool (Debian) and Pillow (PyPI; tests/setup.sh installs them)."""

import os
import re
import subprocess
import time

from PIL import ImageGrab


def _windows():
    """(id, name, x, y, width, height) of every window, from `xwininfo -root -tree`."""
    tree = subprocess.run(["xwininfo", "-root", "-tree"], capture_output=True, text=True, timeout=30).stdout
    found = []
    for line in tree.splitlines():
        m = re.match(r'\s*(0x[0-9a-f]+) (?:"([^"]*)"|\(has no name\)): .*?(\d+)x(\d+)[+-]-?\d+[+-]-?\d+\s+\+(-?\d+)\+(-?\d+)',
                     line)
        if m:
            wid, name, w, h, x, y = m.groups()
            found.append((wid, name or "", int(x), int(y), int(w), int(h)))
    return found


def _viewable(wid):
    info = subprocess.run(["xwininfo", "-id", wid], capture_output=True, text=True, timeout=30).stdout
    return "Map State: IsViewable" in info


def _wait(what, predicate, timeout):
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.2)


def menu_screenshot(tray, app_name, path, timeout=60):
    """Takes the tray away from `tray` (tray.Tray), screenshots the XEmbed icon's menu into
    `path`, and gives the tray back. Returns the menu window's geometry."""
    panel = subprocess.Popen(["trayer", "--edge", "top", "--align", "right", "--widthtype", "request",
                              "--height", "32", "--transparent", "false", "--SetDockType", "false"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        tray.leave()

        def icon():
            # The icon: the app's window embedded in trayer's panel (32 px high, right of x=0).
            return next(((x, y, w, h) for _id, name, x, y, w, h in _windows()
                         if name == app_name and 16 <= h <= 32 and y <= 2 and x > 0), None)
        x, y, w, h = _wait("the app's icon in the XEmbed tray", icon, timeout)
        subprocess.run(["xdotool", "mousemove", str(x + w // 2), str(y + h // 2), "click", "1"], check=True, timeout=30)

        def menu():
            # The menu: a window of the app's just below the panel, mapped (GTK keeps the window
            # of a menu shown before, unmapped).
            return next(((mx, my, mw, mh) for wid, name, mx, my, mw, mh in _windows()
                         if name == app_name and my >= y + h - 2 and mh > 60 and _viewable(wid)), None)
        geometry = _wait("the tray menu to open", menu, timeout)
        time.sleep(1)  # drawn
        ImageGrab.grab(xdisplay=os.environ.get("DISPLAY")).save(path)
        subprocess.run(["xdotool", "key", "Escape"], timeout=30)
        return geometry
    finally:
        panel.terminate()
        panel.wait(30)
        tray.come_back(timeout)
