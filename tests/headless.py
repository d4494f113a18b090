"""A headless Chromium driven over the DevTools protocol on a pipe: enough to load a page, run JS and read the console.

Why a pipe (``--remote-debugging-pipe``): it needs no port, no websocket client and no extra package, only the
``chromium`` binary (Debian's package) and the standard library. Messages are JSON, NUL-terminated, on fds 3 (to the
browser) and 4 (from it). Used by the browser tests and by ``benchmarks/explorer.py``.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_browser() -> str | None:
    """The first Chromium on PATH (``MONOMOD_CHROMIUM`` overrides), or None."""
    named = os.environ.get("MONOMOD_CHROMIUM")
    if named:
        return shutil.which(named) or (named if Path(named).exists() else None)
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


class Chromium:
    """One headless browser with one page; ``load`` a file, ``eval`` JS, read ``console_errors``."""

    def __init__(self, width: int = 1400, height: int = 900, binary: str | None = None, args: tuple[str, ...] = ()) -> None:
        binary = binary or find_browser()
        if binary is None:
            raise RuntimeError("no Chromium found (apt-get install chromium)")
        self._profile = tempfile.mkdtemp(prefix="monomod-chromium-")
        to_child, self._write = os.pipe()
        self._read, from_child = os.pipe()
        args = [binary, "--headless=new", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                f"--user-data-dir={self._profile}", f"--window-size={width},{height}", *args, "about:blank"]

        def wire_fds() -> None:  # every other fd of ours is close-on-exec; dup2 onto itself keeps that flag
            high = os.dup(to_child), os.dup(from_child)
            for fd, target in zip(high, (3, 4)):
                os.dup2(fd, target)
                os.set_inheritable(target, True)

        self._proc = subprocess.Popen(args, close_fds=False, preexec_fn=wire_fds,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        self.session = self._attach()
        for domain in ("Page.enable", "Runtime.enable", "Log.enable"):
            self.send(domain)
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def _attach(self) -> str:
        targets = self.send("Target.getTargets", session=None)["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        return self.send("Target.attachToTarget", session=None, targetId=page["targetId"], flatten=True)["sessionId"]

    def send(self, method: str, session: str | None | bool = True, timeout: float = 60, **params: Any) -> dict[str, Any]:
        """Call one protocol method and wait for its answer (events that arrive meanwhile are kept)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session is True:
            message["sessionId"] = self.session
        elif session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the pipe")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def load(self, path: str | Path, timeout: float = 60) -> None:
        """Open a file (or a file:, http: or about: URL) and wait for its load event."""
        self.events.clear()
        url = str(path) if str(path).startswith(("http:", "file:", "about:")) else Path(path).resolve().as_uri()
        self.send("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(self._receive(deadline))

    def eval(self, expression: str, timeout: float = 60) -> Any:
        """The value of a JS expression (promises awaited); a thrown error raises here."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True, timeout=timeout)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JS error: {result['exceptionDetails'].get('exception', {}).get('description')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"never true: {expression}")

    def console_errors(self) -> list[str]:
        """Uncaught exceptions, console.error calls and error log entries since the last load."""
        self.send("Runtime.evaluate", expression="0")  # flush pending events
        errors = []
        for e in self.events:
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.exceptionThrown":
                errors.append(params["exceptionDetails"].get("exception", {}).get("description", "exception"))
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                errors.append(params["entry"].get("text", ""))
        return errors

    def screenshot(self, path: str | Path) -> None:
        data = self.send("Page.captureScreenshot", format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.send("Browser.close", session=None, timeout=5)
        except Exception:  # noqa: BLE001 - closing is best effort; the process is killed below anyway
            pass
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        os.close(self._write)
        os.close(self._read)
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
