"""A headless Debian ``chromium`` driven over the DevTools protocol, for tests that look at the UIs the
way a person does: load a page, let its JavaScript run, click a tab, read the rendered text, take a
screenshot. Only loopback pages; the flags keep Chromium off the (closed) network.

Example:
    >>> with Browser() as b:                                  # doctest: +SKIP
    ...     b.goto("http://127.0.0.1:4200/runs")
    ...     b.wait_for_text("Flow runs")
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

# Without the background-networking flags Chromium keeps dialling Google's hosts on a closed network.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
         "--hide-scrollbars")


def chromium_binary() -> str | None:
    """Path of the chromium binary, or None when none is installed."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


class Browser:
    """One headless Chromium with one page, driven through the DevTools websocket (``websockets``)."""

    def __init__(self, width: int = 1400, height: int = 900, start_timeout_s: float = 60.0) -> None:
        self.width, self.height, self.start_timeout_s = width, height, start_timeout_s
        self._ids = itertools.count(1)
        self.console: list[str] = []  # console messages and uncaught exceptions, as text

    def __enter__(self) -> Browser:
        from websockets.sync.client import connect

        binary = chromium_binary()
        if binary is None:
            raise FileNotFoundError("no chromium binary on PATH")
        self._profile = Path(tempfile.mkdtemp(prefix="chromium-"))
        self._proc = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={self._profile}", "--remote-debugging-port=0",
             f"--window-size={self.width},{self.height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            # its crash reports and caches follow $XDG_CONFIG_HOME / $XDG_CACHE_HOME: in the profile, not in ~
            env={**os.environ, "XDG_CONFIG_HOME": str(self._profile / "config"),
                 "XDG_CACHE_HOME": str(self._profile / "cache")})
        port_file = self._profile / "DevToolsActivePort"
        deadline = time.monotonic() + self.start_timeout_s
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self._ws = connect(page["webSocketDebuggerUrl"], max_size=64 * 2**20, open_timeout=30)
        for domain in ("Page.enable", "Runtime.enable"):
            self.send(domain)
        self.send("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                  deviceScaleFactor=1, mobile=False)
        return self

    def __exit__(self, *exc: Any) -> None:
        if getattr(self, "_ws", None) is not None:
            self._ws.close()
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        shutil.rmtree(self._profile, ignore_errors=True)

    def send(self, method: str, timeout_s: float = 60.0, **params: Any) -> dict[str, Any]:
        """One DevTools command; returns its result (events seen meanwhile feed ``console``)."""
        msg_id = next(self._ids)
        self._ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout_s
        while True:
            msg = json.loads(self._ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self._event(msg)

    def _event(self, msg: dict[str, Any]) -> None:
        if msg.get("method") == "Runtime.consoleAPICalled":
            args = msg["params"].get("args", [])
            self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
        elif msg.get("method") == "Runtime.exceptionThrown":
            d = msg["params"]["exceptionDetails"]
            self.console.append(str(d.get("exception", {}).get("description", d.get("text", ""))))

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        res = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression!r}: {res['exceptionDetails'].get('text')}")
        return res.get("result", {}).get("value")

    def goto(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def text(self) -> str:
        """The page's rendered text (``document.body.innerText``)."""
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for_text(self, needle: str, timeout_s: float = 60.0) -> str:
        """Wait until the rendered text contains ``needle``; returns the text (raises with it on timeout)."""
        deadline = time.monotonic() + timeout_s
        while True:
            text = self.text()
            if needle in text:
                return text
            if time.monotonic() > deadline:
                raise TimeoutError(f"{needle!r} not on the page after {timeout_s:.0f} s; it shows:\n{text[:3000]}")
            time.sleep(0.5)

    def click_text(self, label: str, selector: str = "button, a, [role=tab], .p-tab") -> None:
        """Click the first element matching ``selector`` whose trimmed text is ``label``."""
        found = self.evaluate(
            f"(() => {{ const el = [...document.querySelectorAll({json.dumps(selector)})]"
            f".find(e => e.innerText.trim() === {json.dumps(label)}); if (el) el.click(); return !!el; }})()")
        if not found:
            raise LookupError(f"no {selector!r} labelled {label!r} on the page")

    def screenshot(self, path: Path, full_page: bool = True) -> Path:
        """A PNG of the page (the whole scroll height when ``full_page``)."""
        params: dict[str, Any] = {"format": "png", "captureBeyondViewport": full_page}
        if full_page:
            h = int(self.evaluate("Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)")
                    or self.height)
            params["clip"] = {"x": 0, "y": 0, "width": self.width, "height": min(h, 6000), "scale": 1}
        data = self.send("Page.captureScreenshot", **params)["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path
