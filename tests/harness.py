"""A real fleet for tests: a migrated database, a Redis database of its own, real Celery workers.

Everything runs as it would for a user: `python -m fleet` for the CLI, `celery -A workers.app worker`
for the workers, with the settings passed through FLEET_* variables.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis as redis_lib
from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout
from sqlalchemy import Engine, text

from fleet import keys
from fleet.config import Settings, load_fleet_config
from fleet.models import Run
from fleet.services import Services, build
from fleet.supervisor import SECRET_ENV
from workers import broker

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
DATA = ROOT / "tests" / "data"  # recorded agent transcripts

AGENTS = """
[fleet]
daily_cap_usd = 1000.0
lease_ttl_s = 3
heartbeat_s = 0.5
kill_poll_s = 0.1
kill_grace_s = 1
retry_backoff_s = 0.2
breaker_threshold = 1000
kill_unreachable_grace_s = 3

[prices."claude-sonnet-4-5-20250929"]   # Anthropic's list prices
input_per_mtok = 3.00
output_per_mtok = 15.00
cache_write_per_mtok = 3.75
cache_read_per_mtok = 0.30

[prices."claude-opus-4-1-20250805"]     # cache writes at the 1-hour rate: dearer than the 5-minute ones it sees
input_per_mtok = 15.00
output_per_mtok = 75.00
cache_write_per_mtok = 30.00
cache_read_per_mtok = 1.50

[agents.echo]
command = ["python", "-m", "fleet.examples.echo_agent", "--cost", "0.01"]
est_cost_usd = 0.01
timeout_s = 30

[agents.counter]
command = ["python", "-m", "fleet.examples.echo_agent", "--append", "{tmp}/counter.txt", "--sleep", "0.3"]
est_cost_usd = 0.01
timeout_s = 30

[agents.fail]
command = ["python", "-m", "fleet.examples.exit_with", "1", "--message", "boom: the failing agent"]
est_cost_usd = 0.01
timeout_s = 30

[agents.exit3]
command = ["python", "-m", "fleet.examples.exit_with", "3"]
est_cost_usd = 0.01
timeout_s = 30

[agents.exit75]
command = ["python", "-m", "fleet.examples.exit_with", "75"]
est_cost_usd = 0.01
timeout_s = 30

[agents.exit77]
command = ["python", "-m", "fleet.examples.exit_with", "77"]
est_cost_usd = 0.01
timeout_s = 30

[agents.exit78]
command = ["python", "-m", "fleet.examples.exit_with", "78"]
est_cost_usd = 0.01
timeout_s = 30

[agents.timeout]
command = ["python", "-m", "fleet.examples.sleeper", "60", "--ignore-term", "--child",
           "--pidfile", "{tmp}/timeout.pids"]
est_cost_usd = 0.01
timeout_s = 1.5

[agents.long]
command = ["python", "-m", "fleet.examples.sleeper", "120", "--pidfile", "{tmp}/long.pids"]
est_cost_usd = 0.01
timeout_s = 300
concurrency = 20

[agents.secret]
command = ["python", "-c",
           "import os; print('the key is', os.environ['FLEET_AGENT_KEY']); print(os.environ.get('TOKEN'))"]
key_file = "keys/secret.key"
secret_env = { TOKEN = "keys/secret.token" }
est_cost_usd = 0.01
timeout_s = 30

[agents.idle-poll]
command = ["python", "-m", "fleet.examples.echo_agent", "--append", "{tmp}/idle-poll.txt"]
poll = ["python", "-m", "fleet.examples.has_work", "--marker", "{tmp}/no-such-marker"]
est_cost_usd = 0.5
timeout_s = 30

[agents.capped]
command = ["python", "-m", "fleet.examples.echo_agent", "--cost", "1.00"]
est_cost_usd = 1.00
daily_cap_usd = 5.00
concurrency = 100
timeout_s = 30

