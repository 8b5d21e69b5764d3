"""The graceful pause (intake stops, running runs finish) and bounded agents (max_runs_per_day).

In-process against real Redis and both databases (no workers) for the gates, a dispatch storm from
several processes for the bound's race, and the real test fleet for the CLI and the executor's pause.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func
from sqlmodel import select

from fleet import db, keys, killswitch, ledger, pause, ticks
from fleet.dispatch import DispatchRequest, dispatch
from fleet.errors import UnavailableError
from fleet.keys import GLOBAL
from fleet.models import Pause, Run, RunEvent, RunStatus
from fleet.services import Services
from tests.harness import AGENTS, Fleet, wait_for

BOUND = 5
EXTRA = f"""
[agents.batch]                  # a bounded agent: fires {BOUND} times a day, then refuses `bounded`
command = ["true"]
est_cost_usd = 0.01
max_runs_per_day = {BOUND}
concurrency = 1000
timeout_s = 30

[agents.leaky-done]             # done, it says, with its own key and a screen clear in the reason
command = ["python", "-c",
           'import json, os; print(json.dumps({{"fleet_done": "key=%s \\x1b[2J" % os.getenv("FLEET_AGENT_KEY")}}))']
key_file = "keys/secret.key"
est_cost_usd = 0.01
timeout_s = 30

[agents.ticking]
command = ["true"]
schedule = "every 30s"
est_cost_usd = 0.01
timeout_s = 30
"""


@pytest.fixture
def services_agents() -> str:
    """The harness's agents and two of this module's own."""
    return AGENTS + EXTRA


def nowhere(_run_id: str, _fence: int) -> None:
    """A sender for dispatches nobody will execute."""


def go(services: Services, agent: str, key: str | None = None, dry_run: bool = False) -> Any:
    return dispatch(services, DispatchRequest(agent, key or uuid.uuid4().hex, None, dry_run, actor="test"), nowhere)


def runs_of(services: Services, agent: str) -> int:
    with db.session(services.engine) as session:
        return int(session.exec(select(func.count()).select_from(Run).where(Run.agent == agent)).one())


# ---------------------------------------------------------------- pause


@pytest.mark.parametrize("scope", [GLOBAL, "echo"])
def test_a_pause_refuses_dispatches_and_ticks_and_resume_lifts_it(services: Services, scope: str) -> None:
    """Paused (the fleet, or the agent): a dispatch is refused `paused` with the gate saying who and why,
    a tick is refused before any row is written; another agent is untouched by an agent's pause."""
    pause.engage(services.engine, services.redis, scope=scope, reason="db upgrade", actor="cli:ops", now=services.now())
    refused = go(services, "echo")
    assert (refused.status, refused.reason) == ("refused", "paused")
    assert not refused.gates["pause"].ok and "db upgrade" in refused.gates["pause"].detail
    assert refused.gates["kill"].ok  # a pause is not a kill
    plan = go(services, "echo", dry_run=True)
    assert (plan.status, plan.reason) == ("dry_run", "paused")
    tick = ticks.tick(services, "ticking", nowhere)
    assert (tick.status, tick.reason) == (("refused", "paused") if scope == GLOBAL else ("queued", None))
    assert runs_of(services, "echo") == 0
    assert go(services, "counter").status == ("refused" if scope == GLOBAL else "queued")
    assert pause.release(services.engine, services.redis, scope=scope, actor="cli:ops", now=services.now())
    assert go(services, "echo").status == "queued"
    assert not pause.release(services.engine, services.redis, scope=scope, actor="cli:ops", now=services.now())
    with db.session(services.engine) as session:
        kinds = [e.kind for e in session.exec(select(RunEvent).where(RunEvent.kind.startswith("pause.")))]  # type: ignore[attr-defined]
    assert kinds == ["pause.engaged", "pause.released"]


def test_a_pause_survives_a_redis_that_lost_its_data(services: Services) -> None:
    """The mirror holds the pause: Redis flushed (a restart without persistence), the next check refuses
    all the same and puts the flag back."""
    pause.engage(services.engine, services.redis, scope="echo", reason="maintenance", actor="cli:ops",
                 now=services.now())
    services.redis.flushdb()
    refused = go(services, "echo")
    assert (refused.status, refused.reason) == ("refused", "paused")
    assert services.redis.exists(keys.paused("echo"))
    assert "maintenance" in services.redis.get(keys.paused("echo"))


