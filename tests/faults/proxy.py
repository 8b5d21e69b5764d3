"""A TCP fault proxy: sits between Fleet and Redis or PostgreSQL and misbehaves on command.

Modes, switched by the test at any time (they apply to open connections too):
  pass       forward both ways
  latency    forward, each chunk delayed by `delay_s`
  blackhole  accept, never answer: bytes in either direction are held back, nothing is closed
  reset      close every connection with a RST and reset new ones at once
`vanish()` makes the server's host forget the open connections without a word (a crash, a power loss,
an address a failover moved to another host): they hear nothing until the client sends, which then
meets a RST; new connections pass as the mode says (the new primary answers).
A one-shot `cut_on(*patterns)` waits for the client to send each pattern in turn (say the
reservation's UPDATE, then b"COMMIT"), forwards the chunk with the last one and resets the
connection before the server's answer comes back: the statement was applied, the client sees an
error (an ambiguous commit).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from dataclasses import dataclass, field

PASS, LATENCY, BLACKHOLE, RESET = "pass", "latency", "blackhole", "reset"


@dataclass(eq=False)  # compared and hashed by identity: kept in a set
class _Pair:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    vanished: bool = False


class FaultProxy:
    """One listening port forwarding to `target`; run in a background thread of its own."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.mode = PASS
        self.delay_s = 0.0
        self._cut_patterns: list[bytes] = []
        self.cuts = 0  # how many connections a cut_on reset
        # Chunks forwarded client -> server: a client that waits for each answer sends at least one
        # per round trip, so a count over many calls tells how many round trips each took.
        self.upstream_chunks = 0
        self._pairs: set[_Pair] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self.port = 0

    # ------------------------------------------------------------ control (any thread)

    def start(self) -> FaultProxy:
        """Listen on a free loopback port."""
        self._thread.start()
        self._ready.wait(10)
        return self

    def set(self, mode: str, delay_s: float = 0.0) -> None:
        """Switch mode; `reset` also kills every open connection now."""
        self.mode, self.delay_s = mode, delay_s
        if mode == RESET:
            asyncio.run_coroutine_threadsafe(self._reset_all(), self._loop).result(5)

    def vanish(self) -> None:
        """The open connections' server is gone without a word: the next bytes from a client meet a RST."""
        for pair in list(self._pairs):
            pair.vanished = True

    def cut_on(self, *patterns: bytes) -> None:
        """Once the client has sent each pattern in turn, forward the last and reset (an ambiguous outcome)."""
        self._cut_patterns = list(patterns)

    def stop(self) -> None:
        """Close everything and stop the thread."""
        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._reset_all(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    # ------------------------------------------------------------ the loop

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            self._loop.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == RESET:
            _abort(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _abort(writer)
            return
        pair = _Pair(writer, up_writer)
        self._pairs.add(pair)
        pair.tasks = [asyncio.ensure_future(self._pump(reader, up_writer, pair, upstream=True)),
                      asyncio.ensure_future(self._pump(up_reader, writer, pair, upstream=False))]

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pair: _Pair,
                    upstream: bool) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                while self.mode == BLACKHOLE:
                    await asyncio.sleep(0.05)
                if self.mode == RESET or pair.vanished:
                    break  # closed with a RST both ways
                if self.mode == LATENCY and self.delay_s:
                    await asyncio.sleep(self.delay_s)
                writer.write(data)
                await writer.drain()
                self.upstream_chunks += upstream
                if upstream and self._cut_patterns and self._cut_patterns[0] in data:
                    self._cut_patterns.pop(0)
                    if not self._cut_patterns:
                        self.cuts += 1
                        break  # the statement went through; its answer never comes back
        except (ConnectionError, OSError):
            pass
        finally:
            self._close(pair)

    def _close(self, pair: _Pair) -> None:
        if pair in self._pairs:
            self._pairs.discard(pair)
            _abort(pair.client)
            _abort(pair.server)
            for task in pair.tasks:
                task.cancel()

    async def _reset_all(self) -> None:
        for pair in list(self._pairs):
            self._close(pair)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a RST (SO_LINGER 0), as a dropped connection looks to the peer."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(Exception):
        writer.transport.abort()
