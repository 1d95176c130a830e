"""A headless Chromium driven over the Chrome DevTools Protocol (CDP), for the web-page tests.

Debian's ``chromium`` package is the browser (``.ci/run`` installs it when missing); the protocol is
spoken with the ``websockets`` package, so nothing is downloaded. :func:`find_chromium` says why no
browser is usable (for the skip reason); :class:`Browser` starts one with a throw-away profile, opens
a page and lets the test run JavaScript, set files on ``<input type=file>`` elements, take
screenshots and see every URL the page requested.
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
import urllib.request
from pathlib import Path
from typing import Any

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--no-first-run",
    "--no-default-browser-check",
    "--mute-audio",
    "--remote-debugging-port=0",
)


def find_chromium() -> tuple[str | None, str]:
    """(path of a Chromium that starts, "") or (None, why not)."""
    candidates = [os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")]
    candidates += [shutil.which("chromium-browser")]
    for path in [c for c in candidates if c]:
        if not Path(path).is_file():
            continue
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"{path} does not start: {exc}"
        if out.returncode == 0:
            return path, ""
        return None, f"{path} --version failed: {out.stderr.strip()[:200]}"
    return None, "no Chromium found (Debian: apt-get install chromium; .ci/run installs it as root)"


class CDPError(RuntimeError):
    pass


class Browser:
    """``with Browser(path) as b: b.open(url); b.js("...")``: one headless tab."""

    def __init__(self, executable: str, width: int = 1280, height: int = 1100, timeout: float = 60) -> None:
        self.executable, self.size, self.timeout = executable, (width, height), timeout
        self.requests: list[str] = []  # every URL the page asked for
        self.events: list[dict] = []
        self._ids = itertools.count(1)

    # ------------------------------------------------------------------ start / stop
    def __enter__(self) -> Browser:
        from websockets.sync.client import connect

        self.profile = tempfile.mkdtemp(prefix="cdp-profile-")
        w, h = self.size
        cmd = [
            self.executable,
            *FLAGS,
            f"--user-data-dir={self.profile}",
            f"--window-size={w},{h}",
            "about:blank",
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.time() + self.timeout
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace")[-500:] if self.proc.stderr else ""
                raise CDPError(f"chromium exited with {self.proc.returncode}: {err}")
            if time.time() > deadline:
                self.close()
                raise CDPError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            pages = [t for t in json.load(r) if t.get("type") == "page"]
        self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=self.timeout)
        for domain in ("Page", "Runtime", "Network", "DOM"):
            self.send(f"{domain}.enable")
        return self

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
            self.ws = None
        if getattr(self, "proc", None) is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "proc", None) is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        shutil.rmtree(getattr(self, "profile", ""), ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ protocol
    def send(self, method: str, **params: Any) -> dict:
        """Call a CDP method and return its result (events that arrive meanwhile are recorded)."""
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.time() + self.timeout
        while True:
            left = deadline - time.time()
            if left <= 0:
                raise CDPError(f"no answer to {method} in {self.timeout} s")
            msg = json.loads(self.ws.recv(timeout=left))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise CDPError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)
                if msg["method"] == "Network.requestWillBeSent":
                    self.requests.append(msg["params"]["request"]["url"])

    def js(self, expression: str) -> Any:
        """Evaluate JavaScript in the page (promises awaited) and return its value."""
        res = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise CDPError(f"JavaScript failed: {res['exceptionDetails'].get('text')}: {expression[:200]}")
        return res["result"].get("value")

    def wait_for(self, expression: str, timeout: float, poll: float = 0.25) -> Any:
        """Poll ``expression`` until it is truthy; its value, or CDPError after ``timeout`` seconds."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(poll)
        raise CDPError(f"timed out after {timeout} s waiting for: {expression[:200]}")

    # ------------------------------------------------------------------ page actions
    def open(self, url: str, ready: str = "document.readyState === 'complete'", timeout: float = 60) -> None:
        self.send("Page.navigate", url=url)
        self.wait_for(ready, timeout)

    def set_files(self, selector: str, *paths: str | Path) -> None:
        """Put files on the ``<input type=file>`` matching ``selector`` (fires its change event)."""
        root = self.send("DOM.getDocument", depth=-1, pierce=True)["root"]["nodeId"]
        node = self.send("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        if not node:
            raise CDPError(f"no element matches {selector!r}")
        self.send("DOM.setFileInputFiles", nodeId=node, files=[str(Path(p).resolve()) for p in paths])

    def screenshot(self, path: str | Path, full_page: bool = True) -> Path:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            metrics = self.send("Page.getLayoutMetrics")["cssContentSize"]
            params |= {"captureBeyondViewport": True}
            params["clip"] = {
                "x": 0,
                "y": 0,
                "width": metrics["width"],
                "height": metrics["height"],
                "scale": 1,
            }
        data = self.send("Page.captureScreenshot", **params)["data"]
        path = Path(path)
        path.write_bytes(base64.b64decode(data))
        return path
