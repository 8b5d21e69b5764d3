"""What the soak (bench/soak.py) found, each as a scenario of its own.

Alerts are raised "once per transition" (fleet/alerts.py): an operator asleep gets one message when
something changes, not one per tick for as long as it stays changed.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from fleet import db, store
from fleet.models import TERMINAL, Run, RunStatus
from fleet.services import utcnow
from tests.faults.effects import EffectsLog, check_no_survivors
from tests.faults.fleet import FaultFleet, fault_fleet
from tests.faults.servers import PrivateCluster, build_clockshift
from tests.harness import wait_for
from tests.sentry_server import SentryServer

FLEET = """
[fleet]
daily_cap_usd = 100.0
lease_ttl_s = 5
heartbeat_s = 0.5
kill_grace_s = 1
"""
CAPPED = FLEET + """
[agents.capped]
command = ["python", "-m", "fleet.examples.effects_agent", "--log", "{tmp}/effects.log", "--cost", "0.01"]
est_cost_usd = 0.01
daily_cap_usd = 0.01
concurrency = 10
timeout_s = 60
"""


@pytest.fixture
def sentry() -> Iterator[SentryServer]:
    """A Sentry stand-in the fleet's processes report to."""
    with SentryServer() as server:
        yield server


def tagged_alerts(server: SentryServer, kind: str) -> list[dict[str, object]]:
    """The alert events of one kind that arrived."""
    return [e for e in server.events() if (e.get("tags") or {}).get("alert") == kind]


@pytest.mark.slow
def test_a_capped_agent_alerts_once_not_once_per_refused_dispatch(kind: str, tmp_path: Path, sentry: SentryServer,
                                                                   pg_cluster: PrivateCluster | None) -> None:
    """Found by the soak: a capped agent on a 2 s schedule sent a cap_refusal from every worker process
    every minute (each process dedupes only its own alerts): 32 events in 3 minutes, a storm all night.
    Here each refused dispatch is a process of its own, as ticks on many pool processes are."""
    with fault_fleet(kind, tmp_path, pg_cluster, agents=CAPPED, start=False, sentry_dsn=sentry.dsn()) as faults:
        _dispatch_expecting(faults, "queued")  # the one run today's cap has room for
        for _ in range(3):
            _dispatch_expecting(faults, "refused")
        # Each CLI process flushed its events before it exited: all of them have arrived.
        refusals = tagged_alerts(sentry, "cap_refusal")
        assert len(refusals) == 1, f"{len(refusals)} cap_refusal alerts for one cap reached once"


def _dispatch_expecting(faults: FaultFleet, status: str, agent: str = "capped") -> str:
    proc = faults.fleet.cli("dispatch", agent, "--json")
    assert proc.stdout.strip(), f"exit {proc.returncode}: {proc.stderr}"
    answer = json.loads(proc.stdout)
    assert answer["status"] == status, proc.stdout + proc.stderr
    return str(answer.get("run_id"))


def _run_to_end(faults: FaultFleet, agent: str = "overspender") -> None:
    run_id = _dispatch_expecting(faults, "queued", agent=agent)

    def ended() -> bool:
        with db.session(faults.fleet.services.engine) as session:
            run = store.get_run(session=session, run_id=run_id)
            return run is not None and run.status in TERMINAL

    wait_for(ended, 60, f"run {run_id} to end")


OVERSPENDER = FLEET + """
[agents.overspender]
command = ["python", "-m", "fleet.examples.effects_agent", "--log", "{tmp}/effects.log", "--seconds", "1",
           "--steps", "5", "--cost", "0.01"]
est_cost_usd = 0.001
daily_cap_usd = 0.025
timeout_s = 60
"""


@pytest.mark.slow
def test_an_agent_that_reports_past_its_cap_is_stopped_and_told(kind: str, tmp_path: Path, sentry: SentryServer,
                                                                pg_cluster: PrivateCluster | None) -> None:
    """Found by the soak: an agent that reserved $0.001 and reported $0.01 with $0.005 left under its cap was
    stopped and booked, $0.005 over the cap, and no overspend alert came: the running-cost guard stopped it
    before the bookkeeper's next pass, and only that pass looked for an overspend."""
    with fault_fleet(kind, tmp_path, pg_cluster, agents=OVERSPENDER, sentry_dsn=sentry.dsn()) as faults:
        _run_to_end(faults)  # books $0.02, stopped below the cap
        _run_to_end(faults)  # $0.005 left: its first report passes the cap
        assert faults.violations() == []
        spent = faults.effects.spent()
        assert spent > 25_000, f"the agent spent {spent} micro-dollars: the scenario did not pass the cap"
        sentry.wait_for(lambda: tagged_alerts(sentry, "overspend"), 20, "an overspend alert")


REVOKED = FLEET + """
[agents.revoked]
command = ["python", "-m", "fleet.examples.effects_agent", "--log", "{tmp}/effects.log", "--exit", "77"]
est_cost_usd = 0.001
breaker_cooldown_s = 2
timeout_s = 60
"""


