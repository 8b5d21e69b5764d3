"""The dispatch end to end: real Redis, real database (SQLite and PostgreSQL), real Celery workers."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlmodel import col, select

from fleet import db, keys, store
from fleet.config import Settings, load_fleet_config
from fleet.dispatch import DispatchRequest, dispatch, payload_argument
from fleet.errors import BadInputError
from fleet.models import DeadLetter, Run, RunEvent, RunStatus, SpendDay
from fleet.services import build
from tests.harness import SECRET_KEY, SECRET_TOKEN, Fleet, pid_alive, wait_for

pytestmark = pytest.mark.slow
TABLES = ("runs", "run_events", "dead_letters", "spend_days", "kill_switches", "watchdog_verdicts")


def send(fleet: Fleet, agent: str, work_key: str | None = None, payload: Any = None, dry_run: bool = False) -> Any:
    """Dispatch in this process, as `fleet dispatch` does."""
    return dispatch(fleet.services, DispatchRequest(agent, work_key, payload, dry_run, actor="test"),
                    fleet.send_execute)


def run_of(fleet: Fleet, run_id: str) -> Run:
    with db.session(fleet.services.engine) as session:
        run = store.get_run(session=session, run_id=run_id)
    assert run is not None
    return run


def wait_status(fleet: Fleet, run_id: str, statuses: set[str], timeout: float = 90) -> Run:
    def done() -> Run | None:
        run = run_of(fleet, run_id)
        return run if run.status in statuses else None

    return wait_for(done, timeout, f"run {run_id} to reach {statuses}")


def counts(fleet: Fleet) -> dict[str, int]:
    with fleet.services.engine.connect() as conn:
        return {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in TABLES}


def redis_snapshot(fleet: Fleet) -> dict[str, Any]:
    r = fleet.redis
    # Fleet's keys and the queues: kombu's own come and go as the workers run (unacked_mutex, a few seconds each)
    return {"keys": sorted(r.keys("fleet:*")),
            "dispatch": r.llen("dispatch"), "agents": r.llen("agents")}


def test_dry_run_writes_nothing(fleet: Fleet) -> None:
    fleet.reset_agent("echo")
    before_rows, before_redis = counts(fleet), redis_snapshot(fleet)
    result = send(fleet, "echo", f"dry-{uuid.uuid4().hex}", dry_run=True)
    assert result.status == "dry_run"
    assert result.would_fire and result.would_fire[0].startswith("new:echo:dry-")
    assert set(result.gates) == {"kill", "pause", "breaker", "bounded", "caps", "lock"}
    assert all(g.ok for g in result.gates.values())
    assert counts(fleet) == before_rows
    assert redis_snapshot(fleet) == before_redis


def test_dispatch_runs_once_and_settles(fleet: Fleet) -> None:
    fleet.reset_agent("echo")
    result = send(fleet, "echo", f"once-{uuid.uuid4().hex}", payload={"topic": "news"})
    assert result.status == "queued", result
    run = wait_status(fleet, result.run_id, {"succeeded", "dead"})
    assert run.status == RunStatus.SUCCEEDED and run.attempt == 1 and run.exit_code == 0
    assert run.cost_micros == 10_000 and run.reserved_micros == 0 and run.settled_at is not None
    log = (fleet.log_dir / "runs" / f"{run.id}.log").read_text()
    assert '{"topic":"news"}' in log and "fleet_usage" in log
    with db.session(fleet.services.engine) as session:
        kinds = [e.kind for e in store.run_events(session=session, run_id=run.id)]
    assert kinds == ["run.created", "run.queued", "run.started", "run.succeeded"]
    # The outcome commits first and the finish script frees the slot just after: wait for it, with a deadline.
    wait_for(lambda: fleet.services.leases.holders("echo", 1) == [], 10, "the run's slot lease to be released")
    again = send(fleet, "echo", run.work_key)
    assert again.status == "duplicate" and again.run_id == run.id


def test_busy_agent_is_refused_not_queued(fleet: Fleet) -> None:
    fleet.reset_agent("counter")
    first = send(fleet, "counter", f"busy-a-{uuid.uuid4().hex}")
    second = send(fleet, "counter", f"busy-b-{uuid.uuid4().hex}")
    assert first.status == "queued"
    assert second.status == "refused" and second.reason == "busy"
    with db.session(fleet.services.engine) as session:
        assert session.get(Run, second.run_id) is None  # refused: no row, the key may be used later
    wait_status(fleet, first.run_id, {"succeeded"})


def test_dedup_storm_one_run_one_process(fleet: Fleet, tmp_path: Path) -> None:
    """500 identical dispatches from 8 processes at once: one row, one agent process, one run id."""
    fleet.reset_agent("counter")
    counter = fleet.tmp / "counter.txt"
    lines_before = counter.read_text().count("\n") if counter.exists() else 0
    work_key = f"storm-{uuid.uuid4().hex}"
    out = tmp_path / "results"
    start_at = str(time.time() + 5)  # one moment for all, after every process has imported
    procs = [subprocess.Popen([sys.executable, "-m", "tests.storm", str(fleet.config_path), fleet.redis_url,
                               fleet.database_url, "counter", work_key, "63", str(out / f"{i}.json"),
                               start_at],
                              env=fleet.env) for i in range(8)]
    for proc in procs:
        assert proc.wait(120) == 0
    results = [r for f in out.iterdir() for r in json.loads(f.read_text())]
    assert len(results) == 8 * 63
    run_ids = {r["run_id"] for r in results}
    assert len(run_ids) == 1, run_ids
    assert sorted({r["status"] for r in results}) in (["duplicate", "queued"],)
    assert sum(r["status"] == "queued" for r in results) == 1
    (run_id,) = run_ids
    wait_status(fleet, run_id, {"succeeded"})
    with db.session(fleet.services.engine) as session:
        rows = session.exec(select(Run).where(Run.idem_key == f"counter:{work_key}")).all()
    assert len(rows) == 1
    lines = counter.read_text().splitlines()[lines_before:]
    assert [line.split()[0] for line in lines if line.split()[0] == run_id] == [run_id]
    # The lease goes in the finish script, a round trip after the outcome's commit that the status showed.
    wait_for(lambda: fleet.services.leases.holders("counter", 1) == [], 10, "the lease to be released")


def test_redelivered_execute_starts_nothing(fleet: Fleet) -> None:
    fleet.reset_agent("long")
    pidfile = fleet.tmp / "long.pids"
    before = pidfile.read_text().count("\n") if pidfile.exists() else 0
    result = send(fleet, "long", f"redeliver-{uuid.uuid4().hex}")
    running = wait_status(fleet, result.run_id, {"running"})
    wait_for(lambda: run_of(fleet, result.run_id).pid, 10, "the agent's pid to be recorded")
    lines = lambda: pidfile.read_text().count("\n") if pidfile.exists() else 0  # noqa: E731
    wait_for(lambda: lines() == before + 1, 10, "the agent to write its pid")
    duplicate = fleet.celery.send_task("fleet.execute", args=[result.run_id, running.fence], queue="agents",
                                       ignore_result=False)  # its answer, which the execute stores only if asked
    assert duplicate.get(timeout=20)["status"] == "duplicate"
    assert lines() == before + 1
    fleet.cli("kill", "long", "--reason", "test over", check=True)
    try:
        ended = wait_status(fleet, result.run_id, {"killed"}, timeout=15)
        assert ended.pid is None
        late = fleet.celery.send_task("fleet.execute", args=[result.run_id, running.fence], queue="agents",
                                      ignore_result=False)
        assert late.get(timeout=20)["status"] == "duplicate"
    finally:
        fleet.cli("resume", "long", check=True)


def test_failing_agent_retries_once_then_dead_letters(fleet: Fleet) -> None:
    fleet.reset_agent("fail")
    result = send(fleet, "fail", f"fail-{uuid.uuid4().hex}")
    run = wait_status(fleet, result.run_id, {"dead"})
    assert run.attempt == 2 and run.exit_code == 1
    with db.session(fleet.services.engine) as session:
        dead = session.exec(select(DeadLetter).where(DeadLetter.run_id == run.id)).all()
        kinds = [e.kind for e in store.run_events(session=session, run_id=run.id)]
    assert len(dead) == 1 and dead[0].attempts == 2 and dead[0].exit_code == 1
    assert "boom: the failing agent" in (dead[0].output_tail or "")
    assert kinds.count("run.started") == 2 and "run.retrying" in kinds and "run.dead_lettered" in kinds
    # The lease goes in the finish script, a round trip after the outcome's commit that the status showed.
    wait_for(lambda: fleet.services.leases.holders("fail", 1) == [], 10, "the lease to be released")


@pytest.mark.parametrize(("agent", "status", "attempts", "dead_reason"), [
    ("exit3", "idle", 1, None),
    ("exit75", "dead", 2, "transient"),
    ("exit77", "dead", 1, "auth"),
    ("exit78", "dead", 1, "config"),
])
def test_exit_codes_take_their_paths(fleet: Fleet, agent: str, status: str, attempts: int,
                                     dead_reason: str | None) -> None:
    fleet.reset_agent(agent)
    result = send(fleet, agent, f"code-{uuid.uuid4().hex}")
    run = wait_status(fleet, result.run_id, {"idle", "dead", "succeeded"})
    assert (run.status, run.attempt) == (status, attempts)
    with db.session(fleet.services.engine) as session:
        dead = session.exec(select(DeadLetter).where(DeadLetter.run_id == run.id)).first()
    assert (dead.reason if dead else None) == dead_reason
    if agent == "exit78":  # the agent's own pause follows its outcome's commit: wait for it, bounded
        wait_for(lambda: fleet.redis.exists(keys.paused(agent)), 10, "exit 78 to pause its agent")
    else:
        assert not fleet.redis.exists(keys.paused(agent))


def test_timeout_kills_the_whole_process_group(fleet: Fleet) -> None:
    fleet.reset_agent("timeout")
    pidfile = fleet.tmp / "timeout.pids"
    pidfile.unlink(missing_ok=True)
    result = send(fleet, "timeout", f"timeout-{uuid.uuid4().hex}")
    run = wait_status(fleet, result.run_id, {"dead"}, timeout=40)
    assert run.error == "timeout" and run.attempt == 2
    pids = [int(p) for line in pidfile.read_text().splitlines() for p in line.split()]
    assert len(pids) == 4  # two attempts, each an agent and a grandchild that ignores SIGTERM
    wait_for(lambda: not any(pid_alive(p) for p in pids), 5, "every process of both groups to be gone")


def test_idle_poll_starts_no_agent_and_costs_nothing(fleet: Fleet) -> None:
    fleet.reset_agent("idle-poll")
    result = send(fleet, "idle-poll", f"idle-{uuid.uuid4().hex}")
    run = wait_status(fleet, result.run_id, {"idle", "dead", "succeeded"})
    assert run.status == RunStatus.IDLE and run.cost_micros == 0 and run.reserved_micros == 0
    assert not (fleet.tmp / "idle-poll.txt").exists()


def test_agent_environment_is_clean(fleet: Fleet) -> None:
    fleet.reset_agent("env")
    result = send(fleet, "env", f"env-{uuid.uuid4().hex}", payload=[1, 2])
    run = wait_status(fleet, result.run_id, {"succeeded", "dead"})
    env = json.loads((fleet.log_dir / "runs" / f"{run.id}.log").read_text().strip().splitlines()[-1])
    assert env["MODEL"] == "sonnet" and env["FLEET_RUN_ID"] == run.id and env["FLEET_AGENT"] == "env"
    assert env["FLEET_PAYLOAD"] == "[1,2]" and env["FLEET_ATTEMPT"] == "1"
    assert not {"FLEET_REDIS_URL", "FLEET_DATABASE_URL", "FLEET_SENTRY_DSN", "FLEET_CONFIG"} & set(env)
    assert not any(fleet.redis_url in v or fleet.database_url in v for v in env.values())


def test_agent_key_never_leaks(fleet: Fleet) -> None:
    fleet.reset_agent("secret")
    result = send(fleet, "secret", f"secret-{uuid.uuid4().hex}")
    run = wait_status(fleet, result.run_id, {"succeeded", "dead"})
    assert run.status == RunStatus.SUCCEEDED
    log = (fleet.log_dir / "runs" / f"{run.id}.log").read_text()
    assert "the key is" in log
    everything = [log]
    with db.session(fleet.services.engine) as session:
        for model in (Run, RunEvent, DeadLetter, SpendDay):
            everything += [json.dumps(row.model_dump(mode="json")) for row in session.exec(select(model))]
    everything += [str(fleet.redis.dump(k)) for k in fleet.redis.keys("*")]
    for secret in (SECRET_KEY, SECRET_TOKEN):
        assert not any(secret in blob for blob in everything)


def test_a_key_file_emptied_after_the_worker_read_the_config_starts_nothing(fleet: Fleet) -> None:
    """A key file truncated after fleet.toml was taken (a rotation caught half-way, a disk that lost it): the
    agent is not started with an empty FLEET_AGENT_KEY. The run ends as a configuration refusal does:
    dead-lettered `config`, the agent paused, the reason in its log."""
    key_file = fleet.tmp / "keys" / "secret.key"
    fleet.reset_agent("secret")
    key_file.write_text("")
    try:
        run = wait_status(fleet, send(fleet, "secret", f"secret-{uuid.uuid4().hex}").run_id, {"succeeded", "dead"})
        log = (fleet.log_dir / "runs" / f"{run.id}.log").read_text()
        assert (run.status, run.exit_code) == (RunStatus.DEAD, 78), log
        assert "the key is" not in log
        assert f"{key_file} is empty" in log, log
        with db.session(fleet.services.engine) as session:
            [letter] = session.exec(select(DeadLetter).where(DeadLetter.run_id == run.id)).all()
        assert letter.reason == "config"
    finally:
        key_file.write_text(SECRET_KEY)
        fleet.reset_agent("secret")


@pytest.mark.parametrize(("args", "code"), [
    (["dispatch", "no-such-agent"], 69),
    (["dispatch", "echo", "--key", "caf\u00e9"], 65),
    (["dispatch", "echo", "--key", "has space"], 65),
    (["dispatch", "echo", "--payload", "{not json"], 65),
    (["dispatch", "echo", "--payload", json.dumps("x" * 40_000)], 65),
    # A Latin-1 terminal's "café": argv's surrogateescape gives a lone surrogate, which no database encodes (it was
    # a UnicodeEncodeError traceback, exit 1).
    (["dispatch", "echo", "--payload", '"caf\udce9"'], 65),
    (["dispatch", "echo", "--payload", '"caf\udce9"', "--dry-run"], 65),
])
def test_bad_input_is_refused_and_nothing_persists(fleet: Fleet, args: list[str], code: int) -> None:
    before = counts(fleet)
    proc = fleet.cli(*args)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.strip() and "Traceback" not in proc.stderr
    assert counts(fleet) == before


@pytest.mark.parametrize(("fields", "says"), [
    ({"agent": "echo", "dry_run": "false"}, "dry_run must be true or false"),
    ({"agent": "echo", "dry_run": 1}, "dry_run must be true or false"),
    ({"agent": ["echo"]}, "agent must be an agent's name"),
    ({"agent": None}, "agent must be an agent's name"),
])
def test_kwargs_of_the_wrong_type_from_celery_call_are_refused(fleet: Fleet, fields: dict[str, Any], says: str) -> None:
    """`celery call fleet.dispatch --kwargs '{"agent": "echo", "dry_run": "false"}'` was taken as a dry run (any
    non-empty string is true), and a list as the agent ended in a TypeError: both are bad input (65), named."""
    before = counts(fleet)
    with pytest.raises(BadInputError, match=says):
        dispatch(fleet.services, DispatchRequest(**fields, actor="test"), fleet.send_execute)
    assert counts(fleet) == before


def test_nul_in_work_key_is_refused(fleet: Fleet) -> None:
    from fleet.errors import BadInputError

    before = counts(fleet)
    with pytest.raises(BadInputError):
        send(fleet, "echo", "a\x00b")
    assert counts(fleet) == before


# ---------------------------------------------------------------- --payload: JSON, @FILE, - (stdin)


def test_payload_argument_reads_json_a_file_or_stdin(tmp_path: Path) -> None:
    """The file and stdin forms keep a payload out of the command line (`ps`)."""
    path = tmp_path / "payload.json"
    path.write_text('{"topic": "news", "n": 2}\n')
    unused = io.StringIO("never read")
    assert payload_argument(None, unused) is None
    assert payload_argument('{"topic": "news"}', unused) == {"topic": "news"}
    assert payload_argument(f"@{path}", unused) == {"topic": "news", "n": 2}
    assert payload_argument("-", io.StringIO('["a", 1]')) == ["a", 1]
    assert unused.read() == "never read"


@pytest.mark.parametrize(("value", "stdin", "message"), [
    ("@{tmp}/absent.json", "", "payload: {tmp}/absent.json does not exist"),
    ("@{tmp}", "", "payload: {tmp} is a folder"),
    ("@{tmp}/bad.json", "", "payload is not valid JSON"),
    ("-", "not json", "payload is not valid JSON"),
    ("-", "", "payload is not valid JSON"),
    ("@", "", "payload: . is a folder"),
])
def test_an_unusable_payload_argument_is_bad_input(tmp_path: Path, value: str, stdin: str, message: str) -> None:
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(BadInputError, match=message.format(tmp=tmp_path).replace(".", r"\.")):
        payload_argument(value.format(tmp=tmp_path), io.StringIO(stdin))


PAID_ONLY = """
[fleet]
daily_cap_usd = 0.02

