"""Redis misbehaving: frozen with dispatches in flight, restarted empty with runs queued (and with the kill on)."""

from __future__ import annotations

import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fleet import killswitch
from fleet.dispatch import DispatchRequest, DispatchResult, dispatch
from fleet.errors import UnavailableError
from fleet.models import RunStatus
from tests.faults.conftest import FaultFleet, fault_fleet
from tests.faults.servers import PrivateCluster
from tests.harness import wait_for
from tests.test_dispatch import run_of

pytestmark = [pytest.mark.slow, pytest.mark.faults]
FREEZE_S = 8.0
CALL_BOUND_S = 12.0  # a call may wait out one socket timeout (5 s) and a reconnect, never the whole freeze


def _dispatch_timed(faults: FaultFleet, agent: str) -> tuple[DispatchResult | None, float]:
    started = time.monotonic()
    try:
        result = dispatch(faults.fleet.services, DispatchRequest(agent, uuid.uuid4().hex, actor="test"),
                          faults.fleet.send_execute)
    except UnavailableError:
        result = None
    return result, time.monotonic() - started


def test_a_frozen_redis_blocks_no_call_past_its_timeout_and_starts_nothing(faults: FaultFleet) -> None:
    """Redis is SIGSTOPped with 50 dispatches in flight: each call returns within its timeout (queued, or 75),
    no agent starts while Redis cannot be read, and every accepted run finishes once after it thaws."""
    assert faults.redis_server.proc is not None
    redis_pid = faults.redis_server.proc.pid
    with ThreadPoolExecutor(10) as pool:
        futures = [pool.submit(_dispatch_timed, faults, "quick") for _ in range(50)]
        wait_for(lambda: sum(f.done() for f in futures) >= 5, 60, "the first dispatches to get through")
        os.kill(redis_pid, signal.SIGSTOP)
        frozen_at = time.time()
        try:
            time.sleep(FREEZE_S)  # the fault's length, not a race
        finally:
            os.kill(redis_pid, signal.SIGCONT)
            thawed_at = time.time()
        outcomes = [f.result(timeout=120) for f in futures]
    slowest = max(took for _, took in outcomes)
    assert slowest < CALL_BOUND_S, f"a dispatch blocked {slowest:.1f} s"
    accepted = {r.run_id for r, _ in outcomes if r is not None and r.status == "queued" and r.run_id}
    faults.accepted |= accepted
    assert accepted, "no dispatch got through before the freeze"
    starts = [e.t for e in faults.effects.of("START")]
    # A claim needs Redis (the kill flag, the lease): nothing may start inside the freeze.
    assert not [t for t in starts if frozen_at + 1.0 < t < thawed_at], "an agent started while Redis was frozen"
    faults.reap_until(lambda: all(run_of(faults.fleet, r).status in {"succeeded", "dead", "killed"}
                                  for r in accepted), 120, "every accepted run to finish")
    assert all(run_of(faults.fleet, r).status == RunStatus.SUCCEEDED for r in accepted)
    assert faults.violations() == []


@pytest.mark.parametrize("killed", [False, True], ids=["queued", "queued-and-killed"])
def test_redis_restarted_empty_with_runs_queued(kind: str, tmp_path: Path, pg_cluster: PrivateCluster | None,
                                                killed: bool) -> None:
    """Runs wait in the queue; Redis restarts empty (messages, leases, flags gone). The reaper sends them again
    and each runs once; with the kill on, the database's mirror keeps them from starting at all."""
    with fault_fleet(kind, tmp_path, pg_cluster, start=False) as faults:
        services = faults.fleet.services
        runs = [dispatch(services, DispatchRequest("quick", uuid.uuid4().hex, actor="test"),
                         faults.fleet.send_execute) for _ in range(5)]
        assert {r.status for r in runs} == {"queued"}
        faults.accepted |= {r.run_id for r in runs if r.run_id}
        if killed:
            killswitch.engage(services.engine, services.redis, scope="*", reason="test", actor="test", hard=False,
                              now=services.now())
        faults.redis_server.stop()
        faults.redis_server.start()
        faults.fleet.start_worker()
        # Reaping starts once the worker consumes: with resend_after_s = 3, a cold worker on a loaded machine
        # could otherwise hold the resent message past the second window and see its run buried as lost.
        faults.fleet.wait_consuming(60)
        wanted = {"killed"} if killed else {"succeeded"}
        faults.reap_until(lambda: all(run_of(faults.fleet, r.run_id or "").status in wanted for r in runs), 90,
                          f"every queued run to end {wanted}")
        starts = [e for e in faults.effects.of("START") if e.run in faults.accepted]
        assert len(starts) == (0 if killed else 5)
        assert faults.violations() == []


def test_the_broker_redelivering_a_running_agents_message_starts_nothing(kind: str, tmp_path: Path,
                                                                         pg_cluster: PrivateCluster | None) -> None:
    """An agent runs longer than the broker's visibility timeout: the message comes back while it runs, and the
    fenced claim refuses it (it is not merely unseen)."""
    with fault_fleet(kind, tmp_path, pg_cluster, start=False) as faults:
        faults.fleet.env["FLEET_VISIBILITY_TIMEOUT_S"] = "2"
        faults.fleet.start_worker(concurrency=4)
        faults.fleet.wait_consuming()
        result = dispatch(faults.fleet.services, DispatchRequest("long", uuid.uuid4().hex, actor="test"),
                          faults.fleet.send_execute)
        faults.accepted.add(result.run_id or "")
        # kombu restores unacknowledged messages past the timeout; a second copy is delivered and refused.
        wait_for(lambda: "duplicate" in _worker_logs(faults), 60, "a redelivered execute to be refused")
        run = faults.reap_until(lambda: run_of(faults.fleet, result.run_id or "").status in {"succeeded", "dead"}
                                and run_of(faults.fleet, result.run_id or ""), 90, "the run to finish")
        assert run.status == RunStatus.SUCCEEDED and run.attempt == 1
        assert len(faults.effects.starts(result.run_id or "")) == 1
        assert faults.violations() == []


def _worker_logs(faults: FaultFleet) -> str:
    return "".join(p.read_text(errors="replace") for p in faults.fleet.tmp.glob("worker-*.log"))
