"""The rails where they are needed: a retry that would pass the cap, a kill while the database is locked,
a breaker trial that never runs."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlmodel import select

from fleet import db, keys, killswitch
from fleet.dispatch import DispatchRequest, dispatch
from fleet.executor import execute
from fleet.models import DeadLetter, RunStatus
from tests.faults.conftest import FAULT_AGENTS, FaultFleet, fault_fleet
from tests.faults.effects import pid_alive
from tests.faults.servers import PrivateCluster
from tests.harness import wait_for
from tests.test_dispatch import run_of, send, wait_status

pytestmark = [pytest.mark.slow, pytest.mark.faults]

RAILS_AGENTS = FAULT_AGENTS + """
[agents.retry-spender]
command = ["python", "-m", "fleet.examples.effects_agent", "--log", "{tmp}/effects.log", "--cost", "0.01",
           "--exit", "75"]
est_cost_usd = 0.01
daily_cap_usd = 0.015
timeout_s = 60
"""


@pytest.fixture
def rails(kind: str, tmp_path: Path, pg_cluster: PrivateCluster | None) -> Iterator[FaultFleet]:
    """A fault fleet with the rails' agents."""
    with fault_fleet(kind, tmp_path, pg_cluster, agents=RAILS_AGENTS) as faults:
        yield faults


def test_a_retry_reserves_before_it_starts_and_never_passes_the_cap(rails: FaultFleet) -> None:
    """$0.01 an attempt against a $0.015 cap: the first attempt fits, the retry does not, so it never starts."""
    result = send(rails.fleet, "retry-spender", f"retry-{uuid.uuid4().hex}")
    rails.accepted.add(result.run_id)
    run = wait_status(rails.fleet, result.run_id, {"dead", "succeeded", "failed", "killed"}, timeout=60)
    assert len(rails.effects.starts(result.run_id)) == 1, "the retry started without a reservation"
    assert run.status == RunStatus.DEAD and run.cost_micros == 10_000
    with db.session(rails.fleet.services.engine) as session:
        dead = session.exec(select(DeadLetter).where(DeadLetter.run_id == run.id)).one()
    assert dead.reason == "over_cap"
    assert rails.violations(agent_caps={"retry-spender": 15_000}) == []


def _hold_database(faults: FaultFleet, run_id: str) -> object:
    """Block every write the run's executor makes: SQLite's write lock, or the run's row lock on PostgreSQL."""
    connection = faults.fleet.services.engine.connect()
    if faults.kind == "sqlite":
        connection.connection.dbapi_connection.execute("BEGIN IMMEDIATE")  # type: ignore[union-attr]
    else:
        connection.execute(text("SELECT id FROM runs WHERE id = :id FOR UPDATE"), {"id": run_id})
        connection.execute(text("LOCK TABLE spend_days IN EXCLUSIVE MODE"))
    return connection


def test_a_kill_stops_the_agent_while_the_database_is_locked(rails: FaultFleet) -> None:
    """The database is locked while an agent spends: the kill, which needs only Redis, still stops it at once."""
    result = send(rails.fleet, "long", f"locked-{uuid.uuid4().hex}")
    rails.accepted.add(result.run_id)
    wait_for(lambda: len(rails.effects.pids(result.run_id)) >= 2, 60, "the agent and its child to run")
    pids = rails.effects.pids(result.run_id)
    connection = _hold_database(rails, result.run_id)
    try:
        record = json.dumps({"reason": "db locked", "actor": "test", "at": "now", "hard": False})
        rails.fleet.redis.set(keys.kill("long"), record)
        killed_at = time.monotonic()
        wait_for(lambda: not any(pid_alive(p) for p in pids), 10, "every agent process to stop")
        took = time.monotonic() - killed_at
    finally:
        connection.rollback()  # type: ignore[attr-defined]
        connection.close()  # type: ignore[attr-defined]
    # SIGTERM within a poll; the agent ignores it, so SIGKILL after kill_grace_s (1 s here).
    assert took < 3.0, f"the agent outlived the kill by {took:.1f} s while the database was locked"
    rails.fleet.redis.delete(keys.kill("long"))
    wait_status(rails.fleet, result.run_id, {"killed"}, timeout=60)


def test_a_breaker_trial_that_never_runs_frees_the_trial(rails: FaultFleet) -> None:
    """The half-open trial is killed before it starts: after resume, the next dispatch is the new trial."""
    services = rails.fleet.services
    services.redis.hset(keys.breaker("quick"), mapping={"state": "open", "opened_at": 0, "failures": 3})
    sent: list[tuple[str, int]] = []
    trial = dispatch(services, DispatchRequest("quick", uuid.uuid4().hex, actor="test"),
                     lambda r, f: sent.append((r, f)))
    assert trial.status == "queued" and services.breakers.state("quick").get("trial") == trial.run_id
    killswitch.engage(services.engine, services.redis, scope="quick", reason="test", actor="test", hard=False,
                      now=services.now())
    ended = execute(services, trial.run_id, sent[0][1], lambda *_: None)
    assert ended.status == "killed"
    killswitch.release(services.engine, services.redis, scope="quick", actor="test", now=services.now())
    after = dispatch(services, DispatchRequest("quick", uuid.uuid4().hex, actor="test"), rails.fleet.send_execute)
    assert after.status == "queued", f"the breaker stayed half-open for a trial that never ran ({after.reason})"
    rails.accepted.update({trial.run_id, after.run_id})
    wait_status(rails.fleet, after.run_id, {"succeeded"}, timeout=60)
    assert run_of(rails.fleet, trial.run_id).status == RunStatus.KILLED