[agents.paid]
command = ["true"]
est_cost_usd = 0.02
"""
ZERO_ESTIMATE = """
[agents.zero]
command = ["true"]
"""


def test_no_estimate_under_a_full_cap_starts_nothing(tmp_path: Path, database_url: str, redis_url: str) -> None:
    """At an exactly-full fleet cap, an agent with no estimate used to reserve $0 and be queued anyway."""
    config = tmp_path / "fleet.toml"
    config.write_text(PAID_ONLY)
    settings = Settings(config=config, redis_url=redis_url, database_url=database_url, log_dir=tmp_path / "logs")
    services = build(settings, load_fleet_config(config))
    try:
        services.redis.flushdb()
        db.upgrade(services.engine)
        filled = dispatch(services, DispatchRequest("paid", "fill", None, False, actor="test"), lambda _r, _f: None)
        assert filled.status == "queued"  # its $0.02 reservation fills the $0.02 cap exactly
        config.write_text(PAID_ONLY + ZERO_ESTIMATE)  # the operator adds an agent and no estimate
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        env.update(FLEET_CONFIG=str(config), FLEET_REDIS_URL=redis_url, FLEET_DATABASE_URL=database_url,
                   FLEET_LOG_DIR=str(tmp_path / "logs"))
        proc = subprocess.run([sys.executable, "-m", "fleet", "dispatch", "zero", "--key", "k"], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 78, proc.stdout + proc.stderr
        assert f"{config}:9: agent 'zero', est_cost_usd: required" in proc.stderr
        with db.session(services.engine) as session:
            runs = list(session.exec(select(Run)))
            assert [r.agent for r in runs] == ["paid"]
            fleet_row = session.get(SpendDay, (runs[0].budget_day, keys.GLOBAL))
            assert fleet_row is not None and (fleet_row.reserved_micros, fleet_row.spent_micros) == (20_000, 0)
    finally:
        services.close()


def test_a_run_through_celery_keeps_its_dispatchs_result_and_stores_nothing_for_its_execute(fleet: Fleet) -> None:
    """`celery call fleet.dispatch` then `celery result ID` shows what the dispatch decided (DESIGN), but the
    execute's outcome is its run's row: storing its STARTED and SUCCESS states in the result backend was two
    Redis writes per run (a sixth of a pool process's time in a profile of the consumer) that nobody reads.
    Flower still shows the execute from its task events."""
    fleet.reset_agent("echo")
    task = fleet.celery.send_task("fleet.dispatch", kwargs={"agent": "echo", "work_key": f"meta-{uuid.uuid4().hex}"},
                                  queue="dispatch")
    decided = task.get(timeout=30)
    assert decided["status"] == "queued", decided
    wait_status(fleet, decided["run_id"], {"succeeded"})
    stored = fleet.redis.keys(f"celery-task-meta-fleet.execute-{decided['run_id']}-*")
    assert stored == [], f"the execute's states were stored in the result backend: {stored}"
    assert fleet.redis.exists(f"celery-task-meta-{task.id}"), "the dispatch's decision is no longer kept"


def test_a_keyless_dispatch_message_delivered_twice_makes_one_run(fleet: Fleet) -> None:
    """Found by review: `fleet.dispatch(agent)` without a work key made a fresh key each time it ran, so the same
    message delivered twice (acks_late: a worker lost after the commit and before the ack, or a broker reconnect,
    PITFALLS #4 and #5) made two runs, and the agent ran twice for one request. Here the same message (its task
    id) reaches a real worker twice, the second once the first run is over: one run, and the second delivery
    answers it. (The result backend keeps the first answer: the workers' task events tell when each ended.)"""
    import threading

    fleet.reset_agent("echo")
    task_id = uuid.uuid4().hex
    ended: list[str] = []
    conn = fleet.celery.connection_for_read()
    receiver = fleet.celery.events.Receiver(conn, handlers={"task-succeeded": lambda e: ended.append(e["uuid"])})
    listener = threading.Thread(target=receiver.capture, kwargs={"limit": None, "timeout": None, "wakeup": False},
                                daemon=True)
    listener.start()
    try:

        def receiver_hears() -> bool:  # a canary's event heard: the receiver's queue is bound, ours cannot be missed
            canary = fleet.celery.send_task("fleet.canary.dispatch", args=["ping"], queue="dispatch")
            canary.get(timeout=10)
            deadline = time.monotonic() + 2
            while canary.id not in ended and time.monotonic() < deadline:
                time.sleep(0.05)
            return canary.id in ended

        wait_for(receiver_hears, 30, "the event receiver to hear the workers")
        first = fleet.celery.send_task("fleet.dispatch", kwargs={"agent": "echo"}, queue="dispatch", task_id=task_id)
        decided = first.get(timeout=30)
        assert decided["status"] == "queued", decided
        wait_status(fleet, decided["run_id"], {"succeeded"})
        fleet.celery.send_task("fleet.dispatch", kwargs={"agent": "echo"}, queue="dispatch", task_id=task_id)
        wait_for(lambda: ended.count(task_id) >= 2, 30, "the second delivery to end")
    finally:
        receiver.should_stop = True  # seen within its one-second drain
        listener.join(10)
        conn.release()
    with db.session(fleet.services.engine) as session:
        runs = session.exec(select(Run).where(col(Run.dispatched_by).like(f"%:{task_id}"))).all()
    assert [run.id for run in runs] == [decided["run_id"]], f"one message, {len(runs)} runs"


def test_a_dispatcher_whose_clock_runs_ahead_never_archives_a_run_queued_a_moment_ago(services: Any) -> None:
    """Found by review: archive-stale took a unit's unstarted run for stale when it was created more than
    stale_after_s before the dispatcher's own clock. A host whose clock ran two hours ahead, asked for the same key
    again (a retried `fleet dispatch --key`, a redelivered message), archived the run another host had queued a
    moment before and answered `duplicate`: accepted work dropped unstarted, its message a no-op. Staleness is
    judged by the database's clock, the one every host shares."""
    if services.engine.dialect.name != "postgresql":
        pytest.skip("SQLite's clock is its host's: there is no other clock to run ahead of it")
    from dataclasses import replace
    from datetime import timedelta

    from fleet.services import utcnow

    first = dispatch(services, DispatchRequest("echo", "unit-skew", actor="test"), lambda *_: None)
    assert first.status == "queued", first  # its message waits behind a busy queue
    ahead = replace(services, now=lambda: utcnow() + timedelta(hours=2))
    again = dispatch(ahead, DispatchRequest("echo", "unit-skew", actor="test"), lambda *_: None)
    with db.session(services.engine) as session:
        run = session.get(Run, first.run_id)
    assert run is not None and (again.archived, run.status) == ([], RunStatus.QUEUED), (
        f"archived {again.archived}: the run queued a moment ago is {run.status if run else None}")
