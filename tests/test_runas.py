"""`run_as`: agents under their own uid, with no capability, no key but their own, and no fleet secret.

The tests run as root. A worker that is not root but may switch users (compose's: CAP_SETUID,
CAP_SETGID and CAP_KILL as ambient capabilities) is played by `setpriv --reuid` with those ambient
capabilities, and one that may not by a capability-less root (tests.harness.CAPLESS). Agents run as
`nobody` with the system's /usr/bin/python3: the test venv's interpreter lives under /root, which
nobody cannot enter.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_lib

from fleet import db, redaction, store
from fleet.config import Settings, load_fleet_config
from fleet.dispatch import DispatchRequest, dispatch
from fleet.models import TERMINAL, Run
from fleet.process import Output
from tests.harness import (
    CAPLESS,
    ROOT,
    Fleet,
    PrivateRedis,
    pid_alive,
    wait_for,
)

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


def launch(options: list[str], argv: list[str], prefix: list[str] | None = None) -> subprocess.Popen[bytes]:
    """fleet/launcher.py under the system Python (it is stdlib only), as a new group leader."""
    return subprocess.Popen([*(prefix or []), SYSTEM_PY, "-I", "-S", str(LAUNCHER), f"parent={os.getpid()}",
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


# ---------------------------------------------------------------- redaction


def locked_redis(tmp_path: Path, password: str) -> PrivateRedis:
    """A Redis of the test's own that requires `password` (set at run time: its argv stays clean)."""
    server = PrivateRedis(tmp_path)
    server.start()
    admin = redis_lib.Redis(port=server.port)
    admin.config_set("requirepass", password)
    admin.close()
    return server


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
    assert redaction.url_secrets("redis://lonesecret@h:6379/0") == {"lonesecret"}
    assert redaction.url_secrets("sqlite:///./fleet.db") == set() and redaction.ordered(["abc", None, ""]) == ()
