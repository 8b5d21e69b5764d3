"""The watchdog notices a fleet that is alive but not consuming, says so loudly, and heals what it knows."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis as redis_lib

from fleet import db, keys, killswitch, ticks, watchdog
from fleet.keys import GLOBAL
from fleet.models import WatchdogVerdict
from fleet.services import Services
from tests.harness import AGENTS, Fleet, wait_for
from tests.sentry_server import SentryServer
from tests.test_dispatch import send, wait_status

pytestmark = pytest.mark.slow


@pytest.fixture
def sentry() -> Iterator[SentryServer]:
    with SentryServer() as server:
        yield server


def consumption(verdict: dict[str, Any]) -> dict[str, str]:
    return {c["name"]: c["status"] for c in verdict["checks"] if c["name"].startswith("consumption:")}


@pytest.fixture
def services_agents() -> str:
    """The `services` fixture's fleet.toml here: the test agents and two scheduled ones."""
    return AGENTS + """
[agents.minutely]
command = ["true"]
schedule = "every 60s"
est_cost_usd = 0.01

[agents.quarterly]
command = ["true"]
schedule = "*/15 * * * *"
est_cost_usd = 0.01
"""


def only(services: Services, agent: str) -> Services:
    """The same clients with a fleet.toml of one agent."""
    config = dataclasses.replace(services.config, agents={agent: services.config.agents[agent]})
    return dataclasses.replace(services, config=config)


def store_verdict(services: Services, status: str) -> None:
    """A verdict as an earlier watchdog pass leaves it."""
    with db.session(services.engine) as session:
        session.add(WatchdogVerdict(at=services.now(), status=status, host="earlier-pass", checks="[]"))
        session.commit()


def test_stopped_workers_turn_the_watchdog_red_and_alert(fleet: Fleet, sentry: SentryServer) -> None:
    """The red path after a green pass (the transition that alerts): exit 1, the alert, the red verdict stored."""
    env = {"FLEET_SENTRY_DSN": sentry.dsn()}
    store_verdict(fleet.services, watchdog.GREEN)
    for worker in fleet.workers:
        os.killpg(worker.pid, signal.SIGSTOP)  # alive, but consuming nothing
    try:
        red = fleet.cli("watchdog", "--wait", "3", "--json", env=env)
        assert red.returncode == 1, red.stdout + red.stderr
        verdict = json.loads(red.stdout)
        assert verdict["status"] == "red" and set(consumption(verdict).values()) == {"red"}
        sentry.wait_for(lambda: [e for e in sentry.events() if e.get("tags", {}).get("alert") == "watchdog_red"],
                        15, "the watchdog_red alert to reach Sentry")
        with db.session(fleet.services.engine) as session:
            stored = watchdog.latest(session)
            assert stored is not None and stored.status == watchdog.RED
    finally:
        for worker in fleet.workers:
            os.killpg(worker.pid, signal.SIGCONT)
    green = fleet.cli("watchdog", "--wait", "20", "--json", env=env)
    assert green.returncode == 0, green.stdout + green.stderr
    assert set(consumption(json.loads(green.stdout)).values()) == {"green"}


def test_idle_fleet_is_healthy(fleet: Fleet) -> None:
    proc = fleet.cli("watchdog", "--wait", "20", "--json")
    verdict = json.loads(proc.stdout)
    assert proc.returncode == 0 and set(consumption(verdict).values()) == {"green"}
    assert {c["name"]: c["status"] for c in verdict["checks"]}["stuck_runs"] == "green"


def test_watchdog_heals_an_orphaned_lease_and_a_lost_kill_flag(fleet: Fleet) -> None:
    fleet.reset_agent("echo")
    result = send(fleet, "echo", f"heal-{uuid.uuid4().hex}")
    run = wait_status(fleet, result.run_id, {"succeeded"})
    # The executor releases its lease just after it persists the outcome: plant ours after that.
    wait_for(lambda: not fleet.redis.exists(keys.slot_lease("echo", 0)), 10, "the run's own lease to go")
    fleet.redis.set(keys.slot_lease("echo", 0), f"{run.id}:{run.fence}")  # a lock left for a finished run
    services = fleet.services
    killswitch.engage(services.engine, services.redis, scope="exit3", reason="heal test", actor="test", hard=False,
                      now=services.now())
    try:
        fleet.redis.delete(keys.kill("exit3"))  # as if Redis restarted without it
        verdict = watchdog.run_watchdog(services, None, store_verdict=False)
        assert any("orphaned lease" in h for h in verdict.healed)
        assert any("kill flag" in h for h in verdict.healed)
        assert fleet.redis.get(keys.slot_lease("echo", 0)) is None
        assert fleet.redis.get(keys.kill("exit3")) is not None
    finally:
        killswitch.release(services.engine, services.redis, scope="exit3", actor="test", now=services.now())
    assert not fleet.redis.get(keys.kill(GLOBAL))


