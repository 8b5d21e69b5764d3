"""Faults found by review that break a promise on the code as it stands: each scenario fails today and is
marked a strict expected failure, so the suite stays green until the fix removes the marker."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from sqlalchemy import update
from sqlmodel import col, select

from fleet import db, executor, keys
from fleet.dispatch import DispatchRequest, DispatchResult, dispatch
from fleet.locks import Lease, Leases
from fleet.models import Run, RunStatus, SpendDay
from fleet.services import Services, utcnow
from tests.faults.conftest import FAULT_AGENTS, FaultFleet, fault_fleet
from tests.faults.effects import EffectsLog, check_ledger
from tests.faults.proxy import PASS, RESET
from tests.faults.servers import PrivateCluster
from tests.harness import executor_of, wait_for
from tests.test_dispatch import run_of, send

pytestmark = [pytest.mark.slow, pytest.mark.faults]
T = TypeVar("T")

# A heartbeat of 5 s (the default) leaves the window between two lease renewals wide open, as it is in
# production; a lease of 13 s is the shortest that fits two heartbeats (fleet/config.py).
SOLO_TIMINGS = {"lease_ttl_s = 5\n": "lease_ttl_s = 13\n", "heartbeat_s = 0.5\n": "heartbeat_s = 5\n",
                "kill_unreachable_grace_s = 2\n": "kill_unreachable_grace_s = 30\n"}
SOLO_AGENTS = functools.reduce(lambda text, pair: text.replace(*pair), SOLO_TIMINGS.items(), FAULT_AGENTS) + """
[agents.solo]
command = ["python", "-m", "fleet.examples.effects_agent", "--log", "{tmp}/effects.log", "--seconds", "8",
           "--steps", "2", "--cost", "0.01"]
est_cost_usd = 0.02
timeout_s = 60
concurrency = 1
"""


def _alive_span(log: EffectsLog, run_id: str) -> tuple[float, float] | None:
    """From a run's first START to the last line any of its processes wrote."""
    times = [e.t for e in log.effects if e.run == run_id]
    return (min(times), max(times)) if times else None


def _retrying(call: Callable[[], T], attempts: int = 20) -> T:
    """A call made right after Redis came back: the first try may meet the connection the restart closed."""
    for _ in range(attempts - 1):
        try:
            return call()
        except (redis.ConnectionError, OSError):
            continue
    return call()


def test_redis_restarted_under_a_running_agent_does_not_give_its_slot_away(
        kind: str, tmp_path: Path, pg_cluster: PrivateCluster | None) -> None:
    """Redis restarts empty while a concurrency-1 agent runs, and a dispatch of the same agent comes in before
    the executor's next renewal: the running agent must keep running (a blip is not a death) and no second
    agent may run beside it (one fenced lease per slot, fleet-wide)."""
    with fault_fleet(kind, tmp_path, pg_cluster, agents=SOLO_AGENTS) as faults:
        first = send(faults.fleet, "solo", f"first-{uuid.uuid4().hex}")
        assert first.status == "queued"
        faults.accepted.add(first.run_id)
        wait_for(lambda: faults.effects.starts(first.run_id), 60, "the first agent to start")
        # The claim renewed the lease; the watch loop renews it again 5 s later. Redis loses it now.
        faults.redis_server.stop()
        faults.redis_server.start()
        # A fresh worker, so this scenario does not rest on the first one surviving the restart (it does not:
        # test_a_redis_restart_leaves_the_workers_consuming).
        faults.fleet.start_worker()
        second = _retrying(lambda: send(faults.fleet, "solo", f"second-{uuid.uuid4().hex}"))
        assert second.status in {"queued", "refused"}, second
        if second.status == "queued":
            faults.accepted.add(second.run_id)
        faults.reap_until(lambda: all(run_of(faults.fleet, r).status in {"succeeded", "dead", "killed", "failed"}
                                      for r in faults.accepted), 150, "every accepted run to finish")
        log = faults.effects
        spans = [(r, span) for r in faults.accepted if (span := _alive_span(log, r)) is not None]
        overlapping = [(a, b) for i, (a, sa) in enumerate(spans) for b, sb in spans[i + 1:]
                       if sa[0] < sb[1] and sb[0] < sa[1]]
        assert not overlapping, f"two runs of a concurrency-1 agent ran at once: {overlapping}"
        run = run_of(faults.fleet, first.run_id)
        assert (run.status, run.attempt, len(log.starts(first.run_id))) == (RunStatus.SUCCEEDED, 1, 1), (
            f"the running agent did not survive the Redis restart: {run.status}, attempt {run.attempt}, "
            f"error {run.error!r}")
        assert faults.violations() == []


