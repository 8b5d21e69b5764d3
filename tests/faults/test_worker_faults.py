"""Workers and brokers misbehaving under running agents: a blip, a killed pool process, a poison run."""

from __future__ import annotations

import os
import signal
import uuid

import pytest

from fleet.models import RunStatus
from tests.faults.conftest import FaultFleet
from tests.faults.effects import pid_alive
from tests.faults.proxy import PASS, RESET
from tests.harness import wait_for
from tests.test_dispatch import run_of, send, wait_status

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def _started(faults: FaultFleet, run_id: str, count: int = 1) -> list[int]:
    starts = wait_for(lambda: len(faults.effects.starts(run_id)) >= count and faults.effects.starts(run_id),
                      60, f"{count} attempt(s) of {run_id} to start")
    return [s.value for s in starts]


def test_broker_blip_leaves_running_agents_running(faults: FaultFleet) -> None:
    """Every Redis connection of the worker is cut mid-run: the agent runs on, its outcome is recorded once."""
    result = send(faults.fleet, "work", f"blip-{uuid.uuid4().hex}")
    faults.accepted.add(result.run_id)
    _started(faults, result.run_id)
    faults.redis_proxy.set(RESET)
    faults.redis_proxy.set(PASS)
    run = wait_status(faults.fleet, result.run_id, {"succeeded", "failed", "dead", "killed"}, timeout=60)
    ends = [e for e in faults.effects.of("END") if e.run == result.run_id]
    assert [e.attempt for e in ends] == ["1"], "the blip killed the running agent"
    assert run.status == RunStatus.SUCCEEDED and run.attempt == 1
    assert faults.violations() == []


def test_killed_pool_process_takes_the_agents_whole_group(faults: FaultFleet) -> None:
    """A pool process SIGKILLed mid-run (an OOM kill): the agent and its children go at once, reaper or not."""
    result = send(faults.fleet, "oom-once", f"oom-{uuid.uuid4().hex}")
    _started(faults, result.run_id)
    pids = wait_for(lambda: len(faults.effects.pids(result.run_id)) >= 2 and faults.effects.pids(result.run_id),
                    30, "the agent's child to tick")
    # The agent kills its pool process half-way; nobody runs the reaper in this test.
    wait_for(lambda: not any(pid_alive(p) for p in pids), 10, f"every process of the attempt ({sorted(pids)}) to die")
    assert run_of(faults.fleet, result.run_id).status == RunStatus.RUNNING  # only the reaper decides what next


def test_poison_run_is_dead_lettered_after_exactly_two_attempts(faults: FaultFleet) -> None:
    """A run that kills its pool process on every attempt: two attempts, never overlapping, then crash_loop."""
    result = send(faults.fleet, "poison", f"poison-{uuid.uuid4().hex}")
    faults.accepted.add(result.run_id)
    run = faults.reap_until(lambda: run_of(faults.fleet, result.run_id).status == RunStatus.DEAD
                            and run_of(faults.fleet, result.run_id), 90, "the poison run to be dead-lettered")
    assert run.attempt == 2 and run.error is not None
    assert [s.attempt for s in faults.effects.starts(result.run_id)] == ["1", "2"]
    assert faults.violations() == []
    faults.fleet.wait_consuming()  # the worker replaced its killed pool processes


def test_worker_main_process_killed_mid_run(faults: FaultFleet) -> None:
    """The worker's main process is SIGKILLed: the run is retried once on a new worker, never overlapping."""
    result = send(faults.fleet, "work", f"main-{uuid.uuid4().hex}")
    faults.accepted.add(result.run_id)
    _started(faults, result.run_id)
    (worker,) = faults.fleet.workers
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(10)
    faults.fleet.workers.remove(worker)
    faults.fleet.start_worker()
    run = faults.reap_until(lambda: run_of(faults.fleet, result.run_id).status in {"succeeded", "dead"}
                            and run_of(faults.fleet, result.run_id), 90, "the run to finish")
    assert run.status == RunStatus.SUCCEEDED
    assert faults.violations() == []
