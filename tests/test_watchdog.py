"""The watchdog notices a fleet that is alive but not consuming, says so loudly, and heals what it knows."""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from fleet import db, keys, killswitch, watchdog
from fleet.keys import GLOBAL
from fleet.models import WatchdogVerdict
from fleet.services import Services
from tests.harness import Fleet, wait_for
from tests.sentry_server import SentryServer
from tests.test_dispatch import send, wait_status

pytestmark = pytest.mark.slow


@pytest.fixture
def sentry() -> Iterator[SentryServer]:
    with SentryServer() as server:
        yield server


def consumption(verdict: dict[str, Any]) -> dict[str, str]:
    return {c["name"]: c["status"] for c in verdict["checks"] if c["name"].startswith("consumption:")}


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