def test_a_redis_restart_leaves_the_workers_consuming(faults: FaultFleet) -> None:
    """Redis restarts (down for a moment, back empty) while an agent runs: the agent runs on, and the worker
    goes on consuming afterwards; a restart is a blip, not the end of every worker on every host."""
    result = send(faults.fleet, "work", f"restart-{uuid.uuid4().hex}")
    faults.accepted.add(result.run_id)
    wait_for(lambda: faults.effects.starts(result.run_id), 60, "the agent to start")
    faults.redis_server.stop()
    faults.redis_server.start()
    run = faults.reap_until(lambda: run_of(faults.fleet, result.run_id).status in {"succeeded", "dead", "killed"}
                            and run_of(faults.fleet, result.run_id), 60, "the running agent's run to finish")
    assert run.status == RunStatus.SUCCEEDED and run.attempt == 1
    (worker,) = faults.fleet.workers
    after = send(faults.fleet, "quick", f"after-{uuid.uuid4().hex}")
    faults.accepted.add(after.run_id)
    faults.reap_until(lambda: run_of(faults.fleet, after.run_id).status in {"succeeded", "dead"}, 60,
                      "a run dispatched after the restart to finish")
    assert worker.poll() is None, f"the worker exited ({worker.returncode}) after Redis restarted"
    assert faults.violations() == []


STICKY_AGENT = """
[agents.sticky]
command = ["python", "-m", "fleet.examples.effects_agent", "--log", "{tmp}/effects.log", "--seconds", "5",
           "--steps", "5", "--cost", "0.01", "--child", "--ignore-term", "--exit", "1"]
est_cost_usd = 0.05
timeout_s = 60
concurrency = 1
"""

DENIED_AGENT = """
[agents.denied]
command = ["python", "-m", "fleet.examples.effects_agent", "--log", "{tmp}/effects.log", "--cost", "0.01",
           "--exit", "77"]
est_cost_usd = 0.01
timeout_s = 60
"""


@pytest.fixture
def pg_faults(tmp_path: Path, pg_cluster: PrivateCluster | None) -> Iterator[FaultFleet]:
    """A fault fleet on a private PostgreSQL behind the proxy, with an agent whose key is refused (exit 77)."""
    with fault_fleet("postgresql", tmp_path, pg_cluster, agents=FAULT_AGENTS + DENIED_AGENT + STICKY_AGENT) as faults:
        yield faults


def _alerts(faults: FaultFleet, kind: str, run_id: str) -> list[dict[str, object]]:
    """The alert lines the workers logged (the only trace of an alert when Sentry is off) of one kind and run."""
    found = []
    for path in faults.fleet.tmp.glob("worker-*.log"):
        for line in path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("event") == "alert" and entry.get("kind") == kind and entry.get("run_id") == run_id:
                found.append(entry)
    return found


