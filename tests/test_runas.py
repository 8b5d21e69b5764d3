"""`run_as`: agents under their own uid, with no capability, no key but their own, and no fleet secret.

The tests run as root. A worker that is not root but may switch users (compose's: CAP_SETUID,
CAP_SETGID and CAP_KILL as ambient capabilities) is played by `setpriv --reuid` with those ambient
capabilities, and one that may not by a capability-less root (tests.harness.CAPLESS). Agents run as
`nobody` with the system's /usr/bin/python3: the test venv's interpreter lives under /root, which
nobody cannot enter.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from rich.console import Console
from sqlalchemy import MetaData, create_engine
from sqlmodel import select

from fleet import db, identity, keys, process, redaction, store
from fleet.config import Settings, load_fleet_config
from fleet.dispatch import DispatchRequest, dispatch
from fleet.doctor import run_doctor
from fleet.errors import ConfigError
from fleet.models import TERMINAL, DeadLetter, Run
from fleet.process import Output
from tests.harness import (
    CAPLESS,
    PY,
    ROOT,
    Fleet,
    PrivateRedis,
    pid_alive,
    processes_holding,
    wait_for,
)
from tests.sentry_server import SentryServer

LAUNCHER = ROOT / "fleet" / "launcher.py"
SYSTEM_PY = "/usr/bin/python3"
NOBODY = 65534
WORKER_UID = 1234  # a non-root "worker" with no passwd entry: setpriv takes numbers
SWITCH_CAPS = "+setuid,+setgid,+kill"
# A non-root process that keeps CAP_SETUID, CAP_SETGID and CAP_KILL across exec, as compose starts workers.
NON_ROOT_WITH_CAPS = ["setpriv", f"--reuid={WORKER_UID}", f"--regid={WORKER_UID}", "--clear-groups",
                      f"--inh-caps={SWITCH_CAPS}", f"--ambient-caps={SWITCH_CAPS}", "--"]

PROBE = """
import ctypes, json, os
libc = ctypes.CDLL(None)
signum = ctypes.c_int(-1)
libc.prctl(2, ctypes.byref(signum), 0, 0, 0)  # PR_GET_PDEATHSIG
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
print(json.dumps({"uid": status["Uid"].split(), "gid": status["Gid"].split(), "groups": os.getgroups(),
                  "caps": {name: int(status[name], 16) for name in ("CapInh", "CapPrm", "CapEff", "CapAmb")},
                  "pdeathsig": signum.value, "cwd": os.getcwd()}))
"""

needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not Path(SYSTEM_PY).exists(),
                                reason="needs root, setpriv and /usr/bin/python3")


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A fresh folder under /tmp that any user may enter (pytest's tmp_path is under a 0700 folder)."""
    folder = Path(tempfile.mkdtemp(prefix="fleet-runas-", dir="/tmp"))
    folder.chmod(0o711)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def world_readable(path: Path) -> bool:
    """Whether any user can read `path` through every folder above it (by mode bits)."""
    folders = [p for p in path.resolve().parents]
    return all(p.stat().st_mode & 0o001 for p in folders) and bool(path.stat().st_mode & 0o004)