# ---------------------------------------------------------------- freshness and beat liveness (no workers)


def test_a_canary_that_came_back_long_ago_is_not_back(redis: redis_lib.Redis) -> None:
    now = datetime.now(UTC)
    for age, status in ((timedelta(minutes=19), watchdog.RED), (timedelta(seconds=50), watchdog.GREEN)):
        stamp = (now - age).isoformat()
        redis.set(keys.canary_sent("agents"), stamp)
        redis.set(keys.canary("agents"), stamp)
        check = watchdog.canary_check(redis, "agents", now, watchdog.CANARY_DEADLINE_S)
        assert check.status == status, check


def test_a_fleet_whose_scheduled_agents_are_all_paused_is_not_beat_silent(services: Services) -> None:
    start = datetime(2026, 12, 1, 12, 0, 1, tzinfo=UTC)
    svc = only(services, "minutely")
    svc.redis.set(keys.last_tick(), start.isoformat())  # its last tick before it paused itself
    svc.redis.set(keys.paused("minutely"), "fleet_done: converged")
    for minute in range(1, 10):  # beat goes on ticking it every minute
        tick_at = start + timedelta(minutes=minute)
        result = ticks.tick(dataclasses.replace(svc, now=lambda at=tick_at: at), "minutely", lambda *_: None)
        assert (result.status, result.reason) == ("refused", "paused")
    check = watchdog.beat_check(svc, start + timedelta(minutes=9, seconds=30))
    assert check.status == watchdog.GREEN, check


def test_beat_is_silent_only_once_a_due_slot_is_late(services: Services) -> None:
    svc = only(services, "quarterly")  # */15: quiet for 15 minutes between ticks
    svc.redis.set(keys.last_tick(), "2026-12-01T12:00:02+00:00")
    at = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    assert watchdog.beat_check(svc, at + timedelta(minutes=10)).status == watchdog.GREEN
    assert watchdog.beat_check(svc, at + timedelta(minutes=17, seconds=30)).status == watchdog.GREEN  # 150 s late
    late = watchdog.beat_check(svc, at + timedelta(minutes=18, seconds=30))
    assert late.status == watchdog.RED and "12:15:00" in late.reason, late


def _run_row(svc: Services, agent: str, status: str, started_ago_s: float) -> str:
    from fleet.models import Run

    now = datetime.now(UTC)
    run = Run(id=uuid.uuid4().hex, idem_key=f"{agent}:{uuid.uuid4().hex}", agent=agent, work_key="w", status=status,
              created_at=now, updated_at=now, started_at=now - timedelta(seconds=started_ago_s))
    with db.session(svc.engine) as session:
        session.add(run)
        session.commit()
    return run.id


def test_a_half_open_trial_that_ended_is_freed_and_one_past_its_timeout_is_red(services: Services) -> None:
    """Issue 10 item 8: a trial whose run ended can never report; the watchdog frees it. A trial running far
    past its agent's timeout is red: it would hold the breaker half-open for good."""
    ended = _run_row(services, "echo", "killed", 5)
    services.redis.hset(keys.breaker("echo"), mapping={"state": "half_open", "trial": ended})
    check = next(c for c in watchdog.run_watchdog(services, None, store_verdict=False).checks if c.name == "breakers")
    assert check.status == watchdog.AMBER and f"freed the trial of echo (trial {ended} ended killed)" in check.reason
    assert "trial" not in services.breakers.state("echo")
    overdue = _run_row(services, "echo", "running", 3600)
    services.redis.hset(keys.breaker("echo"), mapping={"state": "half_open", "trial": overdue})
    check = next(c for c in watchdog.run_watchdog(services, None, store_verdict=False).checks if c.name == "breakers")
    assert check.status == watchdog.RED and overdue in check.reason