def _run_with_a_cut_commit(faults: FaultFleet, agent: str, statement: bytes) -> Run:
    """Run one agent whose first transaction sending `statement` has its COMMIT applied but its answer lost."""
    assert faults.db_proxy is not None
    faults.db_proxy.cut_on(statement, b"COMMIT")
    result = send(faults.fleet, agent, f"cut-{uuid.uuid4().hex}")
    faults.accepted.add(result.run_id)
    run: Run = faults.reap_until(lambda: run_of(faults.fleet, result.run_id).status in {"succeeded", "dead", "killed"}
                                 and run_of(faults.fleet, result.run_id), 60, "the run to end")
    assert faults.db_proxy.cuts == 1, f"no commit after {statement!r} was cut"
    return run


def test_an_ambiguous_commit_of_a_dead_letter_still_raises_its_alert(pg_faults: FaultFleet) -> None:
    """The COMMIT that dead-letters a run (its key was refused: exit 77, terminal) reaches PostgreSQL but its answer
    never comes back: the executor's retry finds its own write, and the operator must still hear of it."""
    run = _run_with_a_cut_commit(pg_faults, "denied", b"INSERT INTO dead_letters")
    assert run.status == RunStatus.DEAD
    assert pg_faults.violations() == []
    # The cut COMMIT made the run DEAD before the executor heard a thing: its retry, which finds its own write
    # and alerts, comes a backoff later (seconds on a loaded machine). Wait for the alert, with a deadline.
    wait_for(lambda: _alerts(pg_faults, "dead_letter", run.id), 30, "the dead letter's alert (none: silence)")


def test_an_ambiguous_commit_of_a_running_charge_is_counted_once(pg_faults: FaultFleet) -> None:
    """The COMMIT that books an agent's first reported step reaches PostgreSQL but its answer is lost: the step
    must be booked once, not once more with the next usage line (counted once: the run's cost is what it spent)."""
    run = _run_with_a_cut_commit(pg_faults, "work", b"spent_micros = spent_micros +")
    assert run.status == RunStatus.SUCCEEDED and run.attempt == 1
    assert pg_faults.violations() == []
    spent = pg_faults.effects.spent(run.id)
    assert run.cost_micros == spent, f"the run spent {spent} micro-dollars and was booked {run.cost_micros}"


# A program reporting one priced step in the json-tokens format, on a line over 1 MiB (a Messages API response
# echoed whole, with a long answer in it); it records what the step cost in its effects log first.
LONG_LINE_AGENT = """
[prices."model-x"]
input_per_mtok = 3.00
output_per_mtok = 15.00
cache_write_per_mtok = 3.75
cache_read_per_mtok = 0.30

[agents.long-line]
command = ["python", "-c", '''
import json, os, sys
from fleet.examples.effects_agent import record
log, run, attempt = sys.argv[1], os.environ["FLEET_RUN_ID"], os.environ["FLEET_ATTEMPT"]
record(log, "START", run, attempt, os.getpid(), os.getpgid(0))
record(log, "SPEND", run, attempt, 1000 * 3 + 100000 * 15)
answer = {"type": "text", "text": "x" * (2 * 2**20)}
print(json.dumps({"model": "model-x", "content": [answer], "usage": {"input_tokens": 1000, "output_tokens": 100000}}))
record(log, "END", run, attempt, 0)
''', "{tmp}/effects.log"]
usage_format = "json-tokens"
models = ["model-x"]
est_cost_usd = 2.00
timeout_s = 60
"""


def test_a_usage_line_over_a_mebibyte_is_not_counted_as_nothing(kind: str, tmp_path: Path,
                                                                pg_cluster: PrivateCluster | None) -> None:
    """A json-tokens step reported on a line longer than 1 MiB: its $1.50 must be booked (or the agent stopped as
    unpriceable and booked its whole reservation), never $0 in silence."""
    with fault_fleet(kind, tmp_path, pg_cluster, agents=FAULT_AGENTS + LONG_LINE_AGENT) as faults:
        result = send(faults.fleet, "long-line", f"long-{uuid.uuid4().hex}")
        faults.accepted.add(result.run_id)
        faults.reap_until(lambda: run_of(faults.fleet, result.run_id).status in {"succeeded", "dead", "failed"},
                          60, "the run to end")
        assert faults.effects.spent(result.run_id) == 1_503_000
        assert faults.violations() == []


