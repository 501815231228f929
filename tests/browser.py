"""Load a page in headless Chromium and collect what its console says, over the DevTools protocol.

Chromium's ``--remote-debugging-pipe`` speaks the protocol as NUL-terminated JSON on file
descriptors 3 (commands in) and 4 (replies and events out), so no websocket client or browser
driver package is needed. Used by the report test: the page must load with no console error,
no uncaught exception and no failed resource.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

CANDIDATES = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome", "headless_shell")


def find_chromium() -> str | None:
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


class _Pipe:
    def __init__(self, exe: str, profile: str):
        self.to_chrome_r, self.to_chrome_w = os.pipe()
        self.from_chrome_r, self.from_chrome_w = os.pipe()

        def wire():  # in the child, before exec: the protocol's fds are 3 and 4
            os.dup2(self.to_chrome_r, 3)
            os.dup2(self.from_chrome_w, 4)

        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
             f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=wire, pass_fds=(3, 4))
        os.close(self.to_chrome_r)
        os.close(self.from_chrome_w)
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.to_chrome_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        for i, event in enumerate(self.events):
            if event.get("method") == method:
                return self.events.pop(i)
        while True:
            event = self._read(deadline)
            if event.get("method") == method:
                return event
            self.events.append(event)

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.from_chrome_r], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self.from_chrome_r, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(raw)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        for fd in (self.to_chrome_w, self.from_chrome_r):
            os.close(fd)


def load_page(page: Path, *, screenshot: Path | None = None, width: int = 1280) -> dict:
    """Open ``page`` (a local file) and return its console problems, title and body text.

    ``problems`` lists console.error/assert calls, uncaught exceptions and browser log entries of
    level error (e.g. a resource that failed to load); ``screenshot`` saves a full-page PNG.
    """
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("no Chromium found (" + ", ".join(CANDIDATES) + ")")
    with tempfile.TemporaryDirectory(prefix="edgeq-chromium-") as profile:
        pipe = _Pipe(exe, profile)
        try:
            targets = pipe.send("Target.getTargets")["targetInfos"]
            target = next(t["targetId"] for t in targets if t["type"] == "page")
            session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                pipe.send(f"{domain}.enable", session=session)
            pipe.send("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=session)
            pipe.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
            pipe.wait_event("Page.loadEventFired")
            time.sleep(0.5)  # late console messages and log entries
            pipe.send("Runtime.evaluate", {"expression": "1"}, session=session)  # flushes pending events
            problems = []
            for event in pipe.events:
                method, params = event.get("method"), event.get("params", {})
                if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                    problems.append("console." + params["type"] + ": " + " ".join(
                        str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
                elif method == "Runtime.exceptionThrown":
                    details = params.get("exceptionDetails", {})
                    problems.append("uncaught: " + str(details.get("exception", {}).get("description", details.get("text"))))
                elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                    entry = params["entry"]
                    problems.append(f"log: {entry.get('text')} {entry.get('url', '')}".strip())
            evaluate = lambda expr: pipe.send("Runtime.evaluate", {"expression": expr, "returnByValue": True},  # noqa: E731
                                              session=session)["result"].get("value")
            result = {"problems": problems, "title": evaluate("document.title"),
                      "text": evaluate("document.body.innerText"),
                      "svg_count": evaluate("document.querySelectorAll('svg').length"),
                      "size": evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")}
            if screenshot is not None:
                shot = pipe.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                                 session=session)
                screenshot.write_bytes(base64.b64decode(shot["data"]))
            return result
        finally:
            pipe.close()
