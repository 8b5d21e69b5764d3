"""Private servers a fault test may hurt: a PostgreSQL cluster of its own (initdb as `postgres`, its
own port and socket folder) that can be restarted with `-m immediate` or frozen with SIGSTOP.
The shared services on 5432 and 6379 are never touched. And a clock a worker may be given instead of
the host's (clockshift.c, preloaded).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, text

from fleet.embedded import free_port


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise FileNotFoundError(f"PostgreSQL's {name} is not installed")
    return found[-1]


def pg_available() -> bool:
    """Whether a private cluster can be made here (the server binaries and a `postgres` user)."""
    try:
        _pg_bin("initdb")
    except FileNotFoundError:
        return False
    return subprocess.run(["id", "postgres"], capture_output=True).returncode == 0


class PrivateCluster:
    """A throwaway PostgreSQL cluster on 127.0.0.1:PORT, trust auth, owned by the `postgres` user."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="fleet-pg-"))
        self.data, self.sockets = self.root / "data", self.root / "run"
        self.port = free_port()
        self.sockets.mkdir()
        shutil.chown(self.root, "postgres")
        shutil.chown(self.sockets, "postgres")
        os.chmod(self.root, 0o755)

    @property
    def admin_url(self) -> str:
        """The server URL without a database."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}"

    def _as_postgres(self, *argv: str) -> None:
        subprocess.run(["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--", *argv],
                       check=True, capture_output=True, cwd=self.root)

    def init(self) -> PrivateCluster:
        """initdb and start."""
        self._as_postgres(_pg_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.start()
        return self

    def start(self) -> None:
        """Start (again) on the same port and data."""
        options = (f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c max_connections=200")
        self._as_postgres(_pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-o", options,
                          "-w", "-t", "30", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop: `immediate` is a crash (no checkpoint), as a power cut or an OOM kill of the server."""
        if (self.data / "postmaster.pid").exists():
            self._as_postgres(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")

    def restart_immediately(self) -> None:
        """Crash and come back: every connection is dropped, committed work survives."""
        self.stop("immediate")
        self.start()

    def postmaster_pid(self) -> int:
        """The server's main process."""
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def freeze(self) -> None:
        """SIGSTOP the whole server: connections stay open and nothing answers."""
        for pid in self._server_pids():
            os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT what freeze stopped."""
        for pid in self._server_pids():
            os.kill(pid, signal.SIGCONT)

    def _server_pids(self) -> list[int]:
        main = self.postmaster_pid()
        children = subprocess.run(["pgrep", "-P", str(main)], capture_output=True, text=True).stdout.split()
        return [main, *map(int, children)]

    def new_database(self) -> str:
        """An empty database of this cluster; its URL."""
        name = f"fleet_{uuid.uuid4().hex[:10]}"
        admin = create_engine(f"{self.admin_url}/postgres", isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        return f"{self.admin_url}/{name}"

    def destroy(self) -> None:
        """Stop and delete everything."""
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def wait_port_closed(port: int, timeout: float = 10) -> None:
    """Wait until nothing listens on a loopback port."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) != 0:
                return
        time.sleep(0.05)


def build_clockshift(folder: Path) -> Path | None:
    """Compile clockshift.c (a wall clock moved by the seconds in $CLOCKSHIFT_FILE) into `folder`; None
    without a C compiler. A process started with LD_PRELOAD=<it> and CLOCKSHIFT_FILE=<a file> runs ahead
    (or behind) by what the file says, re-read every second."""
    source = Path(__file__).with_name("clockshift.c")
    target = folder / "clockshift.so"
    try:
        subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(target), str(source), "-ldl"], check=True,
                       capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return target