@pytest.mark.slow
def test_a_breaker_alerts_when_it_opens_not_again_at_each_failed_trial(kind: str, tmp_path: Path,
                                                                        sentry: SentryServer,
                                                                        pg_cluster: PrivateCluster | None) -> None:
    """Found by the soak: an agent whose key is revoked (or that always crashes) sent breaker_opened each time
    its half-open trial failed, every cooldown all night (7 times in 3 minutes at a 20 s cooldown), though
    the alert means "failed breaker_threshold times in a row": once, until the breaker closes again."""
    with fault_fleet(kind, tmp_path, pg_cluster, agents=REVOKED, sentry_dsn=sentry.dsn()) as faults:
        _run_to_end(faults, "revoked")  # auth: the breaker opens at once
        time.sleep(2.5)  # the cool-down (on Redis's clock) passes: the next dispatch is the half-open trial
        _run_to_end(faults, "revoked")  # the trial fails: open again
        sentry.wait_for(lambda: len(tagged_alerts(sentry, "dead_letter")) == 2, 20, "both dead letters")
        opened = tagged_alerts(sentry, "breaker_opened")
        assert len(opened) == 1, f"{len(opened)} breaker_opened alerts: {[e.get('message') for e in opened]}"


FLAKY = FLEET + """retry_backoff_s = 4
resend_after_s = 3

[agents.flaky]
command = ["python", "-m", "fleet.examples.effects_agent", "--log", "{tmp}/effects.log", "--first-exit", "75"]
est_cost_usd = 0.001
timeout_s = 60
"""


@pytest.mark.slow
def test_a_retry_sent_by_a_worker_an_hour_ahead_is_not_held_back_an_hour(kind: str, tmp_path: Path,
                                                                          pg_cluster: PrivateCluster | None) -> None:
    """Found by the soak: a worker whose wall clock jumped an hour ahead sent a transient failure's retry with
    Celery's countdown (an ETA by its own clock) and stamped the run queued_at/retry_at by that clock. The
    worker that took the message held it for an hour, and the reaper, comparing those stamps with its own
    clock, saw nothing quiet to send again: the run sat queued until the drain gave up on it."""
    shift = build_clockshift(tmp_path)
    if shift is None:
        pytest.skip("no C compiler to build clockshift.so")
    clock = tmp_path / "clock"
    clock.write_text("3600\n")
    with fault_fleet(kind, tmp_path, pg_cluster, agents=FLAKY, start=False) as faults:
        ahead = faults.fleet.start_worker(concurrency=1, env={"LD_PRELOAD": str(shift), "CLOCKSHIFT_FILE": str(clock)})
        faults.fleet.wait_consuming(timeout=60)
        run_id = _dispatch_expecting(faults, "queued", agent="flaky")
        wait_for(lambda: any(e.run == run_id for e in faults.effects.of("END")), 60, "the first attempt to end")
        # It sends the retry and stops: whatever it held goes back to the queue, for a worker on the right time.
        faults.fleet.stop_worker(ahead)
        faults.fleet.start_worker(concurrency=1)

        def ended() -> bool:
            with db.session(faults.fleet.services.engine) as session:
                run = store.get_run(session=session, run_id=run_id)
                return run is not None and run.status in TERMINAL

        faults.reap_until(ended, 45, f"run {run_id}'s retry to run (resend_after_s is 3)")
        assert faults.violations() == []


def test_a_pid_reused_after_the_run_ended_is_not_its_survivor(engine: Engine, tmp_path: Path) -> None:
    """Found by the 30-minute soak on PostgreSQL: with pid_max at 32,768 the pids wrapped, and the checker
    called a run's processes alive because two new processes of its own time held their old pids. A
    survivor is a live process that is still the run's (its FLEET_RUN_ID), not any process with the pid."""
    now = utcnow()
    run = Run(id="e" * 32, idem_key="a:k", agent="a", work_key="k", status=RunStatus.SUCCEEDED, created_at=now,
              updated_at=now, finished_at=now)
    with db.session(engine) as session:
        session.add(run)
        session.commit()
    env = {k: v for k, v in os.environ.items() if k != "FLEET_RUN_ID"}
    stranger = subprocess.Popen(["sleep", "60"], env=env)
    survivor = subprocess.Popen(["sleep", "60"], env={**env, "FLEET_RUN_ID": run.id})
    try:
        log = tmp_path / "effects.log"
        log.write_text(f"START {run.id} 1 {stranger.pid} {stranger.pid} {time.time()}\n"
                       f"END {run.id} 1 0 {time.time()}\n")
        assert check_no_survivors(EffectsLog.read(log), engine) == []
        log.write_text(f"START {run.id} 1 {survivor.pid} {survivor.pid} {time.time()}\n")
        assert check_no_survivors(EffectsLog.read(log), engine) == [
            f"I4: run {run.id} is terminal but its processes [{survivor.pid}] still live"]
    finally:
        for proc in (stranger, survivor):
            proc.kill()
            proc.wait()