def test_any_value_under_a_pause_key_pauses(services: Services) -> None:
    """A bare reason (what workers wrote before the pause was mirrored) or a flag set by hand pauses."""
    services.redis.set(keys.paused("echo"), "agent said it is done: converged")
    refused = go(services, "echo")
    assert (refused.status, refused.reason) == ("refused", "paused")
    assert "converged" in refused.gates["pause"].detail
    with db.session(services.engine) as session:
        (found,) = pause.paused(session, services.redis, [GLOBAL, "echo"])
    assert (found.scope, found.reason) == ("echo", "agent said it is done: converged")
    assert pause.release(services.engine, services.redis, scope="echo", actor="test", now=services.now())
    assert go(services, "echo").status == "queued"


def test_an_agents_done_reason_reaches_no_pause_copy_with_its_key_or_a_terminal_escape(services: Services) -> None:
    """The security review's: an agent printed its FLEET_AGENT_KEY in its `fleet_done` reason. `fleet logs` masked
    it, but the pause it asked for kept it in clear everywhere the reason went: the Redis flag, the mirror row, the
    pause.engaged event, and `fleet status`, the page and /api/state (the snapshot)."""
    from fleet import executor, state

    key = (services.settings.config.parent / "keys" / "secret.key").read_text().strip()
    queued = go(services, "leaky-done")
    assert queued.status == "queued", queued
    executor.execute(services, queued.run_id or "", queued.fence or 0, lambda *_: None)
    with db.session(services.engine) as session:
        row = session.get(Pause, "leaky-done")
        events = [e.detail or "" for e in session.exec(select(RunEvent).where(RunEvent.kind == "pause.engaged"))]
    assert row is not None and row.engaged and "key=" in (row.reason or "")
    picture = json.dumps(state.snapshot(services))
    copies = {"redis": services.redis.get(keys.paused("leaky-done")) or "", "mirror": row.reason or "",
              "event": " ".join(events), "snapshot": picture}
    assert "[redacted by fleet]" in copies["mirror"], copies
    leaked = {where: text for where, text in copies.items() if key in text or "\x1b" in text or "\\u001b" in text}
    assert not leaked, leaked


def test_a_pause_with_redis_down_is_refused_or_held_by_the_mirror(services: Services, closed_port: int) -> None:
    """Redis unreachable: a paused mirror still answers `paused`; nothing mirrored means no guess (75)."""
    import dataclasses

    from fleet.services import redis_client

    dead = dataclasses.replace(services, redis=redis_client(f"redis://127.0.0.1:{closed_port}/0", timeout_s=0.5))
    with db.session(services.engine) as session, pytest.raises(UnavailableError):
        pause.check(session, dead.redis, "echo")
    pause.engage(services.engine, services.redis, scope="echo", reason="x", actor="test", now=services.now())
    with db.session(services.engine) as session:
        assert pause.check(session, dead.redis, "echo").paused
    down = db.make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{closed_port}/none")
    with pytest.raises(UnavailableError, match="NOT paused"):
        pause.engage(down, dead.redis, scope="counter", reason="x", actor="test", now=services.now())
    with pytest.raises(UnavailableError, match=r"in force.*mirror could not be written"):
        pause.engage(down, services.redis, scope="counter", reason="x", actor="test", now=services.now())
    down.dispose()


# ---------------------------------------------------------------- bounded agents


def test_a_bounded_agent_fires_its_runs_then_refuses_bounded(services: Services) -> None:
    """max_runs_per_day = 5: five dispatches queue, the sixth is refused `bounded` (the gate counts),
    a duplicate key does not count, and an unsent run gives its count back."""
    results = [go(services, "batch", f"b{i}") for i in range(BOUND - 1)]
    assert {r.status for r in results} == {"queued"}
    assert go(services, "batch", "b0").status == "duplicate"

    def broken(_run_id: str, _fence: int) -> None:
        raise ConnectionError("broker down")

    with pytest.raises(UnavailableError):
        dispatch(services, DispatchRequest("batch", "unsent", actor="test"), broken)
    assert go(services, "batch", "last").status == "queued"
    plan = go(services, "batch", dry_run=True)
    assert not plan.gates["bounded"].ok and plan.gates["bounded"].detail == f"{BOUND} of {BOUND} run(s) today"
    refused = go(services, "batch")
    assert (refused.status, refused.reason) == ("refused", "bounded")
    assert runs_of(services, "batch") == BOUND
    with db.session(services.engine) as session:
        day = ledger.budget_day(session, services.config.fleet.timezone)
        assert ledger.runs_counted(session, day=day, agent="batch") == BOUND
        # Only the queued runs hold a reservation: the refused and the unsent ones gave theirs back.
        reserved = session.exec(select(func.sum(Run.reserved_micros)).where(Run.agent == "batch")).one()
    assert reserved == BOUND * 10_000
    assert go(services, "echo").status == "queued"  # unbounded agents are not counted against it


