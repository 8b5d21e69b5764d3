"""The database misbehaving: an outcome write that fails, a restart under racing admissions, an ambiguous
commit, a database that stops answering."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.models import RunStatus
from tests.faults.conftest import FaultFleet, fault_fleet
from tests.faults.proxy import PASS, RESET
from tests.faults.servers import PrivateCluster
from tests.harness import wait_for
from tests.test_dispatch import run_of, send

pytestmark = [pytest.mark.slow, pytest.mark.faults]


@pytest.fixture
def pg_faults(tmp_path: Path, pg_cluster: PrivateCluster | None) -> Iterator[FaultFleet]:
    """A fault fleet on a private PostgreSQL behind the proxy."""
    with fault_fleet("postgresql", tmp_path, pg_cluster) as faults:
        yield faults


def test_a_failed_outcome_write_does_not_run_a_finished_agent_again(pg_faults: FaultFleet) -> None:
    """The database goes away as the agent finishes: the outcome is written once it is back, the reaper
    keeps its hands off meanwhile (the lease is still renewed), and the agent never runs a second time."""
    faults = pg_faults
    result = send(faults.fleet, "work", f"outcome-{uuid.uuid4().hex}")
    faults.accepted.add(result.run_id)
    wait_for(lambda: len([e for e in faults.effects.of("SPEND") if e.run == result.run_id]) >= 3, 60,
             "the agent's third step")
    assert faults.db_proxy is not None
    faults.db_proxy.set(RESET)
    try:
        wait_for(lambda: [e for e in faults.effects.of("END") if e.run == result.run_id], 30, "the agent to end")
        # Longer than the lease: a reaper that took this for a dead worker would start the agent again.
        faults.reap_for(8, until=lambda: len(faults.effects.starts(result.run_id)) > 1)
    finally:
        faults.db_proxy.set(PASS)
    run = faults.reap_until(lambda: run_of(faults.fleet, result.run_id).status in {"succeeded", "dead"}
                            and run_of(faults.fleet, result.run_id), 60, "the outcome to be written")
    assert len(faults.effects.starts(result.run_id)) == 1, "the finished agent was run again"
    assert run.status == RunStatus.SUCCEEDED and run.attempt == 1
    assert faults.violations() == []
