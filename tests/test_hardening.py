"""No fleet credential in any process an agent can read; payloads out of Flower and `ps`.

The tests run as root, and root reads any /proc/PID/environ through CAP_SYS_PTRACE. So the scans for
canaries read all of /proc as root (the strongest reader there is), and non-dumpability is shown with
a reader of the same uid without capabilities (`setpriv` drops them all): the position of an agent
running under the worker's uid.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_lib

from fleet import db, store
from fleet.dispatch import DispatchRequest, dispatch
from tests.conftest import drop_pg_database, new_pg_database
from tests.harness import (
    CAPLESS,
    PY,
    ROOT,
    Fleet,
    PrivateRedis,
    assert_capless_reader_reads_a_dumpable_peer,
    capless_can_read,
    children_of,
    private_fleet,
    processes_holding,
    wait_for,
    wait_for_pids,
)

needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")

HOLD = """
[fleet]
lease_ttl_s = 3
heartbeat_s = 0.5
kill_poll_s = 0.1
kill_grace_s = 1

[agents.hold]
command = ["python", "-m", "fleet.examples.sleeper", "60", "--pidfile", "{tmp}/hold.pids"]
timeout_s = 120
"""


SHOW = """
[agents.show]
command = ["python", "-c", "import os; print('got', len(os.environ.get('FLEET_PAYLOAD', '')), 'bytes')"]
concurrency = 20
timeout_s = 30
"""


def dumpable_in(code: str) -> list[str]:
    """What a fresh interpreter prints running `code`, then `fleet.hardening.is_dumpable()` (the last line)."""
    script = f"{code}\nfrom fleet import hardening\nprint(hardening.is_dumpable())"
    proc = subprocess.run([PY, "-c", script], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()


# ---------------------------------------------------------------- non-dumpable


@needs_proc
def test_celery_processes_are_not_dumpable_and_agents_they_exec_are() -> None:
    """workers.app marks every Celery process at import; a plain interpreter is dumpable; exec resets it."""
    assert dumpable_in("") == ["True"]
    assert dumpable_in("import workers.app") == ["False"]
    probe = "from fleet import hardening; print(hardening.is_dumpable())"
    exec_child = ("import subprocess, sys; from fleet import hardening; assert hardening.make_undumpable()\n"
                  f"out = subprocess.run([sys.executable, '-c', {probe!r}], capture_output=True, text=True).stdout\n"
                  "print(out.strip())")
    assert dumpable_in(exec_child) == ["True", "False"]  # the exec'd child is dumpable again; its parent is not


# ---------------------------------------------------------------- a real worker, secrets from files


@pytest.mark.slow
@needs_proc
def test_no_fleet_secret_in_any_environ_or_cmdline_and_the_worker_is_unreadable(
        tmp_path: Path, pg_server: str, closed_port: int) -> None:
    """A canary in the Redis password, the database URL's password and the Sentry DSN, handed over as
    FLEET_*_FILE: while an agent runs, it is in no /proc/*/environ or cmdline on the machine, and the
    worker and its pool children cannot be read by a same-uid process (the agent itself can). The
    worker runs capless, like the reader, so that only its dumpable flag decides."""
    canary = uuid.uuid4().hex
    server = PrivateRedis(tmp_path)
    server.start()
    password = f"redispw{canary}"
    admin = redis_lib.Redis(port=server.port)
    admin.config_set("requirepass", password)  # at run time: redis-server's own argv stays clean
    admin.close()
    database = new_pg_database(pg_server)
    database_url = database.replace("://postgres@", f"://postgres:dbpw{canary}@")  # trust auth ignores it
    assert database_url != database
    dsn = f"http://sentrykey{canary}@127.0.0.1:{closed_port}/1"
    home = tmp_path / "fleet"
    home.mkdir()
    harness = Fleet(home, f"redis://:{password}@127.0.0.1:{server.port}/0", database_url, agents=HOLD,
                    secrets_as_files=True, sentry_dsn=dsn, worker_prefix=tuple(CAPLESS))
    try:
        harness.start(workers=1, concurrency=2)
        result = dispatch(harness.services, DispatchRequest("hold", "k1", {"x": 1}, False, actor="test"),
                          harness.send_execute)
        assert result.status == "queued", result
        [[agent]] = wait_for_pids(home / "hold.pids", 30)
        worker = harness.workers[0].pid
        pool = children_of(worker)
        assert pool and agent not in pool
        assert b"FLEET_REDIS_URL_FILE=" in Path(f"/proc/{worker}/environ").read_bytes()
        assert processes_holding(canary) == []
        for pid in (worker, *pool):
            assert not capless_can_read(f"/proc/{pid}/environ"), f"pid {pid} is dumpable"
        # The control: the same reader does read a dumpable process of the same uid, the agent.
        assert capless_can_read(f"/proc/{agent}/environ")
        assert_capless_reader_reads_a_dumpable_peer()
        assert harness.cli("kill", "hold", "--reason", "test over").returncode == 0
        wait_for(lambda: not Path(f"/proc/{agent}").exists(), 15, "the agent to stop")
    finally:
        harness.stop()
        server.stop()
        drop_pg_database(database)


# ---------------------------------------------------------------- payloads: Flower and ps


@pytest.fixture(scope="module")
def payload_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """A one-worker fleet of its own (events on, as workers.app sets them)."""
    with private_fleet(tmp_path_factory.mktemp("payload"), agents=SHOW) as (harness, _server):
        yield harness


def run_payload(harness: Fleet, run_id: str) -> str | None:
    """The payload stored with a run."""
    with db.session(harness.services.engine) as session:
        run = store.get_run(session=session, run_id=run_id)
        assert run is not None
        return run.payload


SEND_THROUGH_WORKERS_APP = """
import json, sys
from workers.app import app
from workers.tasks import dispatch
payload = json.loads(open(sys.argv[1]).read())
a = dispatch.apply_async(kwargs={"agent": "show", "work_key": sys.argv[2] + "-kw", "payload": payload})
b = app.send_task("fleet.dispatch", args=["show", sys.argv[2] + "-pos", payload])
print(json.dumps([a.id, b.id]))
"""


@pytest.mark.slow
def test_a_payload_never_reaches_flower(payload_fleet: Fleet, tmp_path: Path) -> None:
    """fleet.dispatch with a payload, sent by workers.app (apply_async and send_task, with task-sent
    events) and by a foreign client: Flower's /api/tasks shows the tasks, a marker, never the payload;
    the agents still get it."""
    harness = payload_fleet
    canary = f"payload-canary-{uuid.uuid4().hex}"
    port = _free_port()
    conf = tmp_path / "flowerconfig.py"
    conf.write_text("basic_auth = ['ops:flower-pw']\n")
    conf.chmod(0o600)
    flower = subprocess.Popen([PY, "-m", "celery", "-A", "workers.app", "flower", "--address=127.0.0.1",
                               f"--port={port}", f"--conf={conf}"], env=harness.env, cwd=harness.tmp,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                              start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_for(lambda: _flower_get(f"{api}/workers?refresh=1") is not None, 30, "Flower to answer")
        key = f"flower-{uuid.uuid4().hex[:8]}"
        payload_file = tmp_path / "payload.json"
        payload_file.write_text(json.dumps({"secret": canary}))
        sent = subprocess.run([PY, "-c", SEND_THROUGH_WORKERS_APP, str(payload_file), key], env=harness.env,
                              cwd=harness.tmp, capture_output=True, text=True, timeout=60, check=True)
        ids = json.loads(sent.stdout.strip().splitlines()[-1])
        foreign = harness.celery.send_task("fleet.dispatch", queue="dispatch", kwargs={
            "agent": "show", "work_key": f"{key}-foreign", "payload": {"secret": canary}})
        ids.append(foreign.id)
        results = [harness.celery.AsyncResult(task_id).get(timeout=30) for task_id in ids]
        assert [r["status"] for r in results] == ["queued"] * 3, results

        def all_seen() -> dict[str, Any] | None:
            tasks = _flower_get(f"{api}/tasks")
            done = tasks and all(tasks.get(i, {}).get("state") == "SUCCESS" and tasks[i].get("kwargs") is not None
                                 for i in ids)
            return tasks if done else None

        tasks = wait_for(all_seen, 30, "Flower to see the three dispatches succeed", interval=0.3)
        listing = json.dumps(tasks)
        assert canary not in listing
        for task_id in ids:
            info = _flower_get(f"{api}/task/info/{task_id}")
            assert info is not None and canary not in json.dumps(info)
            assert "<payload withheld>" in info["args"] + info["kwargs"], info
        for result in results:  # the payload itself reached the run, unmasked
            assert json.loads(run_payload(harness, result["run_id"]) or "null") == {"secret": canary}
    finally:
        flower.terminate()
        flower.wait(10)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _flower_get(url: str) -> Any:
    try:
        response = httpx.get(url, auth=("ops", "flower-pw"), timeout=5, trust_env=False)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


def dispatch_seen_by_ps(harness: Fleet, payload_arg: str, key: str, stdin: str | None = None) -> tuple[str, str]:
    """Run `fleet dispatch show --payload ARG --wait --json`; (the `ps` listing taken while it ran, its run id)."""
    proc = subprocess.Popen([PY, "-m", "fleet", "dispatch", "show", "--key", key, "--payload", payload_arg, "--wait",
                             "--json"], env=harness.env, cwd=harness.tmp, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def listing() -> str | None:
        seen = subprocess.run(["ps", "-eo", "pid,args", "--no-headers", "-ww"], capture_output=True, text=True,
                              timeout=10).stdout
        return seen if key in seen else None

    try:
        seen = wait_for(listing, 30, "the dispatch to show in ps", interval=0.05)
        out, err = proc.communicate(stdin, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    return seen, json.loads(out)["run_id"]


@pytest.mark.slow
def test_a_payload_from_a_file_or_stdin_stays_out_of_ps(payload_fleet: Fleet, tmp_path: Path) -> None:
    """`--payload @FILE` and `--payload -` reach the run; `ps` never shows them (inline JSON it does)."""
    canary = f"ps-canary-{uuid.uuid4().hex}"
    body = json.dumps({"secret": canary})
    payload_file = tmp_path / "payload.json"
    payload_file.write_text(body)
    run = time.monotonic_ns()
    for arg, stdin in ((f"@{payload_file}", None), ("-", body)):
        seen, run_id = dispatch_seen_by_ps(payload_fleet, arg, f"ps-{run}-{len(arg)}", stdin)
        assert canary not in seen, arg
        assert json.loads(run_payload(payload_fleet, run_id) or "null") == {"secret": canary}, arg
    # The control: the inline form is visible to every user of the machine, which is why the others exist.
    seen, _ = dispatch_seen_by_ps(payload_fleet, body, f"ps-{run}-inline")
    assert canary in seen


def test_the_commands_log_files_are_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cli.jsonl (what a command logged: alerts naming runs) and soft-fail.jsonl (cron's failures) are the
    fleet user's only, new or left 0644 before: a run_as agent reads neither."""
    from fleet.cli.common import LogFile, _soft_fail_record

    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "soft-fail.jsonl").write_text("")
    (logs / "soft-fail.jsonl").chmod(0o644)
    monkeypatch.setenv("FLEET_LOG_DIR", str(logs))
    log = LogFile(logs / "cli.jsonl")
    log.write('{"event": "x"}\n')
    log.flush()
    _soft_fail_record("exit 75")
    assert log._handle is not None
    log._handle.close()
    assert {p.name: p.stat().st_mode & 0o777 for p in logs.iterdir()} == {"cli.jsonl": 0o600,
                                                                          "soft-fail.jsonl": 0o600}
    assert (logs / "cli.jsonl").read_text() == '{"event": "x"}\n'


def test_a_private_file_whose_replace_fails_leaves_no_copy_of_its_secret_behind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`fleet up`'s pointer holds the embedded server's password: a write that fails half-way (a full disk, a
    rename refused) must not leave the staged copy next to it."""
    from fleet import hardening

    target = tmp_path / ".fleet-redis-url"

    def refused(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hardening.os, "replace", refused)
    with pytest.raises(OSError):
        hardening.replace_private(target, "redis://:pw@127.0.0.1:1/0")
    assert list(tmp_path.iterdir()) == []