[agents.spender]
command = ["python", "-m", "fleet.examples.echo_agent", "--cost", "0.10", "--usage-lines", "1000", "--sleep", "0.05"]
est_cost_usd = 0.10
daily_cap_usd = 1.00
timeout_s = 60

[agents.tripper]
command = ["python", "-m", "fleet.examples.exit_with", "1"]
breaker_threshold = 3
breaker_cooldown_s = 15  # longer than a 21-dispatch storm takes on a loaded 2-core machine (CI: 6 s was not)
concurrency = 20
est_cost_usd = 0.01
timeout_s = 30

[agents.crashy]
command = ["python", "-m", "fleet.examples.sleeper", "3", "--child", "--pidfile", "{tmp}/crashy.pids"]
est_cost_usd = 0.01
timeout_s = 60

[agents.worker-killer]
command = ["python", "-m", "fleet.examples.effects_agent", "--log", "{tmp}/worker-killer.log", "--kill-worker"]
est_cost_usd = 0.01
timeout_s = 60

[agents.env]
command = ["python", "-c", "import json, os; print(json.dumps(dict(os.environ)))"]
env = { MODEL = "sonnet" }
est_cost_usd = 0.01
timeout_s = 30

[agents.stubborn]
command = ["python", "-m", "fleet.examples.sleeper", "120", "--ignore-term", "--child",
           "--pidfile", "{tmp}/stubborn.pids"]
timeout_s = 300
est_cost_usd = 0.01

[agents.claude-capped]          # a replayed `claude -p` session ($0.16 in all) under a $0.15 cap
command = ["python", "-m", "fleet.examples.replay", "{data}/claude-stream-fix-test.jsonl"]
usage_format = "claude-stream-json"
models = ["claude-sonnet-4-5-20250929"]
est_cost_usd = 0.02
daily_cap_usd = 0.15
timeout_s = 60

[agents.claude-sonnet]
command = ["python", "-m", "fleet.examples.replay", "{data}/claude-stream-fix-test.jsonl"]
usage_format = "claude-stream-json"
models = ["claude-sonnet-4-5-20250929"]
est_cost_usd = 0.20
timeout_s = 60

[agents.claude-opus]
command = ["python", "-m", "fleet.examples.replay", "{data}/claude-stream-retry-fix.jsonl"]
usage_format = "claude-stream-json"
models = ["claude-opus-4-1-20250805"]
est_cost_usd = 1.00
timeout_s = 60

[agents.claude-unpriced]        # its session uses Sonnet, which this agent has no price for
command = ["python", "-m", "fleet.examples.replay", "{data}/claude-stream-fix-test.jsonl"]
usage_format = "claude-stream-json"
models = ["claude-opus-4-1-20250805"]
est_cost_usd = 0.05
timeout_s = 60
"""

SECRET_KEY = "sk-fleet-test-SECRET-KEY-0123456789abcdef"
SECRET_TOKEN = "tok-fleet-test-SECRET-TOKEN-9876543210"


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `condition` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def children_of(pid: int) -> list[int]:
    """Live processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def wait_for_pids(pidfile: Path, timeout: float, lines: int = 1) -> list[list[int]]:
    """Wait until `lines` agents wrote their pids (example sleeper's --pidfile); the pids, line by line."""
    wait_for(lambda: pidfile.exists() and len(pidfile.read_text().splitlines()) >= lines, timeout,
             f"{lines} agent(s) to write {pidfile.name}")
    return [[int(p) for p in line.split()] for line in pidfile.read_text().splitlines()]


def pid_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # it may exit between the open and the read
        return False


def executor_of(agent_pid: int) -> int:
    """The pool process running an agent: the parent of the launcher that leads the agent's group."""
    from fleet.examples.effects_agent import parent_of

    launcher = parent_of(agent_pid)
    with open(f"/proc/{launcher}/cmdline", "rb") as handle:
        assert b"launcher" in handle.read(), f"process {agent_pid} does not run under Fleet's launcher"
    return parent_of(launcher)