class _SlowBeforeAcquire:
    """The reaper's leases, with `before` run once just before it takes a slot for `run_id` (a reaper slow between
    its abandon and its requeue: a GC pause, a slow kill-mirror read)."""

    def __init__(self, leases: Leases, run_id: str, before: Callable[[], None]) -> None:
        self._leases, self._run_id, self._before = leases, run_id, before

    def __getattr__(self, name: str) -> object:
        return getattr(self._leases, name)

    def acquire(self, agent: str, concurrency: int, run_id: str, ttl_s: float, **options: Any) -> Lease | None:
        """Take a slot, as Leases does, after the pause."""
        if run_id == self._run_id:
            before, self._before = self._before, lambda: None
            before()
        return self._leases.acquire(agent, concurrency, run_id, ttl_s, **options)


def _worker_logged(faults: FaultFleet, event: str, run_id: str) -> bool:
    return any(f'"{event}"' in line and run_id in line for path in faults.fleet.tmp.glob("worker-*.log")
               for line in path.read_text(errors="replace").splitlines())


def test_a_takeover_never_hands_the_old_fence_to_the_retry(pg_faults: FaultFleet) -> None:
    """An executor that cannot write its outcome (the database cut off) is frozen past its lease; the reaper takes
    the run over, and while it is between its abandon and its requeue the executor wakes and renews: its renewal
    re-creates the lease key the reaper just freed. The retry must still get a fence of its own, so that the old
    executor's outcome, once the database is back, cannot land on the retry that is running."""
    faults = pg_faults
    assert faults.db_proxy is not None
    result = send(faults.fleet, "sticky", f"sticky-{uuid.uuid4().hex}")
    faults.accepted.add(result.run_id)
    run_id, fence = result.run_id, result.fence
    start = wait_for(lambda: faults.effects.starts(run_id), 60, "the first attempt to start")[0]
    pool = executor_of(start.value)
    wait_for(lambda: len([e for e in faults.effects.of("SPEND") if e.run == run_id]) >= 3, 60, "the third step")
    faults.db_proxy.set(RESET)  # the worker loses the database; the agent ends (exit 1) and its outcome waits
    wait_for(lambda: _worker_logged(faults, "run.outcome_write_failed", run_id), 30, "the outcome write to fail")
    faults.freeze(pool)
    lease_key = keys.slot_lease("sticky", 0)

    def wake_the_old_executor() -> None:
        os.kill(pool, signal.SIGCONT)
        wait_for(lambda: faults.fleet.redis.get(lease_key) == f"{run_id}:{fence}", 10, "the old executor to renew")
        faults.freeze(pool)
        faults.db_proxy.set(PASS)  # type: ignore[union-attr]

    reaper = dataclasses.replace(faults.fleet.services)
    reaper.__dict__["leases"] = _SlowBeforeAcquire(faults.fleet.services.leases, run_id, wake_the_old_executor)
    try:
        wait_for(lambda: faults.fleet.reap(reaper) and run_of(faults.fleet, run_id).status == "queued", 60,
                 "the reaper to take the run over", interval=0.5)
        wait_for(lambda: len(faults.effects.starts(run_id)) >= 2, 60, "the retry to start")
    finally:
        os.kill(pool, signal.SIGCONT)
        faults.db_proxy.set(PASS)
    run = faults.reap_until(lambda: run_of(faults.fleet, run_id).status in {"dead", "succeeded", "killed"}
                            and run_of(faults.fleet, run_id), 90, "the run to end")
    assert [s.attempt for s in faults.effects.starts(run_id)] == ["1", "2"], f"attempt {run.attempt} started"
    assert faults.violations() == []