def launch(options: list[str], argv: list[str], prefix: list[str] | None = None,
           program: list[str] | None = None) -> subprocess.Popen[bytes]:
    """fleet/launcher.py under the system Python (it is stdlib only), or `program`, as a new group leader."""
    program = program or [SYSTEM_PY, "-I", "-S", str(LAUNCHER)]
    return subprocess.Popen([*(prefix or []), *program, f"parent={os.getpid()}",
                             "lc=-", *options, "--", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, env={"PATH": "/usr/bin:/bin"})


def probe(options: list[str], prefix: list[str] | None = None) -> tuple[int, str]:
    """Run PROBE as the agent; (the launcher's exit code, what was printed)."""
    proc = launch(options, [SYSTEM_PY, "-I", "-S", "-c", PROBE], prefix)
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out.decode()


# ---------------------------------------------------------------- the launcher's switch


@needs_root
@pytest.mark.parametrize("worker", ["root", "non-root with CAP_SETUID, CAP_SETGID, CAP_KILL"])
def test_the_agent_runs_as_its_user_with_no_capability_and_dies_with_the_launcher(worker: str, tmp_path: Path) -> None:
    """After the switch the agent has the target's uid, gid and groups, no capability in any set (a
    non-root worker's ambient ones would otherwise survive setuid and exec), and still its parent-death
    signal (the kernel clears it on a credential change: it must be set after the switch)."""
    if worker != "root" and not world_readable(LAUNCHER):
        pytest.skip("the launcher must be readable by a non-root uid")
    prefix = None if worker == "root" else NON_ROOT_WITH_CAPS
    if prefix:  # the control: the "worker" itself does hold the capabilities
        held = subprocess.run([*prefix, "grep", "CapAmb", "/proc/self/status"], capture_output=True, text=True)
        assert int(held.stdout.split()[1], 16) == 0b11100000, held.stdout
    code, out = probe([f"creds={NOBODY}:{NOBODY}:{NOBODY}"], prefix)
    assert code == 0, out
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen["uid"] == [str(NOBODY)] * 4 and seen["gid"] == [str(NOBODY)] * 4 and seen["groups"] == [NOBODY]
    assert seen["caps"] == {"CapInh": 0, "CapPrm": 0, "CapEff": 0, "CapAmb": 0}, seen
    assert seen["pdeathsig"] == signal.SIGKILL


TRY_ROOT = """
try:
    os.setgroups([0]); os.setgid(0); os.setuid(0)
    print("became", os.getuid())
except OSError as exc:
    print("setuid refused:", exc.errno)
print("nnp", status["NoNewPrivs"].strip())
"""


def launcher_program(kind: str, folder: Path) -> list[str]:
    """The launcher to run, compiled or Python's, where a non-root uid may run it (root's cache is 0700)."""
    if kind == "python":
        return [SYSTEM_PY, "-I", "-S", str(LAUNCHER)]
    built = process.compiled_launcher()
    assert built is not None, "no C compiler here: the compiled launcher cannot be tested"
    copy = folder / built.name
    shutil.copy(built, copy)
    copy.chmod(0o755)
    return [str(copy)]


@needs_root
@pytest.mark.parametrize("kind", ["compiled", "python"])
@pytest.mark.parametrize("worker", ["root", "non-root with CAP_SETUID, CAP_SETGID, CAP_KILL"])
def test_an_agent_without_run_as_inherits_no_capability_it_could_switch_users_with(
        worker: str, kind: str, open_dir: Path) -> None:
    """No run_as (creds "-"): the agent stays the worker's user, but a non-root worker's ambient CAP_SETUID,
    CAP_SETGID and CAP_KILL must not reach it (it called setuid(0) and read root's files): no capability in
    any set, no_new_privs (no setuid binary gives one back), and still its parent-death signal. A root
    worker's agent stays root (doctor warns about that), with nothing inheritable or ambient."""
    if worker != "root" and not world_readable(LAUNCHER):
        pytest.skip("the launcher must be readable by a non-root uid")
    prefix = [] if worker == "root" else NON_ROOT_WITH_CAPS
    proc = launch(["creds=-"], [SYSTEM_PY, "-I", "-S", "-c", PROBE + TRY_ROOT], prefix,
                  launcher_program(kind, open_dir))
    out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 0, out
    seen = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert seen["pdeathsig"] == signal.SIGKILL, out
    assert (seen["caps"]["CapAmb"], seen["caps"]["CapInh"]) == (0, 0), out
    if worker == "root":
        assert seen["uid"] == ["0"] * 4 and seen["caps"]["CapEff"] != 0 and "became 0" in out, out
        return
    assert seen["uid"] == [str(WORKER_UID)] * 4, out
    assert seen["caps"] == {"CapInh": 0, "CapPrm": 0, "CapEff": 0, "CapAmb": 0}, out
    assert "setuid refused: 1" in out and "became" not in out, out  # EPERM
    assert "nnp 1" in out, out


@needs_root
def test_a_switched_agent_dies_when_its_launcher_is_killed(open_dir: Path) -> None:
    """The behaviour behind the flag: SIGKILL the launcher, and the agent (another uid) goes with it."""
    open_dir.chmod(0o777)
    pidfile = open_dir / "agent.pid"
    script = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    proc = launch([f"creds={NOBODY}:{NOBODY}:"], [SYSTEM_PY, "-I", "-S", "-c", script])
    agent = None
    try:
        wait_for(lambda: pidfile.exists() and pidfile.read_text(), 20, "the agent to start")
        agent = int(pidfile.read_text())
        assert os.stat(f"/proc/{agent}").st_uid == NOBODY
        proc.kill()
        proc.wait(10)
        wait_for(lambda: not pid_alive(agent), 5, "the agent to die with its launcher")
    finally:
        if agent is not None and pid_alive(agent):
            os.kill(agent, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@needs_root
def test_a_launcher_that_cannot_switch_exits_78_and_runs_nothing(tmp_path: Path) -> None:
    """A capability-less root cannot setgroups/setuid: a configuration error (78) naming the switch,
    and the program never runs as the worker's own user instead."""
    marker = tmp_path / "ran"
    proc = launch([f"creds={NOBODY}:{NOBODY}:"], ["/usr/bin/touch", str(marker)], prefix=CAPLESS)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 78, out
    assert b"cannot switch to uid:gid:groups 65534:65534:" in out
    time.sleep(0.1)
    assert not marker.exists()


@needs_root
def test_the_agent_starts_in_its_working_directory(open_dir: Path) -> None:
    """`cwd=` is entered by the agent after the switch (a folder only the agent may enter: the launcher,
    another uid, need not)."""
    home = open_dir / "home"
    home.mkdir(mode=0o700)
    os.chown(home, NOBODY, NOBODY)
    code, out = probe([f"creds={NOBODY}:{NOBODY}:", f"cwd={home}"])
    assert code == 0, out
    assert json.loads(out.strip().splitlines()[-1])["cwd"] == str(home)
    code, out = probe([f"creds={NOBODY}:{NOBODY}:", f"cwd={open_dir / 'missing'}"])
    assert code == 78 and "cannot enter its working directory" in out, out


MISSING = "from fleet import identity; print(identity.missing_capabilities(identity.lookup('nobody')))"


@needs_root
def test_what_a_worker_lacks_to_switch_is_read_from_its_capabilities() -> None:
    """fleet.identity, run as each kind of worker: root (nothing missing), a non-root one with the ambient
    capabilities (nothing), the same without them and a capability-less root (all three)."""
    if not world_readable(ROOT / "fleet" / "identity.py"):
        pytest.skip("fleet/ must be readable by a non-root uid")
    bare = ["setpriv", f"--reuid={WORKER_UID}", f"--regid={WORKER_UID}", "--clear-groups", "--"]
    expected = {(): "[]", tuple(NON_ROOT_WITH_CAPS): "[]", tuple(bare): "['CAP_SETUID', 'CAP_SETGID', 'CAP_KILL']",
                tuple(CAPLESS): "['CAP_SETUID', 'CAP_SETGID', 'CAP_KILL']"}
    for prefix, missing in expected.items():
        proc = subprocess.run([*prefix, SYSTEM_PY, "-I", "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                               + MISSING], capture_output=True, text=True, timeout=60)
        assert proc.stdout.strip() == missing, (prefix, proc.stdout, proc.stderr)


# ---------------------------------------------------------------- a real worker, agents as nobody

# Short leases and quick retries, so that every path ends within seconds.
TIMINGS = """
[fleet]
lease_ttl_s = 3
heartbeat_s = 0.5
kill_poll_s = 0.1
kill_grace_s = 1
retry_backoff_s = 0.2
"""

SNOOPS = {"snoop": ([], 30), "snoop-fail": (["--exit", "1"], 30), "snoop-timeout": (["--sleep", "60"], 2),
          "snoop-kill": (["--sleep", "60"], 60)}  # name: (extra arguments, timeout_s)


def snoop_config(snoop: list[str], needle: str, other_key: Path) -> str:
    """Every agent runs as nobody ([fleet]'s run_as) but `other`, whose key the snoops try to steal."""
    tables = [f'[agents.{name}]\ncommand = {json.dumps([*snoop, *extra])}\ntimeout_s = {timeout}\n'
              f'env = {{ NEEDLE_REVERSED = "{needle}" }}\n' for name, (extra, timeout) in SNOOPS.items()]
    tables[0] += 'key_file = "keys/snoop.key"\n'
    tables.append(f'[agents.other]\ncommand = ["/bin/true"]\nkey_file = "{other_key}"\nrun_as = "root"\n')
    return TIMINGS + 'run_as = "nobody"\n\n' + "\n".join(tables)


def locked_redis(tmp_path: Path, password: str) -> PrivateRedis:
    """A Redis of the test's own that requires `password` (set at run time: its argv stays clean)."""
    server = PrivateRedis(tmp_path)
    server.start()
    admin = redis_lib.Redis(port=server.port)
    admin.config_set("requirepass", password)
    admin.close()
    return server


class Sampler:
    """`ps` and a root scan of every /proc/*/environ and cmdline, every 0.2 s while a test runs."""

    def __init__(self, needle: str) -> None:
        self.needle, self.ps_hits, self.proc_hits, self.samples = needle, [], [], []  # type: ignore[var-annotated]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            listing = subprocess.run(["ps", "-eo", "pid,user,args", "--no-headers", "-ww"], capture_output=True,
                                     text=True, timeout=30).stdout
            self.samples.append(listing)
            if self.needle in listing:
                self.ps_hits.append(listing)
            self.proc_hits += processes_holding(self.needle)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def saw(self, text: str) -> bool:
        """Whether some `ps` sample showed `text` (the control: it sampled while the agents ran)."""
        return any(text in sample for sample in self.samples)


def redis_values(client: redis_lib.Redis, key: bytes) -> list[Any]:
    """A key's values, whatever its type."""
    kind = client.type(key).decode()
    if kind == "string":
        return [client.get(key)]
    if kind == "list":
        return list(client.lrange(key, 0, -1))
    if kind == "hash":
        return [item for pair in client.hgetall(key).items() for item in pair]
    if kind in ("set", "zset"):
        return list(client.smembers(key) if kind == "set" else client.zrange(key, 0, -1))
    return [repr(client.xrange(key))] if kind == "stream" else []


def redis_text(client: redis_lib.Redis) -> bytes:
    """Every key and value in a Redis database, with Celery messages' base64 bodies decoded."""
    chunks: list[bytes] = []
    for key in client.scan_iter(count=1000):
        for value in [key, *redis_values(client, key)]:
            value = value if isinstance(value, bytes) else str(value).encode()
            chunks.append(value)
            chunks += [base64.b64decode(body) for body in re.findall(rb'"body": ?"([A-Za-z0-9+/=]+)"', value)]
    return b"\n".join(chunks)


def database_text(url: str) -> str:
    """Every row of every table, as text."""
    engine = create_engine(url)
    try:
        meta = MetaData()
        meta.reflect(engine)
        with engine.connect() as conn:
            return "\n".join(repr(row) for table in meta.sorted_tables for row in conn.execute(table.select()))
    finally:
        engine.dispose()


def snoop_reports(log: Path) -> list[dict[str, Any]]:
    """The snoop's JSON reports in a run log (one per attempt)."""
    return [json.loads(line)["snoop"] for line in log.read_text().splitlines() if line.startswith('{"snoop"')]


def run_row(harness: Fleet, run_id: str) -> Run:
    """The run as the database has it now."""
    with db.session(harness.services.engine) as session:
        run = store.get_run(session=session, run_id=run_id)
        assert run is not None
        session.expunge(run)
        return run


def start(harness: Fleet, agent: str, key: str) -> str:
    """Dispatch one run; its id."""
    harness.reset_agent(agent)
    result = dispatch(harness.services, DispatchRequest(agent, key, None, False, actor="test"), harness.send_execute)
    assert result.status == "queued" and result.run_id, result
    return result.run_id


def finished(harness: Fleet, run_id: str, timeout: float = 60) -> Run:
    """Wait for a run to reach a terminal status."""
    return wait_for(lambda: (run := run_row(harness, run_id)).status in TERMINAL and run, timeout,
                    f"run {run_id} to end")


@pytest.fixture
def snoop_world(open_dir: Path) -> Iterator[tuple[Path, list[str]]]:
    """The snoop agent's script in a folder every user can read, and its command."""
    script = open_dir / "snoop_agent.py"
    shutil.copy(ROOT / "tests" / "snoop_agent.py", script)
    script.chmod(0o644)
    (open_dir / "keys").mkdir(mode=0o711)
    yield open_dir, [SYSTEM_PY, "-I", "-S", str(script), "--try", str(open_dir / "keys" / "other.key")]


@needs_root
@pytest.mark.slow
def test_an_agent_as_nobody_sees_no_fleet_secret_and_no_other_key_on_any_path(
        tmp_path: Path, snoop_world: tuple[Path, list[str]]) -> None:
    """Agents run as nobody (the fleet's default run_as) under a root worker given its secrets as files,
    with a canary in the Redis password and in the Sentry DSN. On success, failure (retried, dead-lettered,
    alerted), timeout and kill, the agent runs as nobody in its own 0700 folder with no capability, finds
    the canary in no /proc/*/environ or cmdline it can read, cannot read another agent's key (0600 in a
    folder it may pass) or the secret files, cannot signal its launcher, and has its own key. The canary is
    then in no run log, worker log, database row, Redis key or value, Sentry envelope, or `ps` sample."""
    open_dir, snoop = snoop_world
    canary = uuid.uuid4().hex
    own_key, other_key = f"snoop-key-{uuid.uuid4().hex}", f"other-key-{uuid.uuid4().hex}"
    (open_dir / "keys" / "other.key").write_text(other_key + "\n")
    (open_dir / "keys" / "other.key").chmod(0o600)
    password = f"redispw{canary}"
    server = locked_redis(tmp_path, password)
    sentry = SentryServer().start()
    home = tmp_path / "fleet"
    (home / "keys").mkdir(parents=True, mode=0o700)
    (home / "keys" / "snoop.key").write_text(own_key + "\n")
    (home / "keys" / "snoop.key").chmod(0o600)
    agents = snoop_config(snoop, canary[::-1], open_dir / "keys" / "other.key")
    harness = Fleet(home, f"redis://:{password}@127.0.0.1:{server.port}/0", f"sqlite:///{tmp_path / 'fleet.db'}",
                    agents=agents, secrets_as_files=True, sentry_dsn=sentry.dsn(key=f"sentrykey{canary}"))
    homes = open_dir / "homes"
    harness.env["FLEET_AGENT_HOMES"] = str(homes)
    secret_files = sorted(str(path) for path in (home / "secrets").iterdir())
    try:
        harness.start(workers=1, concurrency=2)
        with Sampler(canary) as sampler:
            ok = finished(harness, start(harness, "snoop", "ok"))
            failed = finished(harness, start(harness, "snoop-fail", "fail"))
            timed_out = finished(harness, start(harness, "snoop-timeout", "timeout"))
            killed_id = start(harness, "snoop-kill", "kill")
            log = harness.log_dir / "runs" / f"{killed_id}.log"
            wait_for(lambda: log.exists() and snoop_reports(log), 30, "the snoop to report before its kill")
            assert harness.cli("kill", "snoop-kill", "--reason", "test").returncode == 0
            killed = finished(harness, killed_id)
            assert harness.cli("resume", "snoop-kill").returncode == 0
        assert (ok.status, failed.status, timed_out.status, killed.status) == ("succeeded", "dead", "dead", "killed")
        assert failed.attempt == timed_out.attempt == 2
        for run in (ok, failed, timed_out, killed):
            reports = snoop_reports(harness.log_dir / "runs" / f"{run.id}.log")
            assert len(reports) == run.attempt, run.id
            for seen in reports:
                agent_home = str(homes / run.agent)
                assert seen["uid"] == [NOBODY, NOBODY] and seen["gid"] == [NOBODY, NOBODY], seen
                assert seen["home"] == seen["cwd"] == agent_home and seen["cwd_owner"] == NOBODY
                assert seen["cwd_mode"] == 0o700
                assert seen["caps"] == {"CapInh": 0, "CapPrm": 0, "CapEff": 0, "CapAmb": 0}
                assert seen["scan"]["hits"] == [], seen["scan"]
                assert seen["scan"]["readable"]["cmdline"] > 10 and seen["scan"]["readable"]["environ"] >= 1
                assert seen["tried"] == {str(open_dir / "keys" / "other.key"): "EACCES"}, seen["tried"]
                assert seen["signal_launcher"] == "EPERM"
        [own] = snoop_reports(harness.log_dir / "runs" / f"{ok.id}.log")
        assert own["key_sha256"] == hashlib.sha256(own_key.encode()).hexdigest()
        # The secret files, read as nobody: refused.
        for path in secret_files:
            read = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "cat",
                                   path], capture_output=True)
            assert read.returncode != 0 and canary.encode() not in read.stdout
        # Nowhere: ps, environ/cmdline (as root), logs, the database, Redis, Sentry.
        assert sampler.saw("snoop_agent.py") and sampler.saw("nobody"), "ps never caught an agent running"
        assert sampler.ps_hits == [] and sampler.proc_hits == []
        wait_for(lambda: len(sentry.events()) >= 2, 30, "the dead-letter alerts to reach Sentry")
        logs = [path.read_bytes() for path in (harness.log_dir / "runs").iterdir()]
        logs += [path.read_bytes() for path in home.glob("worker-*.log")]
        client = redis_lib.Redis(port=server.port, password=password)
        stored = redis_text(client)
        client.close()
        # The control: the scan reads the fleet's keys (an execute keeps no result there to name its run).
        assert b"fleet:breaker:snoop" in stored and b"fleet:fence:snoop-fail" in stored
        for where, text in (("run or worker log", b"\n".join(logs)), ("Redis", stored),
                            ("database", database_text(f"sqlite:///{tmp_path / 'fleet.db'}").encode()),
                            ("Sentry", sentry.raw())):
            for secret in (canary, other_key):
                assert secret.encode() not in text, f"{secret[:12]}... found in {where}"
    finally:
        harness.stop()
        server.stop()
        sentry.stop()


# ---------------------------------------------------------------- redaction


def test_output_masks_a_secret_split_across_reads_and_holds_back_only_what_could_start_one(tmp_path: Path) -> None:
    """A secret cut in two by the pipe is still masked; a read that ends with a newline (or anything no
    secret starts with) reaches the log at once, so `fleet logs -f` of a quiet agent is not a line late."""
    log = tmp_path / "run.log"
    secrets = ("sk-live-0123456789abcdef0123456789", "hunter2-password")
    output = Output(log, max_log_bytes=2**20, tail_bytes=1024, redact=secrets)
    output.write(b"starting\n")
    assert log.read_bytes() == b"starting\n"  # nothing held back: no secret starts with a newline
    output.write(b"key=sk-live-0123")
    assert log.read_bytes() == b"starting\nkey="  # "sk-live-0123" may be the start of a secret: held
    output.write(b"456789abcdef0123456789 and hunter2-pass")
    output.write(b"word done\n")
    assert log.read_bytes() == b"starting\nkey=[redacted by fleet] and [redacted by fleet] done\n"
    output.write(b"tail hunter")
    output.close()
    assert log.read_bytes().endswith(b"done\ntail hunter")  # the end of the output flushes what was held


# ---------------------------------------------------------------- a worker that cannot switch

CANNOT = TIMINGS + """
[agents.as-nobody]
command = ["/usr/bin/touch", "{marker}"]
run_as = "nobody"
timeout_s = 30
"""


@contextmanager
def one_worker_fleet(tmp: Path, agents: str, env: dict[str, str], prefix: list[str] | None = None) -> Iterator[Fleet]:
    """A one-worker SQLite fleet on a Redis of its own, its processes given `env`, its worker run under `prefix`."""
    server = PrivateRedis(tmp)
    server.start()
    (tmp / "fleet").mkdir()
    harness = Fleet(tmp / "fleet", server.url, f"sqlite:///{tmp / 'fleet.db'}", agents=agents,
                    worker_prefix=tuple(prefix or ()))
    harness.env.update(env)
    try:
        harness.start(workers=1, concurrency=2)
        yield harness
    finally:
        harness.stop()
        server.stop()


@needs_root
@pytest.mark.slow
def test_run_as_with_a_worker_that_cannot_switch_is_refused_by_doctor_and_dead_letters_config(
        tmp_path: Path, open_dir: Path) -> None:
    """A capability-less root worker (no CAP_SETUID, CAP_SETGID, CAP_KILL) and an agent with run_as:
    `fleet doctor` run the same way exits 78 naming the agent and what is missing (run as full root, it
    passes: the control); a dispatched run never starts, not as nobody and not as the worker's user: it is
    dead-lettered `config` after one attempt and the agent is paused."""
    open_dir.chmod(0o777)
    marker = open_dir / "ran"
    with one_worker_fleet(tmp_path, CANNOT.format(marker=marker), {"FLEET_AGENT_HOMES": str(open_dir / "homes")},
                          prefix=CAPLESS) as harness:
        capless = subprocess.run([*CAPLESS, PY, "-m", "fleet", "doctor"], env=harness.env, cwd=harness.tmp,
                                 capture_output=True, text=True, timeout=120)
        assert capless.returncode == 78, capless.stdout + capless.stderr
        assert re.search(r"FAIL\s+run_as\s+agent 'as-nobody' has run_as = 'nobody', but this worker \(uid 0\) "
                         r"cannot start it as that user: it lacks CAP_SETUID, CAP_SETGID, CAP_KILL", capless.stdout)
        full = harness.cli("doctor")
        assert full.returncode == 0, full.stdout
        assert re.search(r"ok\s+run_as\s+1 agent\(s\) can start as their own user", full.stdout), full.stdout
        run = finished(harness, start(harness, "as-nobody", "k1"))
        assert (run.status, run.attempt, run.exit_code) == ("dead", 1, 78), run
        with db.session(harness.services.engine) as session:
            [letter] = session.exec(select(DeadLetter).where(DeadLetter.run_id == run.id)).all()
        assert letter.reason == "config"
        assert "lacks CAP_SETUID, CAP_SETGID, CAP_KILL" in (letter.output_tail or "")
        # The pause follows the outcome's commit (the worker engages it just after): waited for, not read at once.
        wait_for(lambda: harness.redis.get(keys.paused("as-nobody")), 10, "the agent to be paused")
        log = (harness.log_dir / "runs" / f"{run.id}.log").read_text()
        assert log.startswith("fleet: not started: agent 'as-nobody' has run_as = 'nobody'"), log
        assert not marker.exists() and not (open_dir / "homes").exists()


LEAKY = """
[agents.leaky]                  # as an agent under the worker's uid could: it found the files and prints them
command = ["python", "-c", "import sys; [print(open(p).read().strip()) for p in sys.argv[1:]]", {files}]
key_file = "keys/leaky.key"
timeout_s = 30

[agents.other]                  # never run
command = ["/bin/true"]
key_file = "keys/other.key"
secret_env = {{ TOKEN = "keys/other.token" }}
"""


@pytest.mark.slow
def test_run_logs_mask_every_secret_fleet_knows_not_only_the_agents_own(tmp_path: Path, closed_port: int) -> None:
    """An agent prints the fleet's Redis URL, Sentry DSN, web token and Flower auth (from its FLEET_*_FILE
    files) and another agent's key and secret_env value, besides its own key: the run log has none of
    them (before, only the agent's own key was masked)."""
    canary = uuid.uuid4().hex
    home = tmp_path / "fleet"
    secrets = {"web_token": f"webtoken{canary}", "flower_auth": f"ops:flowerpw{canary}",
               "keys/leaky.key": f"leakykey{canary}", "keys/other.key": f"otherkey{canary}",
               "keys/other.token": f"othertoken{canary}"}
    (home / "keys").mkdir(parents=True, mode=0o700)
    for name, value in secrets.items():
        (home / name).write_text(value + "\n")
        (home / name).chmod(0o600)
    files = [home / "secrets" / "fleet_redis_url", home / "secrets" / "fleet_sentry_dsn", *(home / n for n in secrets)]
    password = f"redispw{canary}"
    server = locked_redis(tmp_path, password)
    harness = Fleet(home, f"redis://:{password}@127.0.0.1:{server.port}/0", f"sqlite:///{tmp_path / 'fleet.db'}",
                    agents=LEAKY.format(files=", ".join(json.dumps(str(f)) for f in files)), secrets_as_files=True,
                    sentry_dsn=f"http://sentrykey{canary}@127.0.0.1:{closed_port}/1")
    harness.env.update(FLEET_WEB_TOKEN_FILE=str(home / "web_token"), FLEET_FLOWER_AUTH_FILE=str(home / "flower_auth"))
    try:
        harness.start(workers=1, concurrency=2)
        run = finished(harness, start(harness, "leaky", "k1"))
        assert run.status == "succeeded", run
        log = (harness.log_dir / "runs" / f"{run.id}.log").read_text()
        assert canary not in log, log
        assert log.count("[redacted by fleet]") == len(files), log
        assert f"redis://:[redacted by fleet]@127.0.0.1:{server.port}/0" in log
    finally:
        harness.stop()
        server.stop()


# ---------------------------------------------------------------- configuration


def write_config(tmp_path: Path, text: str) -> Path:
    """A fleet.toml in tmp_path."""
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    return path


def test_run_as_naming_no_user_is_refused_with_file_line_agent_and_field(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[fleet]\nrun_as = "no-such-user-fleet"\n\n[agents.a]\ncommand = ["true"]\n'
                        'run_as = "no-such-user-b"\n\n[agents.b]\ncommand = ["true"]\nrun_as = "bad name"\n')
    with pytest.raises(ConfigError) as caught:
        load_fleet_config(path)
    message = str(caught.value)
    assert f"{path}:2: [fleet] run_as: no user 'no-such-user-fleet' on this host" in message
    assert f"{path}:6: agent 'a', run_as: no user 'no-such-user-b' on this host" in message
    assert f"{path}:10: agent 'b', run_as: must be a user name" in message
    settings = Settings(config=path, log_dir=tmp_path / "logs", database_url=f"sqlite:///{tmp_path / 'x.db'}",
                        redis_url="redis://127.0.0.1:1/0")
    assert run_doctor(settings, Console(file=io.StringIO())) == 78


def test_require_run_as_refuses_an_agent_that_would_run_as_the_workers_user(tmp_path: Path) -> None:
    text = '[fleet]\nrequire_run_as = true\n{default}\n[agents.a]\ncommand = ["true"]\n\n[agents.b]\n' \
           'command = ["true"]\nrun_as = "nobody"\n'
    with pytest.raises(ConfigError) as caught:
        load_fleet_config(write_config(tmp_path, text.format(default="")))
    assert "fleet.toml:4: agent 'a', run_as: required ([fleet] require_run_as = true" in str(caught.value)
    assert "agent 'b'" not in str(caught.value)
    config = load_fleet_config(write_config(tmp_path, text.format(default='run_as = "nobody"')))
    assert [agent.user_name(config.fleet) for agent in config.agents.values()] == ["nobody", "nobody"]


def test_known_secrets_cover_the_fleets_own_and_every_agents(tmp_path: Path) -> None:
    """Redis and database passwords (as written and decoded; a lone user part too), the DSN and its key,
    the web token, Flower's auth, every agent's key and secret_env files; not the short or the absent."""
    for name, value in (("a.key", "key-of-a-0001"), ("b.key", "key-of-b-0002"), ("b.tok", "tok-of-b-0003")):
        (tmp_path / name).write_text(value + "\n")
        (tmp_path / name).chmod(0o600)
    config = load_fleet_config(write_config(tmp_path, '[agents.a]\ncommand = ["true"]\nkey_file = "a.key"\n\n'
                                            '[agents.b]\ncommand = ["true"]\nkey_file = "b.key"\n'
                                            'secret_env = { T = "b.tok" }\n'))
    settings = Settings(config=tmp_path / "fleet.toml", redis_url="redis://fleet:p%40ss-redis@h:6379/0",
                        database_url="postgresql+psycopg://u:pg-secret@db/fleet", sentry_dsn="https://dsnkey1@o1.ingest/5",
                        web_token="web-token-1", flower_auth="ops:flower-pw")
    found = set(redaction.known_secrets(settings, config))
    assert found >= {"p%40ss-redis", "p@ss-redis", "pg-secret", "https://dsnkey1@o1.ingest/5", "dsnkey1",
                     "web-token-1", "ops:flower-pw", "flower-pw", "key-of-a-0001", "key-of-b-0002", "tok-of-b-0003"}
    assert "fleet" not in found and "ops" not in found  # user names are not secrets
    assert redaction.url_secrets("redis://lonesecret@h:6379/0", lone_user=True) == {"lonesecret"}
    assert redaction.url_secrets("postgresql://postgres@db/fleet") == set()  # a user name, not a secret
    assert redaction.url_secrets("sqlite:///./fleet.db") == set() and redaction.ordered(["abc", None, ""]) == ()


# ---------------------------------------------------------------- the agent's folder, and doctor


@needs_root
def test_an_agents_folder_is_made_its_users_and_only_where_it_is_safe(open_dir: Path) -> None:
    """<homes>/<agent> is created 0700 and owned by its user, under a 0711 folder of the worker's; a later
    run_as gets it; a folder others may write to, or a link in the agent's place, is refused."""
    nobody = identity.lookup("nobody")
    homes = open_dir / "homes"
    home = identity.prepare_home(homes, "a", nobody)
    assert home == homes / "a"
    assert (home.stat().st_uid, home.stat().st_gid, home.stat().st_mode & 0o777) == (NOBODY, NOBODY, 0o700)
    assert homes.stat().st_mode & 0o777 == 0o711 and homes.stat().st_uid == 0
    assert identity.home_problem(homes, "a", nobody) is None
    root = identity.lookup("root")
    assert identity.prepare_home(homes, "a", root).stat().st_uid == 0  # run_as changed: the folder follows
    (homes / "b").symlink_to("/etc")
    with pytest.raises(ConfigError, match="is not a folder"):
        identity.prepare_home(homes, "b", nobody)
    homes.chmod(0o733)
    with pytest.raises(ConfigError, match="writable by nobody else"):
        identity.prepare_home(homes, "c", nobody)


@needs_root
def test_doctor_names_a_folder_the_agent_cannot_reach_and_a_program_it_cannot_run(
        tmp_path: Path, open_dir: Path) -> None:
    """FLEET_AGENT_HOMES under a folder nobody may enter: 78 naming that folder. A bare `python` (this
    venv's interpreter, under /root) as nobody's program: a warning. An agent as root: the loud warning."""
    (open_dir / "blocked").mkdir(mode=0o700)
    path = write_config(tmp_path, '[agents.a]\ncommand = ["python", "-c", "pass"]\nrun_as = "nobody"\n\n'
                        '[agents.b]\ncommand = ["true"]\nrun_as = "root"\n')
    settings = Settings(config=path, log_dir=tmp_path / "logs", database_url=f"sqlite:///{tmp_path / 'x.db'}",
                        redis_url="redis://127.0.0.1:1/0", agent_homes=open_dir / "blocked" / "homes")

    def report(**changes: Any) -> tuple[int, str]:
        buffer = io.StringIO()
        code = run_doctor(settings.model_copy(update=changes), Console(file=buffer, width=400))
        return code, buffer.getvalue()

    code, out = report()
    assert code == 78
    assert re.search(rf"FAIL\s+run_as\s+user 'nobody' \(agent 'a'\) cannot enter {open_dir / 'blocked'},", out), out
    assert re.search(r"warn\s+run_as\s+AGENTS RUN AS ROOT: .* b would run as root", out), out
    _, out = report(agent_homes=open_dir / "homes")
    assert "FAIL  run_as" not in out, out
    if not identity.can_execute(Path(sys.executable), identity.lookup("nobody")):
        assert re.search(r"warn\s+run_as\s+agent 'a' runs as 'nobody', who cannot execute", out), out
    assert re.search(r"ok\s+run_as\s+2 agent\(s\) can start as their own user", out), out
