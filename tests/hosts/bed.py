"""The multi-host test bed: three hosts in network namespaces on one bridge of this machine.

    infra  10.A.B.1   Redis and PostgreSQL (private instances, with passwords), where `fleet kill`,
                      `fleet logs` and the web page run
    hostA  10.A.B.2   a Fleet worker (-Q dispatch,agents), beat
    hostB  10.A.B.3   a Fleet worker (-Q dispatch,agents)
    (this process: 10.A.B.254 on the bridge, for the test's own assertions and the reaper)

Each host is a network namespace joined to the bridge by a veth pair, plus a PID, UTS and mount
namespace of its own whose PID 1 is a tiny reaper (so orphans are reaped as by a real init, and
SIGKILLing it takes every process of the host at once: a host lost). A host cut off has the
bridge end of its veth down: it keeps running but reaches nothing. Every name carries a short tag
of its own, so parallel test processes never collide, and everything is torn down by the
fixture's finalizer, or at exit if the finalizer never ran.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import ipaddress
import os
import random
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness import PY, Fleet, wait_for

FAKETIME_LIBS = ("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
                 "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1")
# PID 1 of each host: names the host, then reaps whatever is reparented to it, for ever.
_INIT = ("import os, socket, sys, time\nsocket.sethostname(sys.argv[1])\nwhile True:\n"
         "    try:\n        os.wait()\n    except ChildProcessError:\n        time.sleep(0.05)\n")

_cleanups: list[Callable[[], None]] = []


def _run_cleanups() -> None:
    while _cleanups:
        with contextlib.suppress(Exception):
            _cleanups.pop()()


atexit.register(_run_cleanups)


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command of the bed's plumbing (ip, tc)."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def missing_tools() -> str | None:
    """Why the bed cannot be built here (None: it can)."""
    if os.geteuid() != 0:
        return "the multi-host bed needs root (network namespaces)"
    for tool in ("ip", "unshare", "nsenter", "tc", "setpriv", "redis-server"):
        if shutil.which(tool) is None:
            return f"the multi-host bed needs `{tool}` (iproute2, util-linux, redis-server)"
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        return "the multi-host bed needs PostgreSQL's server binaries"
    probe = f"flprobe{os.getpid() % 100000}"
    if sh("ip", "netns", "add", probe, check=False).returncode != 0:
        return "`ip netns add` is not permitted here"
    sh("ip", "netns", "del", probe, check=False)
    return None


def faketime_lib() -> str | None:
    """libfaketime, installed from Debian's `faketime` package when it is missing (None: cannot)."""
    for path in FAKETIME_LIBS:
        if Path(path).exists():
            return path
    if shutil.which("apt-get") is not None:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-qq", "faketime"], capture_output=True, env=env, timeout=300)
    return next((p for p in FAKETIME_LIBS if Path(p).exists()), None)


def _free_subnet() -> ipaddress.IPv4Network:
    used = sh("ip", "-4", "route", "show", "table", "all").stdout
    for _ in range(100):
        net = ipaddress.IPv4Network(f"10.{random.randint(160, 250)}.{random.randint(0, 255)}.0/24")
        if str(net.network_address).rsplit(".", 1)[0] + "." not in used:
            return net
    raise RuntimeError("no free 10.x.y.0/24 for the bed")