# Run in this process, one attempt at a time (the executor as a worker runs it, with a real agent): a trusted
# agent whose key is refused (its breaker opens at once) and one that fails after spending (retried once).
IN_PROCESS_AGENTS = FAULT_AGENTS + """
[agents.refused]
command = ["python", "-m", "fleet.examples.effects_agent", "--log", "{tmp}/effects.log", "--exit", "77"]
est_cost_usd = 0.01
timeout_s = 60
breaker_cooldown_s = 1

[agents.spends-then-fails]
command = ["python", "-m", "fleet.examples.effects_agent", "--log", "{tmp}/effects.log", "--steps", "2",
           "--cost", "0.01", "--exit", "1"]
est_cost_usd = 0.02
timeout_s = 60
"""


@pytest.fixture
def idle(kind: str, tmp_path: Path, pg_cluster: PrivateCluster | None) -> Iterator[FaultFleet]:
    """A fault fleet's database and Redis with no worker: the test runs each attempt itself."""
    with fault_fleet(kind, tmp_path, pg_cluster, agents=IN_PROCESS_AGENTS, start=False) as faults:
        yield faults


def send_with(services: Services, agent: str) -> DispatchResult:
    """A dispatch from a host whose clients (and clock) are `services`; its message is not sent anywhere."""
    return dispatch(services, DispatchRequest(agent, f"{agent}-{uuid.uuid4().hex}", actor="test"),
                    lambda _run_id, _fence: None)


def _queue(services: Services, agent: str) -> DispatchResult:
    result = send_with(services, agent)
    assert result.status == "queued", result
    return result


def _no_requeue(_run_id: str, _fence: int, _countdown: float) -> None:
    return None


def test_a_worker_with_its_clock_a_day_ahead_cannot_hold_a_breaker_open_for_a_day(idle: FaultFleet) -> None:
    """A worker whose clock runs a day ahead (a VM resumed with a stale offset, NTP broken) records an auth failure:
    the breaker opens, and must half-open after its 1 s cool-down for the other hosts, not a day later."""
    services = idle.fleet.services
    ahead = dataclasses.replace(services, now=lambda: utcnow() + timedelta(days=1))
    first = _queue(services, "refused")
    ended = executor.execute(ahead, first.run_id or "", first.fence or 0, _no_requeue)
    assert ended.status == "dead"
    assert services.breakers.state("refused").get("state") == "open"
    time.sleep(1.5)  # the agent's cool-down (1 s), and a margin
    trial = send_with(services, "refused")
    assert trial.status == "queued", f"the breaker is still {trial.gates['breaker'].detail} after its cool-down"


def test_a_retry_after_midnight_keeps_the_ledger_equal_to_the_runs(idle: FaultFleet) -> None:
    """The first attempt spends and fails before midnight; its retry is claimed after. Each day's ledger must still
    equal what the runs say they cost that day (I5), the first attempt's $0.02 included."""
    services = idle.fleet.services
    result = _queue(services, "spends-then-fails")
    run_id = result.run_id or ""
    first = executor.execute(services, run_id, result.fence or 0, _no_requeue)
    assert first.status == "queued", first  # the retry waits
    # The first attempt ran yesterday: its reservation, its spend and its budget day are yesterday's.
    yesterday = "2000-01-01"
    today = run_of(idle.fleet, run_id).budget_day
    with db.session(services.engine) as session:
        for row in session.exec(select(SpendDay).where(SpendDay.day == today)).all():
            session.add(SpendDay(day=yesterday, scope=row.scope, spent_micros=row.spent_micros,
                                 reserved_micros=row.reserved_micros, updated_at=row.updated_at))
            session.delete(row)
        session.execute(update(Run).where(col(Run.id) == run_id).values(budget_day=yesterday))
        session.commit()
    assert check_ledger(idle.effects, services.engine) == []  # a consistent yesterday
    second = executor.execute(services, run_id, result.fence or 0, _no_requeue)
    assert second.status == "dead", second
    assert idle.effects.spent(run_id) == 40_000
    assert check_ledger(idle.effects, services.engine) == []