def processes_holding(needle: str) -> list[tuple[int, str]]:
    """Every live process whose start environment or command line contains `needle`: (pid, "environ" or
    "cmdline"). Reads all of /proc, as root can (a process that is gone meanwhile is skipped)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        for part in ("environ", "cmdline"):
            try:
                if needle.encode() in (entry / part).read_bytes():
                    found.append((int(entry.name), part))
            except OSError:
                continue
    return found


# Root without any capability: a process of the same uid as another started this way, and like it
# without CAP_SYS_PTRACE, which is an agent's position beside a worker of its own uid. The kernel then
# lets one read the other's /proc/PID/environ only if the target is dumpable. (Both must be capless:
# a capless reader is refused a target that holds capabilities it lacks, dumpable or not.)
CAPLESS = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all", "--"]


def capless_can_read(path: str) -> bool:
    """Whether a capless root process can read `path`."""
    return subprocess.run([*CAPLESS, "cat", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          timeout=30).returncode == 0


def assert_capless_reader_reads_a_dumpable_peer() -> None:
    """The control for `capless_can_read`: it does read a dumpable capless process's environ."""
    peer = subprocess.Popen([*CAPLESS, "sleep", "60"], stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: Path(f"/proc/{peer.pid}/cmdline").read_bytes().startswith(b"sleep"), 10, "the peer")
        assert capless_can_read(f"/proc/{peer.pid}/environ"), "the capless reader cannot read even a dumpable peer"
    finally:
        peer.kill()
        peer.wait()


