"""A stand-in for Sentry: a real HTTP server on loopback that accepts sentry-sdk envelopes and records them.

sentry-sdk POSTs envelopes to `/api/<project>/envelope/`, gzip-compressed (brotli when the `brotli`
package is installed, decoded here when it is importable). An envelope is a JSON header line, then
pairs of an item header line and a payload (`length` bytes when the header says, else one line).
Every item is recorded with the decompressed body it came in, so a test can search the raw bytes.
"""

from __future__ import annotations

import gzip
import json
import re
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_PATH = re.compile(r"^/api/(?P<project>[^/]+)/envelope/?(?:\?.*)?$")


@dataclass(frozen=True)
class Item:
    """One envelope item: its header (type, length, ...) and its payload bytes."""

    headers: dict[str, Any]
    payload: bytes

    @property
    def type(self) -> str:
        """`event`, `check_in`, `session`, `client_report`, ..."""
        return str(self.headers.get("type", ""))

    def json(self) -> Any:
        """The payload parsed as JSON (every item sentry-sdk sends for events and check-ins is JSON)."""
        return json.loads(self.payload)


@dataclass(frozen=True)
class Envelope:
    """One POSTed envelope, decompressed."""

    project: str
    raw: bytes
    headers: dict[str, Any]
    items: list[Item] = field(default_factory=list)
    encoding: str = ""  # the Content-Encoding it came with
    received: float = field(default_factory=time.time)  # when it arrived, by this host's clock


def parse_envelope(body: bytes) -> tuple[dict[str, Any], list[Item]]:
    """Split an envelope into its header and items (the format of develop.sentry.dev, "Envelopes")."""
    end = body.find(b"\n")
    end = len(body) if end == -1 else end
    headers = json.loads(body[:end] or b"{}")
    items: list[Item] = []
    pos = end + 1
    while pos < len(body):
        end = body.find(b"\n", pos)
        end = len(body) if end == -1 else end
        line = body[pos:end]
        pos = end + 1
        if not line.strip():
            continue
        item_headers = json.loads(line)
        length = item_headers.get("length")
        if length is not None:
            payload = body[pos:pos + int(length)]
            pos += int(length)
            if body[pos:pos + 1] == b"\n":
                pos += 1
        else:
            end = body.find(b"\n", pos)
            end = len(body) if end == -1 else end
            payload = body[pos:end]
            pos = end + 1
        items.append(Item(item_headers, payload))
    return headers, items


def decode_body(body: bytes, encoding: str) -> bytes:
    """Undo the Content-Encoding sentry-sdk used."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    if encoding == "br":
        try:
            import brotli
        except ImportError:
            raise ValueError("brotli-encoded envelope but the brotli module is not importable") from None
        return bytes(brotli.decompress(body))
    raise ValueError(f"unknown Content-Encoding {encoding!r}")


class SentryServer:
    """Records every envelope item POSTed to it; `dsn()` gives the DSN that points the SDK here."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.envelopes: list[Envelope] = []
        self.errors: list[str] = []  # requests that were not a well-formed envelope
        self._changed = threading.Condition()
        self._server = ThreadingHTTPServer((host, 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="sentry-server",
                                        daemon=True)

    @property
    def port(self) -> int:
        """The free port the OS gave us."""
        return int(self._server.server_address[1])

    def dsn(self, project: str = "1", key: str = "public") -> str:
        """A DSN for a project on this server."""
        return f"http://{key}@127.0.0.1:{self.port}/{project}"

    def start(self) -> SentryServer:
        """Serve in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> SentryServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # ------------------------------------------------------------ what arrived

    def _record(self, envelope: Envelope | None, error: str | None) -> None:
        with self._changed:
            if envelope is not None:
                self.envelopes.append(envelope)
            if error is not None:
                self.errors.append(error)
            self._changed.notify_all()

    def items(self, type_: str | None = None, project: str | None = None) -> list[Item]:
        """Every item received so far, optionally of one type and one project."""
        with self._changed:
            return [item for env in self.envelopes if project is None or env.project == project
                    for item in env.items if type_ is None or item.type == type_]

    def events(self, project: str | None = None) -> list[dict[str, Any]]:
        """Every error/message event payload."""
        return [item.json() for item in self.items("event", project)]

    def check_ins(self, project: str | None = None) -> list[dict[str, Any]]:
        """Every Crons check-in payload."""
        return [item.json() for item in self.items("check_in", project)]

    def raw(self) -> bytes:
        """Every decompressed body received, concatenated: what a leak check searches."""
        with self._changed:
            return b"\n".join(env.raw for env in self.envelopes)

    def wait_for(self, condition: Callable[[], Any], timeout: float, what: str) -> Any:
        """Block until `condition()` is truthy (re-checked on each arrival); fail naming `what`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                value = condition()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    got = [(env.project, [i.type for i in env.items]) for env in self.envelopes]
                    raise AssertionError(f"timed out after {timeout}s waiting for {what}; received {got}, "
                                         f"errors {self.errors}")
                self._changed.wait(left)

    # ------------------------------------------------------------ HTTP

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                match = _PATH.match(self.path)
                body = self._read_body()
                if match is None:
                    server._record(None, f"unexpected path {self.path}")
                    self._answer(404, {"detail": "not an envelope endpoint"})
                    return
                encoding = self.headers.get("Content-Encoding", "")
                try:
                    raw = decode_body(body, encoding)
                    headers, items = parse_envelope(raw)
                except (ValueError, OSError, EOFError, zlib.error) as exc:
                    server._record(None, f"{self.path}: {exc.__class__.__name__}: {exc}")
                    self._answer(400, {"detail": str(exc)})
                    return
                server._record(Envelope(match["project"], raw, headers, items, encoding), None)
                self._answer(200, {"id": headers.get("event_id")})

            def _read_body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    chunks: list[bytes] = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_: Any) -> None:
                pass  # quiet: the test reads what was recorded

        return Handler
