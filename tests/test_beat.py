"""Beat and the sweeps that make Fleet safe to leave alone: two beats never double-fire, a worker
killed mid-run is recovered exactly once, and a run that keeps killing its worker is buried."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from fleet import db, keys
from fleet.models import DeadLetter, Run, RunEvent, RunStatus
from tests.harness import AGENTS, Fleet, executor_of, pid_alive, private_fleet, wait_for, wait_for_pids
from tests.test_dispatch import run_of, send, wait_status

pytestmark = pytest.mark.slow

TICKER = AGENTS + """
[agents.ticker]
command = ["python", "-m", "fleet.examples.echo_agent", "--append", "{tmp}/ticker.txt"]
schedule = "every 2s"
est_cost_usd = 0.01
timeout_s = 30
"""


def reap_until(fleet: Fleet, condition: Any, timeout: float, what: str) -> Any:
    """Run the reaper as beat would (here: every half second) until `condition` holds."""
    def step() -> Any:
        fleet.reap()
        return condition()

    return wait_for(step, timeout, what, interval=0.5)


@pytest.fixture
def beat_fleet(tmp_path: Path) -> Any:
    beats: list[subprocess.Popen[bytes]] = []
    with private_fleet(tmp_path, TICKER, concurrency=2) as (harness, _):
        try:
            yield harness, beats
        finally:
            for proc in beats:
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait(15)


def test_two_beats_fire_each_slot_once_and_survive_the_leader(beat_fleet: Any) -> None:
    fleet, beats = beat_fleet
    beats += [fleet.start_beat("a"), fleet.start_beat("b")]

    def slots() -> list[str]:
        with db.session(fleet.services.engine) as session:
            return sorted(r.work_key for r in session.exec(select(Run).where(Run.agent == "ticker")))

    wait_for(lambda: len(slots()) >= 3, 60, "three slots to fire")
    leader = wait_for(lambda: fleet.redis.get(keys.beat_leader()), 10, "a beat leader")
    leader_pid = int(leader.split(":")[1])
    (victim,) = [b for b in beats if b.pid == leader_pid]
    before = len(slots())
    os.kill(victim.pid, signal.SIGKILL)  # no chance to release the lease: the standby must wait it out
    victim.wait(5)
    wait_for(lambda: len(slots()) >= before + 3, 60, "the standby to take over and fire three more slots")
    new_leader = fleet.redis.get(keys.beat_leader())
    assert new_leader and new_leader != leader
    fired = slots()
    assert len(fired) == len(set(fired))  # the unique key: one run per slot, whatever was sent
    sends = sum(len(re.findall(r"Sending due task fleet.ticks:", (fleet.tmp / f"beat-{n}.log").read_text()))
                for n in ("a", "b"))
    with db.session(fleet.services.engine) as session:
        refused = session.exec(select(RunEvent).where(RunEvent.agent == "ticker",
                                                      RunEvent.kind == "dispatch.refused")).all()
    # Only the leader sends: every tick message became a run, or was refused (busy) and recorded.
    assert sends == len(fired) + len(refused), (sends, len(fired), len(refused))
    lines = (fleet.tmp / "ticker.txt").read_text().splitlines()
    run_ids = [line.split()[0] for line in lines]
    assert len(run_ids) == len(set(run_ids))  # no slot's agent ran twice


def test_worker_killed_mid_run_is_retried_exactly_once(fleet: Fleet) -> None:
    fleet.reset_agent("crashy")
    pidfile = fleet.tmp / "crashy.pids"
    pidfile.unlink(missing_ok=True)
    result = send(fleet, "crashy", f"crash-{uuid.uuid4().hex}")
    ((agent, grandchild),) = wait_for_pids(pidfile, 60)
    pool_process = executor_of(agent)
    os.kill(pool_process, signal.SIGKILL)
    # The agent dies with its worker (parent-death signal): nothing runs unowned.
    wait_for(lambda: not pid_alive(agent), 5, "the orphaned agent to die with its worker")
    assert run_of(fleet, result.run_id).status == RunStatus.RUNNING  # only the reaper may decide
    reap_until(fleet, lambda: run_of(fleet, result.run_id).attempt == 2, 60, "the reaper to retry the run")
    # The first attempt's group (its grandchild ignores SIGTERM) was killed before the retry started.
    assert not pid_alive(grandchild)
    run = wait_status(fleet, result.run_id, {"succeeded", "dead"})
    assert run.status == RunStatus.SUCCEEDED and run.attempt == 2
    lines = pidfile.read_text().splitlines()
    assert len(lines) == 2  # the first attempt and exactly one retry; Celery's redelivery started nothing
    assert not any(pid_alive(int(p)) for line in lines for p in line.split())
    with db.session(fleet.services.engine) as session:
        kinds = [e.kind for e in session.exec(select(RunEvent).where(RunEvent.run_id == run.id))]
    assert kinds.count("run.started") == 2 and kinds.count("run.abandoned") == 1


def test_run_that_kills_its_worker_every_time_is_dead_lettered_as_crash_loop(fleet: Fleet) -> None:
    fleet.reset_agent("worker-killer")
    result = send(fleet, "worker-killer", f"loop-{uuid.uuid4().hex}")
    wait_status(fleet, result.run_id, {"running"}, timeout=60)

    def buried() -> Run | None:
        run = run_of(fleet, result.run_id)
        return run if run.status == RunStatus.DEAD else None

    run = reap_until(fleet, buried, 90, "the run to be dead-lettered")
    assert run.attempt == 2
    with db.session(fleet.services.engine) as session:
        dead = session.exec(select(DeadLetter).where(DeadLetter.run_id == run.id)).one()
    assert dead.reason == "crash_loop" and dead.attempts == 2
    fleet.wait_consuming()  # the workers replaced their killed pool processes


def test_reaper_never_touches_a_finished_run(fleet: Fleet) -> None:
    fleet.reset_agent("echo")
    result = send(fleet, "echo", f"done-{uuid.uuid4().hex}")
    before = wait_status(fleet, result.run_id, {"succeeded"})
    with db.session(fleet.services.engine) as session:  # make it look long silent
        row = session.get(Run, before.id)
        assert row is not None
        row.heartbeat_at = row.started_at
        session.add(row)
        session.commit()
    fleet.reap()
    after = run_of(fleet, result.run_id)
    assert (after.status, after.attempt, after.finished_at) == (before.status, before.attempt, before.finished_at)


def test_changed_fleet_toml_is_picked_up_and_a_bad_one_is_refused(beat_fleet: Any) -> None:
    fleet, beats = beat_fleet
    beats.append(fleet.start_beat("a"))

    def runs_of(agent: str) -> int:
        with db.session(fleet.services.engine) as session:
            return len(session.exec(select(Run).where(Run.agent == agent)).all())

    wait_for(lambda: runs_of("ticker") >= 1, 60, "the first tick")
    good = fleet.config_path.read_text()
    fleet.config_path.write_text(good + "\n[agents.broken]\ncommand = []\nschedule = \"every 2s\"\n")
    wait_for(lambda: "beat.config_invalid" in (fleet.tmp / "beat-a.log").read_text(), 30,
             "beat to report the bad file")
    before = runs_of("ticker")
    wait_for(lambda: runs_of("ticker") >= before + 2, 60, "ticks to go on with the last good schedule")
    ticker2 = "\n[agents.ticker2]" + TICKER.split("[agents.ticker]")[1].replace("{tmp}/ticker.txt",
                                                                              f"{fleet.tmp}/ticker2.txt")
    fleet.config_path.write_text(good + ticker2)
    def ticker2_succeeded() -> bool:  # beat ticked it and the workers ran it: both know the new agent
        with db.session(fleet.services.engine) as session:
            return any(r.status == RunStatus.SUCCEEDED for r in session.exec(select(Run).where(Run.agent == "ticker2")))

    wait_for(ticker2_succeeded, 60, "the new agent to run, without a restart")