class Fleet:
    """One test fleet: config, database, Redis database, workers."""

    def __init__(self, tmp: Path, redis_url: str, database_url: str, agents: str = AGENTS, *,
                 direct_redis_url: str | None = None, direct_database_url: str | None = None,
                 secrets_as_files: bool = False, sentry_dsn: str | None = None,
                 worker_prefix: tuple[str, ...] = ()) -> None:
        """`secrets_as_files`: the Redis URL, database URL and Sentry DSN reach every process it starts
        as FLEET_*_FILE (0600 files in a 0700 folder), never in an environment. `worker_prefix`: argv
        that execs the worker (e.g. CAPLESS). The fleet's processes use redis_url and database_url
        (perhaps through a fault proxy); the test's own clients use the direct URLs, so a fault never
        blinds the assertions."""
        self.worker_prefix = list(worker_prefix)
        self.tmp, self.redis_url, self.database_url = tmp, redis_url, database_url
        self.direct_redis_url = direct_redis_url or redis_url
        self.direct_database_url = direct_database_url or database_url
        self.config_path = tmp / "fleet.toml"
        self.log_dir = tmp / "logs"
        self.config_path.write_text(agents.replace("{tmp}", str(tmp)).replace("{data}", str(DATA)))
        keys_dir = tmp / "keys"
        keys_dir.mkdir(mode=0o700, exist_ok=True)
        for name, secret in (("secret.key", SECRET_KEY), ("secret.token", SECRET_TOKEN)):
            (keys_dir / name).write_text(secret + "\n")
            (keys_dir / name).chmod(0o600)
        secrets = {"FLEET_REDIS_URL": redis_url, "FLEET_DATABASE_URL": database_url}
        if sentry_dsn is not None:
            secrets["FLEET_SENTRY_DSN"] = sentry_dsn
        inherited = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
        self.env = {**inherited, "FLEET_CONFIG": str(self.config_path), "FLEET_LOG_DIR": str(self.log_dir),
                    "PYTHONPATH": str(ROOT)}
        if secrets_as_files:
            folder = tmp / "secrets"
            folder.mkdir(mode=0o700)
            for name, value in secrets.items():
                path = folder / name.lower()
                path.write_text(value + "\n")
                path.chmod(0o600)
                self.env[f"{name}_FILE"] = str(path)
        else:
            self.env.update(secrets)
        self.workers: list[subprocess.Popen[bytes]] = []
        self.celery = Celery("fleet-test", broker=self.direct_redis_url, backend=self.direct_redis_url)
        # As workers/app.py does: a publish to a frozen Redis times out instead of hanging.
        self.celery.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json",
                                broker_connection_retry_on_startup=True,
                                broker_transport_options={"socket_timeout": 5.0, "socket_connect_timeout": 3.0},
                                task_publish_retry_policy={"max_retries": 1, "interval_start": 0.2,
                                                           "interval_step": 0.5, "interval_max": 1.0})
        self.redis = redis_lib.Redis.from_url(self.direct_redis_url, decode_responses=True)
        self._services: Services | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self, workers: int = 2, concurrency: int = 6) -> None:
        """Flush this fleet's Redis database, migrate, start workers and wait until they consume."""
        self.redis.flushdb()
        self.cli("db", "upgrade", check=True)
        for _ in range(workers):
            self.start_worker(concurrency=concurrency)
        self.wait_consuming()

    def start_worker(self, concurrency: int = 4, queues: str = "dispatch,agents",
                     env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start one more real Celery worker node (`env`: variables added to the fleet's for this one)."""
        name = f"w{len(self.workers)}-{uuid.uuid4().hex[:6]}@%h"
        log = open(self.tmp / f"worker-{len(self.workers)}.log", "ab")  # noqa: SIM115 - lives with the worker
        proc = subprocess.Popen(
            [*self.worker_prefix, PY, "-m", "celery", "-A", "workers.app", "worker", "-Q", queues,
             "-c", str(concurrency), "-O", "fair", "-n", name, "--without-mingle", "--without-gossip", "-l", "INFO"],
            env={**self.env, **(env or {})}, cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
        self.workers.append(proc)
        return proc

    def wait_consuming(self, timeout: float = 30, resend_s: float = 3) -> None:
        """A canary through each queue comes back: the workers consume, not merely live. One not back within
        `resend_s` is sent again: a worker killed while its BRPOP was still open at Redis takes the next message
        into its dead connection, and a canary lost so would otherwise be waited for to the whole `timeout`."""
        deadline = time.monotonic() + timeout
        for task, queue in (("fleet.canary.dispatch", "dispatch"), ("fleet.canary.agents", "agents")):
            while True:
                canary = self.celery.send_task(task, args=["ping"], queue=queue)
                try:
                    canary.get(timeout=max(0.1, min(resend_s, deadline - time.monotonic())))
                    break
                except CeleryTimeout:
                    if time.monotonic() >= deadline:
                        raise

    def stop_worker(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        """Stop a worker node (warm shutdown on SIGTERM), then make sure its whole group is gone."""
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        if proc in self.workers:
            self.workers.remove(proc)

    def stop(self) -> None:
        """Stop every worker and close clients."""
        for proc in list(self.workers):
            self.stop_worker(proc)
        if self._services is not None:
            self._services.close()
        self.redis.close()

    # ------------------------------------------------------------ using it

    @property
    def settings(self) -> Settings:
        """The settings the fleet's processes read."""
        return Settings(config=self.config_path, redis_url=self.direct_redis_url,
                        database_url=self.direct_database_url, log_dir=self.log_dir)

    @property
    def services(self) -> Services:
        """In-process clients on this fleet (for assertions and direct dispatches)."""
        if self._services is None:
            self._services = build(self.settings, load_fleet_config(self.config_path))
        return self._services

    def send_execute(self, run_id: str, fence: int, countdown: float = 0.0) -> None:
        """What workers.tasks.send_execute does, from the test process."""
        self.celery.send_task("fleet.execute", args=[run_id, fence], queue="agents", countdown=countdown or None,
                              task_id=broker.execute_task_id(run_id, fence), ignore_result=True)

    def waiting(self, runs: Sequence[Run]) -> set[str]:
        """What workers.tasks.waiting_in_agents_queue does: runs whose message waits in the agents queue, or, once
        sent again, is held by a live worker."""
        return broker.on_their_way(self.redis, self.celery.control, "agents", runs,
                                   due_within_s=self.services.config.fleet.resend_after_s)

    def reap(self, services: Services | None = None, send: Any = None) -> Any:
        """One reaper pass as beat runs it (optionally with other clients, or a sender that loses messages)."""
        from fleet import sweeps

        return sweeps.reap(services or self.services, send or self.send_execute, self.waiting)

    def start_beat(self, name: str) -> subprocess.Popen[bytes]:
        """Start a real `celery beat` (its own schedule file and log)."""
        log = open(self.tmp / f"beat-{name}.log", "ab")  # noqa: SIM115 - lives with the beat
        return subprocess.Popen(
            [PY, "-m", "celery", "-A", "workers.app", "beat", "-l", "INFO", "-s", str(self.tmp / f"beat-{name}.db")],
            env=self.env, cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)

    def cli(self, *args: str, check: bool = False, timeout: float = 60,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run `python -m fleet ARGS` as a user would."""
        proc = subprocess.run([PY, "-m", "fleet", *args], env={**self.env, **(env or {})}, cwd=self.tmp,
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"fleet {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def cli_json(self, *args: str) -> Any:
        """Run a CLI command with --json and parse what it printed."""
        proc = self.cli(*args, "--json", check=True)
        return json.loads(proc.stdout)

    def reset_agent(self, agent: str) -> None:
        """Forget an agent's Redis state (breaker, leases, pause, kill) from earlier tests, and its pause's
        mirror (a check would put the pause back in Redis from it)."""
        from sqlalchemy import delete

        from fleet import db
        from fleet.models import Pause

        with db.session(self.services.engine) as session:
            session.execute(delete(Pause).where(Pause.scope == agent))
            session.commit()
        names = [keys.breaker(agent), keys.paused(agent), keys.kill(agent), keys.fence_counter(agent)]
        names += list(self.redis.scan_iter(f"{keys.PREFIX}lease:{agent}:*"))
        self.redis.delete(*names)

    @contextmanager
    def worker_count(self, extra: int, concurrency: int = 4) -> Iterator[list[subprocess.Popen[bytes]]]:
        """Extra worker nodes for the length of a block."""
        procs = [self.start_worker(concurrency=concurrency) for _ in range(extra)]
        try:
            yield procs
        finally:
            for proc in procs:
                self.stop_worker(proc)


@contextmanager
def private_fleet(tmp: Path, agents: str = AGENTS, concurrency: int = 4) -> Iterator[tuple[Fleet, PrivateRedis]]:
    """A one-worker SQLite fleet on a redis-server of its own, which a test may stop and restart."""
    server = PrivateRedis(tmp)
    server.start()
    home = tmp / "fleet"
    home.mkdir()
    harness = Fleet(home, server.url, f"sqlite:///{tmp / 'fleet.db'}", agents=agents)
    try:
        harness.start(workers=1, concurrency=concurrency)
        yield harness, server
    finally:
        harness.stop()
        server.stop()


class PrivateRedis:
    """A Redis server of a test's own, on its own port, without persistence: it can be stopped and
    restarted (losing everything) without touching the Redis other tests share."""

    def __init__(self, tmp: Path) -> None:
        from fleet.embedded import free_port, server_binary

        self.port = free_port()
        self.dir = tmp
        system = Path("/usr/bin/redis-server")
        self.binary = str(system if system.exists() else server_binary())
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Its URL, database 0."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (or start again) on the same port, empty."""
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), "--maxmemory-policy", "noeviction"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        client = redis_lib.Redis(port=self.port, socket_connect_timeout=0.5)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis_lib.RedisError:
                return False

        wait_for(answers, 10, f"redis-server on port {self.port}")
        client.close()

    def stop(self) -> None:
        """Stop it (SIGKILL: nothing is saved, as after a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None


def lock_waits(engine: Engine) -> int:
    """How many sessions of this PostgreSQL database wait on a lock now (a row lock another transaction holds)."""
    with engine.connect() as probe:
        return int(probe.execute(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                      "AND wait_event_type = 'Lock'")).scalar_one())