def test_an_open_breaker_redis_lost_is_opened_again_from_the_database(services: Services) -> None:
    """DESIGN: a missing Redis value is read as the safe answer. The breaker lived in Redis only, and a lost hash
    read `closed`: after a restart without persistence an agent whose key was revoked (exit 77 opens its breaker
    at once) was admitted again, every tick, until its next failure (found by review). The watchdog's pass that
    finds Redis's data lost opens again every breaker whose `breaker.open` event is within its cool-down."""
    from fleet import executor
    from fleet.dispatch import DispatchRequest, dispatch

    queued = dispatch(services, DispatchRequest("exit77", uuid.uuid4().hex, actor="test"), lambda *_: None)
    assert executor.execute(services, queued.run_id or "", queued.fence or 0, lambda *_: None).status == "dead"
    with db.session(services.engine) as session:  # an earlier pass: this one is not the fleet's first
        session.add(WatchdogVerdict(at=datetime.now(UTC), status="green", checks="[]"))
        session.commit()
    services.redis.flushdb()  # Redis restarts without persistence
    healed = watchdog.heal(services)
    assert any("exit77" in line for line in healed), healed
    after = dispatch(services, DispatchRequest("exit77", uuid.uuid4().hex, actor="test"), lambda *_: None)
    assert (after.status, after.reason) == ("refused", "breaker_open"), after
    assert not any("breaker" in line for line in watchdog.heal(services))  # once: the marker is set again


def test_a_watchdog_pass_marks_the_redis_database_and_turns_red_on_another_fleets_mark(services: Services) -> None:
    """Two fleets on one Redis database take each other's runs and kills: each pass renews this fleet's mark on
    it, and a pass that finds another fleet's mark there is red, saying how to part them."""
    def owner_check() -> watchdog.Check:
        return next(c for c in watchdog.run_watchdog(services, None, store_verdict=False).checks
                    if c.name == "redis_owner")

    assert owner_check().status == watchdog.GREEN
    assert services.redis.get(keys.owner()) == services.fleet_id and services.redis.ttl(keys.owner()) > 0
    services.redis.set(keys.owner(), uuid.uuid4().hex, ex=300)  # another fleet's watchdog, a moment later
    check = owner_check()
    assert check.status == watchdog.RED and "another fleet" in check.reason and "FLEET_REDIS_URL" in check.reason


def test_a_watchdog_that_stays_red_raises_its_alert_again_every_hour(services: Services,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """watchdog_red was raised once, at the transition: an alert Sentry could not take then (its endpoint down:
    sentry-sdk drops what it cannot deliver) left a fleet red all night without a page. While it stays red the
    alert comes again every RED_REMINDER_S of the spell (into the same Sentry issue); passes in between raise
    nothing. The hour passes on the fleet's own clock."""
    raised: list[str] = []
    monkeypatch.setattr(watchdog.alerts, "alert", lambda kind, message, **_: raised.append(f"{kind}: {message}"))
    start = datetime.now(UTC)
    clock = [start - timedelta(minutes=1)]
    services.now = lambda: clock[0]
    store_verdict(services, watchdog.GREEN)
    services.redis.set(keys.owner(), uuid.uuid4().hex, ex=300)  # a red check: another fleet's mark

    def red_pass(minutes: float) -> list[str]:
        clock[0] = start + timedelta(minutes=minutes)
        raised.clear()
        assert watchdog.run_watchdog(services, None).status == watchdog.RED
        return [r for r in raised if r.startswith("watchdog_red")]

    assert len(red_pass(0)) == 1  # the transition
    assert red_pass(1) == [] and red_pass(59) == []  # still red: nothing new to say
    (again,) = red_pass(61)
    assert "still red" in again and "redis_owner" in again
    assert red_pass(62) == [] and len(red_pass(121)) == 1


def test_another_fleets_mark_is_said_as_lapsing_in_its_ttl_unless_renewed_not_after_that_fleet_stops() -> None:
    """The refusal read "its mark lapses 268 s after that fleet stops renewing it" of a fleet that is running and
    renews it every minute: the 268 s are what is left now, and a stopped fleet's mark lapses within the TTL."""
    from fleet.tenancy import MARK_TTL_S, OtherFleet

    said = OtherFleet("d09c92f8aaaa", 268).describe()
    assert "after that fleet stops" not in said, said
    assert "in 268 s unless that fleet renews it" in said and f"{MARK_TTL_S // 60} minutes" in said, said
    assert "does not expire" in OtherFleet("d09c92f8aaaa", -1).describe()
