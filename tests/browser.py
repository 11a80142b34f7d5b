"""Open a page in headless Chromium as a person would, over the DevTools protocol (no extra package).

`open_page(path)` loads a local HTML file and returns what a person's browser
saw: console errors, every network request that was not the file itself or an
inline data: URI, and the result of a JavaScript expression evaluated on the page.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
    "--remote-allow-origins=*",
]
INSTALL_HINT = "no Chromium found: install it with `apt-get install -y chromium` (Debian; .ci/run does this in CI)"


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class _Session:
    def __init__(self, url: str):
        from websockets.sync.client import connect

        self.ws = connect(url, max_size=None, open_timeout=20)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, params: dict | None = None, timeout: float = 30) -> dict:
        self.next_id += 1
        ident = self.next_id
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)
        raise TimeoutError(method)

    def wait_for(self, event: str, timeout: float = 30) -> None:
        if any(e.get("method") == event for e in self.events):
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            self.events.append(message)
            if message.get("method") == event:
                return
        raise TimeoutError(event)


def open_page(
    path: Path, expression: str, width: int = 1280, height: int = 900, screenshot: Path | None = None
) -> dict:
    """{"console_errors", "requests" (other than the page and data: URIs), "value" of `expression`}."""
    binary = chromium()
    if binary is None:
        raise FileNotFoundError(INSTALL_HINT)
    page_url = Path(path).resolve().as_uri()
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        # Its own process group: Chromium's helpers (crashpad, zygotes) outlive the browser process
        # and go on writing into the profile unless the whole group is stopped.
        process = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + 30
            while not (port_file.exists() and port_file.read_text().strip()):
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("Chromium did not start its DevTools endpoint")
                time.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
                targets = [t for t in json.load(answer) if t.get("type") == "page"]
            session = _Session(targets[0]["webSocketDebuggerUrl"])
            for domain in ("Page", "Runtime", "Network", "Log"):
                session.call(f"{domain}.enable")
            session.call(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600},
            )
            session.call("Page.navigate", {"url": page_url})
            session.wait_for("Page.loadEventFired")
            value = session.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
            if screenshot is not None:
                full = session.call("Page.getLayoutMetrics")["cssContentSize"]
                shot = session.call(
                    "Page.captureScreenshot",
                    {
                        "format": "png",
                        "captureBeyondViewport": True,
                        "clip": {"x": 0, "y": 0, "width": width, "height": full["height"], "scale": 1},
                    },
                )
                import base64

                Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
            session.ws.close()
        finally:
            stop_group(process)
    finally:
        remove_profile(Path(profile))
    errors, requests = [], []
    for event in session.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append(json.dumps(params.get("args"))[:300])
        elif method == "Runtime.exceptionThrown":
            errors.append(json.dumps(params.get("exceptionDetails"))[:300])
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            errors.append(params["entry"].get("text", "")[:300])
        elif method == "Network.requestWillBeSent":
            url = params.get("request", {}).get("url", "")
            if url != page_url and not url.startswith("data:"):
                requests.append(url)
    return {"console_errors": errors, "requests": requests, "value": value.get("result", {}).get("value")}


def stop_group(process: subprocess.Popen) -> None:
    """Stop Chromium and every helper it started (its process group)."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        time.sleep(0.2)  # let helpers that got the same signal exit before the profile goes


def remove_profile(profile: Path) -> None:
    """Remove the profile folder, retrying while a late helper still writes into it."""
    for _ in range(20):
        try:
            shutil.rmtree(profile)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.25)
    shutil.rmtree(profile, ignore_errors=True)


# What the tests read off a page: images and whether they decoded, the headline, the leaderboard.
PAGE_FACTS = """(() => ({
  images: Array.from(document.images).map(i => ({complete: i.complete, width: i.naturalWidth})),
  accuracy: (document.getElementById('test-accuracy') || {}).textContent || null,
  accuracyValue: ((document.getElementById('test-accuracy') || {dataset: {}}).dataset || {}).value || null,
  leaderboardRows: document.querySelectorAll('table.leaderboard tbody tr').length,
  groupRows: document.querySelectorAll('table.groups tbody tr').length,
  overflowX: document.documentElement.scrollWidth > window.innerWidth + 1,
}))()"""
