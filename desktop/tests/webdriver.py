"""A small W3C WebDriver client (the standard library only) for the dashboard's tests: tauri-driver
speaks the W3C protocol and hands the session to WebKitWebDriver, which drives the app's webview."""

import base64
import http.client
import json
import sys
import time
import urllib.error
import urllib.request

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"


class WebDriverError(Exception):
    pass


class Session:
    def __init__(self, url, application, args=(), timeout=120):
        self.url = url.rstrip("/")
        caps = {"capabilities": {"alwaysMatch": {"tauri:options": {"application": application, "args": list(args)}}}}
        value = self._call("POST", "/session", caps, timeout=timeout)
        self.id = value["sessionId"]

    def _call(self, method, path, body=None, timeout=60):
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(1, 4):
            request = urllib.request.Request(self.url + path, data=data, method=method,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=timeout) as answer:
                    payload = json.loads(answer.read() or b"{}")
                return payload.get("value")
            except urllib.error.HTTPError as e:
                text = e.read().decode(errors="replace")
                raise WebDriverError(f"{method} {path}: {e.code} {text[:500]}") from None
            except (http.client.RemoteDisconnected, ConnectionResetError) as e:
                # tauri-driver forwards each request on a pooled connection to WebKitWebDriver,
                # which may have closed it meanwhile: the request never reached it, and
                # tauri-driver hangs up without an answer. Sent again, on a fresh connection.
                if attempt == 3:
                    raise
                print(f"webdriver: {method} {path}: {e!r}; sending it again", file=sys.stderr)
                time.sleep(0.5)

    def call(self, method, path, body=None, timeout=60):
        return self._call(method, f"/session/{self.id}{path}", body, timeout)

    def find(self, css):
        """The element matching css, or None."""
        try:
            found = self.call("POST", "/element", {"using": "css selector", "value": css})
        except WebDriverError as e:
            if "no such element" in str(e):
                return None
            raise
        return found[ELEMENT]

    def wait(self, what, predicate, timeout, every=0.25):
        """Waits until predicate() returns something true; returns it. On a timeout the error says
        what was waited for and what predicate saw last."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            try:
                last = predicate()
            except WebDriverError as e:
                last = e
                if "no such element" not in str(e) and "stale element" not in str(e):
                    raise
            if last and not isinstance(last, Exception):
                return last
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} did not happen within {timeout} s (last: {last!r})")
            time.sleep(every)

    def element(self, css, timeout=30):
        return self.wait(f"{css} to appear", lambda: self.find(css), timeout)

    def text(self, css):
        el = self.find(css)
        return None if el is None else self.call("GET", f"/element/{el}/text")

    def content(self, css):
        """The element's textContent: all of its text, also what its box clips (WebDriver's text
        is what is rendered, and an ellipsised line can read as empty)."""
        return self.script("const e = document.querySelector(arguments[0]); return e ? e.textContent : null;", css)

    def texts(self, css):
        """The text of every element matching css, in document order."""
        found = self.call("POST", "/elements", {"using": "css selector", "value": css})
        return [self.call("GET", f"/element/{el[ELEMENT]}/text") for el in found]

    def attribute(self, css, name):
        el = self.find(css)
        return None if el is None else self.call("GET", f"/element/{el}/attribute/{name}")

    def enabled(self, css):
        el = self.find(css)
        return el is not None and self.call("GET", f"/element/{el}/enabled")

    def displayed(self, css):
        el = self.find(css)
        return el is not None and self.call("GET", f"/element/{el}/displayed")

    def click(self, css, timeout=30):
        el = self.wait(f"{css} to be clickable", lambda: self.enabled(css) and self.find(css), timeout)
        self.call("POST", f"/element/{el}/click", {})

    def type(self, css, text):
        el = self.element(css)
        self.call("POST", f"/element/{el}/clear", {})
        if text:  # WebKitWebDriver refuses an empty text: clearing was all
            self.call("POST", f"/element/{el}/value", {"text": text})

    def script(self, source, *args):
        return self.call("POST", "/execute/sync", {"script": source, "args": list(args)})

    def screenshot(self, path):
        png = base64.b64decode(self.call("GET", "/screenshot"))
        with open(path, "wb") as f:
            f.write(png)
        return path

    def close(self):
        try:
            self._call("DELETE", f"/session/{self.id}", timeout=30)
        except Exception:  # the app may be gone already
            pass