@dataclass
class Host:
    """One host: its network namespace, and (while it is up) a PID/UTS/mount namespace whose init is `init`."""

    name: str
    netns: str
    veth: str  # the bridge end
    address: str
    init: subprocess.Popen[bytes] | None = None
    init_pid: int | None = None  # PID 1 of the host, as this machine sees it
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def boot(self) -> None:
        """A fresh PID, UTS and mount namespace in the host's network namespace."""
        self.init = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "unshare", "--uts", "--pid", "--mount", "--fork", "--mount-proc",
             "--kill-child", PY, "-S", "-c", _INIT, self.name],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.init_pid = wait_for(self._child_of_unshare, 10, f"{self.name}'s init")
        wait_for(lambda: self.enter(["hostname"]).stdout.strip() == self.name, 10, f"{self.name}'s host name")

    def _child_of_unshare(self) -> int | None:
        assert self.init is not None
        children = Path(f"/proc/{self.init.pid}/task/{self.init.pid}/children")
        with contextlib.suppress(OSError):
            text = children.read_text().split()
            if text:
                return int(text[0])
        return None

    def prefix(self, workdir: Path | None = None) -> list[str]:
        """argv that runs a command inside this host (network, PID, UTS and mount namespaces)."""
        assert self.init_pid is not None, f"{self.name} is down"
        return ["nsenter", "-t", str(self.init_pid), "-n", "-u", "-p", "-m", f"--wd={workdir or '/'}", "--"]

    def enter(self, argv: list[str], env: dict[str, str] | None = None, timeout: float = 60,
              workdir: Path | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside the host to its end."""
        return subprocess.run([*self.prefix(workdir), *argv], capture_output=True, text=True, env=env,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def spawn(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start a long-lived process inside the host."""
        with log.open("ab") as out:
            proc = subprocess.Popen([*self.prefix(log.parent), *argv], env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        return proc

    def lose(self) -> None:
        """The host is lost: every process of it SIGKILLed at once (the kernel does it when PID 1 dies)."""
        if self.init_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.init_pid, signal.SIGKILL)
        if self.init is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.init.wait(10)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        self.procs.clear()
        self.init, self.init_pid = None, None

    def cut(self) -> None:
        """Cut the host off: the bridge end of its link goes down; the host runs on, reaching nothing."""
        sh("ip", "link", "set", self.veth, "down")

    def reconnect(self) -> None:
        """Bring its link back."""
        sh("ip", "link", "set", self.veth, "up")

    def delay(self, ms: int) -> bool:
        """Add latency to every packet towards the host (`tc netem`); False when the kernel has no netem."""
        return sh("tc", "qdisc", "replace", "dev", self.veth, "root", "netem", "delay", f"{ms}ms",
                  check=False).returncode == 0

    def undelay(self) -> None:
        """Remove the added latency."""
        sh("tc", "qdisc", "del", "dev", self.veth, "root", check=False)

    def alive_pids(self) -> set[int]:
        """The host's live (not zombie) processes, by their pids inside the host."""
        if self.init_pid is None:
            return set()
        try:
            ns = os.readlink(f"/proc/{self.init_pid}/ns/pid")
        except OSError:
            return set()
        found = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.readlink(entry / "ns" / "pid") != ns:
                    continue
                status = (entry / "status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if fields.get("State", "").strip().startswith(("Z", "X")):
                continue
            found.add(int(fields["NSpid"].split()[-1]))
        return found


class Bed:
    """The network: a bridge, three namespaces, a veth each, and the infra host's servers."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tag = secrets.token_hex(2)
        net = _free_subnet()
        base = str(net.network_address).rsplit(".", 1)[0]
        self.bridge, self.gateway = f"fb{self.tag}", f"{base}.254"
        self.prefixlen = net.prefixlen
        self.hosts = {name: Host(name, f"fl{self.tag}{name}", f"fv{self.tag}{i}", f"{base}.{i + 1}")
                      for i, name in enumerate(("infra", "hostA", "hostB"))}
        self.redis_password = secrets.token_hex(12)
        self.pg_password = secrets.token_hex(12)
        self.pg_root = Path(tempfile.mkdtemp(prefix=f"fleet-bed-{self.tag}-"))
        self._destroyed = False
        _cleanups.append(self.destroy)

    @property
    def infra(self) -> Host:
        """The host of Redis and PostgreSQL."""
        return self.hosts["infra"]

    # ------------------------------------------------------------ building

    def build(self, servers: bool = True) -> Bed:
        """Bridge, namespaces and links; infra booted with Redis and PostgreSQL on its address."""
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.gateway}/{self.prefixlen}", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for host in self.hosts.values():
            sh("ip", "netns", "add", host.netns)
            sh("ip", "link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
            sh("ip", "link", "set", host.veth, "master", self.bridge)
            sh("ip", "link", "set", host.veth, "up")
            sh("ip", "-n", host.netns, "addr", "add", f"{host.address}/{self.prefixlen}", "dev", "eth0")
            sh("ip", "-n", host.netns, "link", "set", "eth0", "up")
            sh("ip", "-n", host.netns, "link", "set", "lo", "up")
        self.infra.boot()
        if servers:
            self._start_redis()
            self._start_postgres()
        return self

    def _start_redis(self) -> None:
        infra = self.infra
        config = self.pg_root / "redis.conf"  # the password in a file, never in an argv
        config.write_text(f"bind {infra.address}\nport 6379\nrequirepass {self.redis_password}\nsave \"\"\n"
                          "appendonly no\nmaxmemory-policy noeviction\nprotected-mode no\n")
        config.chmod(0o600)
        infra.spawn(["redis-server", str(config)], self.pg_root / "redis.log")
        import redis as redis_lib

        client = redis_lib.Redis.from_url(self.redis_url(), socket_connect_timeout=0.5)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis_lib.RedisError:
                return False

        wait_for(answers, 15, "the bed's Redis")
        client.close()

    def _pg_bin(self, name: str) -> str:
        return sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))[-1]

    def _start_postgres(self) -> None:
        data, sockets = self.pg_root / "data", self.pg_root / "run"
        sockets.mkdir()
        pwfile = self.pg_root / "pw"
        pwfile.write_text(self.pg_password + "\n")
        os.chmod(self.pg_root, 0o755)
        for path in (self.pg_root, sockets, pwfile):
            shutil.chown(path, "postgres")
        pwfile.chmod(0o600)
        as_postgres = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]
        subprocess.run([*as_postgres, self._pg_bin("initdb"), "-D", str(data), "-A", "scram-sha-256", "-U", "postgres",
                        f"--pwfile={pwfile}", "--no-sync"], check=True, capture_output=True, cwd=self.pg_root)
        with (data / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {self.gateway.rsplit('.', 1)[0]}.0/{self.prefixlen} scram-sha-256\n")
        options = (f"-p 5432 -k {sockets} -c listen_addresses={self.infra.address} -c fsync=off "
                   "-c max_connections=300")
        done = self.infra.enter([*as_postgres, self._pg_bin("pg_ctl"), "-D", str(data), "-l",
                                 str(self.pg_root / "pg.log"), "-o", options, "-w", "-t", "30", "start"],
                                workdir=self.pg_root)
        if done.returncode != 0:
            raise RuntimeError(f"the bed's PostgreSQL did not start: {done.stdout} {done.stderr}")

    # ------------------------------------------------------------ what the hosts use

    def redis_url(self, db: int = 0) -> str:
        """Infra's Redis, with its password."""
        return f"redis://:{self.redis_password}@{self.infra.address}:6379/{db}"

    def pg_url(self, database: str = "postgres") -> str:
        """Infra's PostgreSQL, with its password."""
        return f"postgresql+psycopg://postgres:{self.pg_password}@{self.infra.address}:5432/{database}"

    def new_database(self) -> str:
        """A fresh database on infra's PostgreSQL; its URL."""
        from sqlalchemy import create_engine, text

        name = f"fleet_{secrets.token_hex(5)}"
        admin = create_engine(self.pg_url(), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        return self.pg_url(name)

    # ------------------------------------------------------------ tearing down

    def destroy(self) -> None:
        """Every process, namespace and link of the bed, gone; idempotent."""
        if self._destroyed:
            return
        self._destroyed = True
        for host in self.hosts.values():
            host.lose()
        for host in self.hosts.values():
            sh("ip", "netns", "del", host.netns, check=False)
            sh("ip", "link", "del", host.veth, check=False)
        sh("ip", "link", "del", self.bridge, check=False)
        shutil.rmtree(self.pg_root, ignore_errors=True)

    def leftovers(self) -> list[str]:
        """Anything of this bed still present (for the tear-down test)."""
        names = sh("ip", "-o", "link").stdout + sh("ip", "netns", "list").stdout
        mine = [self.bridge, *(h.veth for h in self.hosts.values()), *(h.netns for h in self.hosts.values())]
        return [n for n in mine if n in names]


@dataclass
class FleetHost:
    """A host of the fleet: its own folder (fleet.toml, logs, effects log) and its Fleet processes."""

    host: Host
    fleet: Fleet
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    beat: subprocess.Popen[bytes] | None = None

    @property
    def effects_path(self) -> Path:
        """Where this host's test agents record what they did."""
        return self.fleet.tmp / "effects.log"

    def start_worker(self, concurrency: int = 2) -> subprocess.Popen[bytes]:
        """A Celery worker on both queues, inside the host."""
        self.fleet.worker_prefix = self.host.prefix(self.fleet.tmp)
        proc = self.fleet.start_worker(concurrency=concurrency)
        self.host.procs.append(proc)
        return proc

    def start_beat(self) -> subprocess.Popen[bytes]:
        """`celery beat` inside the host."""
        self.beat = self.host.spawn([PY, "-m", "celery", "-A", "workers.app", "beat", "-l", "INFO", "-s",
                                     str(self.fleet.tmp / "beat-schedule.db")], self.fleet.tmp / "beat.log",
                                    env=self.fleet.env)
        return self.beat

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`python -m fleet ARGS` inside the host."""
        return self.host.enter([PY, "-m", "fleet", *args], env=self.fleet.env, timeout=timeout, workdir=self.fleet.tmp)


@contextlib.contextmanager
def hosts_up(bed: Bed, names: tuple[str, ...]) -> Iterator[None]:
    """Boot the named hosts for a block; they are lost (every process SIGKILLed) after it, whatever happens."""
    try:
        for name in names:
            bed.hosts[name].boot()
        yield
    finally:
        for name in names:
            host = bed.hosts[name]
            with contextlib.suppress(Exception):
                host.reconnect()
                host.undelay()
            host.lose()
