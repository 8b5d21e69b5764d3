"""A small headless-Chromium driver over the DevTools protocol, for tests that click.

No Playwright or Selenium: Chromium (Debian's `chromium`) is started with a DevTools port, and its
page is driven over a websocket with tornado's client (already a Fleet dependency). Clicks are real
mouse events at the element's centre and typing is real text input, so the page's own rules apply
(its CSP allows no script; forms post as a user's would). Page scripts are never run by the test.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from tests.conftest import IN_CI

TIMEOUT_S = 30.0
PHONE = (390, 844)  # CSS pixels of a common phone
DESKTOP = (1280, 900)


def chromium_binary() -> str:
    """Chromium's path (skipped locally when absent; a failure under CI)."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        if IN_CI:
            pytest.fail("chromium is required under CI=true (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return binary


class Browser:
    """One headless Chromium with one page."""

    def __init__(self, profile: Path, size: tuple[int, int] = DESKTOP, mobile: bool = False) -> None:
        """Start Chromium and open a blank page of `size` CSS pixels (`mobile`: a phone's viewport rules)."""
        self.loop = asyncio.new_event_loop()
        self.proc = subprocess.Popen(
            [chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync", "--no-proxy-server",
             "--remote-debugging-port=0", "--remote-allow-origins=*", f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.events: list[dict[str, Any]] = []
        self._next = 0
        try:
            port = self._devtools_port()
            page = next(t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", trust_env=False, timeout=10).json()
                        if t["type"] == "page")
            url = page["webSocketDebuggerUrl"]
            self.ws: WebSocketClientConnection = self._run(
                lambda: websocket_connect(url, max_message_size=256 * 1024 * 1024))
            for domain in ("Page", "DOM", "Runtime"):
                self.send(f"{domain}.enable")
            self.resize(size, mobile)
        except BaseException:
            self.close()
            raise

    def _devtools_port(self) -> int:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + TIMEOUT_S
        seen = b""
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            seen += line
            found = re.search(rb"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            if found:
                return int(found.group(1))
            if not line and self.proc.poll() is not None:
                break
        raise AssertionError(f"chromium did not open a DevTools port:\n{seen.decode(errors='replace')[-2000:]}")

    def _run(self, start: Callable[[], Awaitable[Any]]) -> Any:
        """Run what `start` begins on this browser's own event loop (tornado binds futures to the running loop)."""
        async def bounded() -> Any:
            return await asyncio.wait_for(start(), TIMEOUT_S)

        return self.loop.run_until_complete(bounded())

    # ------------------------------------------------------------ the protocol

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result (events that arrive meanwhile are kept)."""
        self._next += 1
        ident = self._next
        message = json.dumps({"id": ident, "method": method, "params": params})
        self._run(lambda: self.ws.write_message(message))
        while True:
            message = self._receive()
            if message.get("id") == ident:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return dict(message.get("result", {}))
            self.events.append(message)

    def _receive(self) -> dict[str, Any]:
        raw = self._run(self.ws.read_message)
        if raw is None:
            raise AssertionError("chromium closed the DevTools connection")
        return dict(json.loads(raw))

    def wait_event(self, method: str) -> dict[str, Any]:
        """Wait for an event (one that already arrived counts)."""
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            for index, event in enumerate(self.events):
                if event.get("method") == method:
                    del self.events[: index + 1]
                    return event
            self.events.append(self._receive())
        raise AssertionError(f"no {method} within {TIMEOUT_S}s")

    # ------------------------------------------------------------ what a user does

    def resize(self, size: tuple[int, int], mobile: bool = False) -> None:
        """The viewport, in CSS pixels."""
        self.send("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1],
                  deviceScaleFactor=2 if mobile else 1, mobile=mobile)

    def goto(self, url: str) -> None:
        """Open `url` and wait until it has loaded."""
        self.events.clear()
        self.send("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired")

    def _node(self, selector: str) -> int:
        root = self.send("DOM.getDocument", depth=0)["root"]["nodeId"]
        node = int(self.send("DOM.querySelector", nodeId=root, selector=selector)["nodeId"])
        if not node:
            raise AssertionError(f"no element matches {selector!r} on {self.url()}")
        return node

    def exists(self, selector: str) -> bool:
        """Whether an element matches `selector`."""
        root = self.send("DOM.getDocument", depth=0)["root"]["nodeId"]
        return bool(self.send("DOM.querySelector", nodeId=root, selector=selector)["nodeId"])

    def click(self, selector: str, navigates: bool = True) -> None:
        """A real left click at the element's centre; waits for the page it leads to."""
        node = self._node(selector)
        self.send("DOM.scrollIntoViewIfNeeded", nodeId=node)
        quad = self.send("DOM.getContentQuads", nodeId=node)["quads"][0]
        x, y = sum(quad[0::2]) / 4, sum(quad[1::2]) / 4
        self.events.clear()
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left",
                      clickCount=0 if kind == "mouseMoved" else 1)
        if navigates:
            self.wait_event("Page.loadEventFired")

    def type(self, selector: str, text: str) -> None:
        """Focus an input and type `text` into it."""
        self.send("DOM.focus", nodeId=self._node(selector))
        self.send("Input.insertText", text=text)

    def html(self) -> str:
        """The current document's HTML."""
        root = self.send("DOM.getDocument", depth=0)["root"]["nodeId"]
        return str(self.send("DOM.getOuterHTML", nodeId=root)["outerHTML"])

    def url(self) -> str:
        """Where the page is."""
        history = self.send("Page.getNavigationHistory")
        return str(history["entries"][history["currentIndex"]]["url"])

    def content_width(self) -> float:
        """How wide the page's content is, in CSS pixels (wider than the viewport: it scrolls sideways)."""
        return float(self.send("Page.getLayoutMetrics")["cssContentSize"]["width"])

    def screenshot(self, path: Path, whole: bool = True) -> Path:
        """The whole page as a PNG (`whole` False: what the first screen shows)."""
        size = self.send("Page.getLayoutMetrics")["cssContentSize" if whole else "cssVisualViewport"]
        width, height = size.get("width", size.get("clientWidth")), size.get("height", size.get("clientHeight"))
        shot = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=whole,
                         clip={"x": 0, "y": 0, "width": width, "height": height, "scale": 1})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def close(self) -> None:
        """Stop Chromium."""
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self.loop.close()

    def __enter__(self) -> Browser:
        """Use in a `with` block."""
        return self

    def __exit__(self, *_: object) -> None:
        """Stop on leaving the block."""
        self.close()