def storm(services: Services, out: Path, processes: int, per_process: int) -> list[dict[str, Any]]:
    """`per_process` distinct dispatches of `batch` from each of `processes` processes at one instant."""
    start_at = time.time() + 4  # after every process has imported
    procs = [subprocess.Popen([sys.executable, "-m", "tests.storm", str(services.settings.config),
                               services.settings.broker_url, services.settings.database_url, "batch", "@distinct",
                               str(per_process), str(out / f"{i}.json"), str(start_at)])
             for i in range(processes)]
    for proc in procs:
        assert proc.wait(180) == 0
    return [r for f in sorted(out.iterdir()) for r in json.loads(f.read_text())]


@pytest.mark.slow
def test_concurrent_dispatches_never_pass_the_bound(services: Services, tmp_path: Path) -> None:
    """48 dispatches of a 5-a-day agent at once from 4 processes (8 threads each): exactly 5 queue,
    however many of them read a count of 4 before the others wrote."""
    results = storm(services, tmp_path / "storm", processes=4, per_process=12)
    queued = [r for r in results if r["status"] == "queued"]
    assert len(queued) == BOUND, results
    assert {r["reason"] for r in results if r["status"] != "queued"} == {"bounded"}, results
    assert runs_of(services, "batch") == BOUND
    with db.session(services.engine) as session:
        day = ledger.budget_day(session, services.config.fleet.timezone)
        assert ledger.runs_counted(session, day=day, agent="batch") == BOUND


# ---------------------------------------------------------------- the CLI and a real fleet


def assert_exit(proc: subprocess.CompletedProcess[str], code: int) -> None:
    assert proc.returncode == code, f"exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"


@pytest.mark.slow
def test_fleet_pause_lets_the_running_run_finish_and_refuses_new_work(fleet: Fleet) -> None:
    """`fleet pause AGENT` while a run runs: the run ends `succeeded` (a kill would have stopped it), a new
    dispatch exits 3 saying who paused it and why, `fleet status` says PAUSED (not KILLED), and
    `fleet resume AGENT` lifts it."""
    agent = "crashy"  # runs for 3 s
    fleet.reset_agent(agent)
    started = dispatch(fleet.services, DispatchRequest(agent, uuid.uuid4().hex, actor="test"), fleet.send_execute)
    wait_for(lambda: fleet.services.engine and _status(fleet, started.run_id) == RunStatus.RUNNING, 30, "running")
    try:
        paused = fleet.cli("pause", agent, "--reason", "swapping its key")
        assert_exit(paused, 0)
        said = {n: f"paused agent {agent}: swapping its key; {n} running run(s) left to finish " \
                   "(`fleet kill` stops them now)\n" for n in (0, 1)}
        assert paused.stdout in said.values(), paused.stdout
        if paused.stdout == said[0]:  # a slow CLI on a loaded machine: the 3 s run may have ended before it counted
            assert _status(fleet, started.run_id) != RunStatus.RUNNING
        refused = fleet.cli("dispatch", agent)
        assert_exit(refused, 3)
        assert refused.stdout.startswith(f"refused: paused — intake is paused for agent {agent} by cli:"), \
            refused.stdout
        assert "swapping its key" in refused.stdout and f"`fleet resume {agent}` lifts it" in refused.stdout
        status = fleet.cli("status", env={"COLUMNS": "300"})
        assert f"PAUSED {agent}" in status.stdout and "running runs finish" in status.stdout
        assert "KILLED" not in status.stdout
        picture = fleet.cli_json("status")
        # Other agents of the shared fleet may be paused by other tests (exit78 pauses itself): not this one's.
        assert [p["scope"] for p in picture["pauses"] if p["scope"] in (agent, "*")] == [agent]
        assert picture["kill"] == []
        wait_for(lambda: _status(fleet, started.run_id) in {RunStatus.SUCCEEDED, RunStatus.KILLED}, 30, "the run's end")
        assert _status(fleet, started.run_id) == RunStatus.SUCCEEDED
    finally:
        resumed = fleet.cli("resume", agent)
    assert_exit(resumed, 0)
    assert resumed.stdout == f"resumed agent {agent} (pause lifted)\n"
    assert fleet.cli("resume", agent).stdout == f"resumed agent {agent} (it was neither killed nor paused)\n"
    with db.session(fleet.services.engine) as session:
        assert not session.get(Pause, agent).engaged  # type: ignore[union-attr]


@pytest.mark.slow
def test_an_agent_that_exits_78_is_paused_by_the_same_mechanism(fleet: Fleet) -> None:
    """Exit 78 pauses the agent in Redis and in the mirror (a Redis restart keeps it), named by its run;
    `fleet resume AGENT` lifts it."""
    fleet.reset_agent("exit78")
    result = dispatch(fleet.services, DispatchRequest("exit78", uuid.uuid4().hex, actor="test"), fleet.send_execute)

    def mirrored() -> Pause | None:
        with db.session(fleet.services.engine) as session:
            row = session.get(Pause, "exit78")
        return row if row is not None and row.engaged else None

    row = wait_for(mirrored, 60, "the pause's mirror")
    assert row.actor == f"agent:{result.run_id}" and "78" in (row.reason or "")
    fleet.redis.delete(keys.paused("exit78"))  # as a Redis restart would
    proc = fleet.cli("dispatch", "exit78", "--json")
    assert_exit(proc, 3)
    refused = json.loads(proc.stdout)
    assert (refused["status"], refused["reason"]) == ("refused", "paused")
    assert_exit(fleet.cli("resume", "exit78"), 0)
    assert not fleet.redis.exists(keys.paused("exit78")) and mirrored() is None


def _status(fleet: Fleet, run_id: str | None) -> RunStatus | None:
    with db.session(fleet.services.engine) as session:
        run = session.get(Run, run_id)
    return None if run is None else run.status


@pytest.mark.parametrize("scope", [GLOBAL, "echo"])
def test_a_kill_redis_lost_still_refuses_a_dispatch_and_comes_back(services: Services, scope: str) -> None:
    """The kill's mirror is read with the pause's in the dispatch's one gate read: Redis flushed (a restart
    without persistence), a dispatch is refused as killed, nothing is queued and the flag is put back."""
    killswitch.engage(services.engine, services.redis, scope=scope, reason="runaway", actor="cli:ops", hard=False,
                      now=services.now())
    services.redis.flushdb()
    refused = go(services, "echo")
    assert (refused.status, refused.reason) == ("refused", "killed")
    assert "runaway" in refused.gates["kill"].detail
    assert services.redis.exists(keys.kill(scope))
    assert runs_of(services, "echo") == 0


@pytest.mark.parametrize("scope", [GLOBAL, "echo"])
def test_a_kill_released_while_a_dispatch_reads_its_mirror_is_never_refused_as_not_killed(
        services: Services, scope: str) -> None:
    """Found by review: the gate read says the mirror holds a kill, a `fleet resume` commits before the kill's
    detail is read (PostgreSQL's READ COMMITTED: two statements, two snapshots), and the refusal said "not
    killed". The detail read decides: a kill still held refuses with its reason; one released goes on."""
    if services.engine.dialect.name != "postgresql":
        pytest.skip("SQLite's write lock (BEGIN IMMEDIATE) holds the release until the dispatch ends")
    killswitch.engage(services.engine, services.redis, scope=scope, reason="runaway", actor="cli:ops", hard=False,
                      now=services.now())
    services.redis.flushdb()  # only the mirror holds the kill
    released: list[str] = []

    def release_after_the_gate_read(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if not released and "kill_switches" in statement:
            released.append(statement)
            killswitch.release(services.engine, services.redis, scope=scope, actor="cli:ops", now=services.now())

    event.listen(services.engine, "after_cursor_execute", release_after_the_gate_read)
    try:
        result = go(services, "echo")
    finally:
        event.remove(services.engine, "after_cursor_execute", release_after_the_gate_read)
    assert released, "the dispatch never read the kill mirror"
    assert (result.status, result.reason) in {("refused", "killed"), ("queued", None)}
    if result.status == "refused":
        assert "runaway" in result.gates["kill"].detail, result.gates["kill"].detail
