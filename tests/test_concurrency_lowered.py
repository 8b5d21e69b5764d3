"""An agent's concurrency lowered in fleet.toml while its runs are live, in-process on both databases and a real
Redis: the runs already holding slots above the new concurrency count against it, so no dispatch (single or a
beat's batch) starts a run beyond it until enough of them end."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from sqlmodel import col, update

from fleet import bulk, db
from fleet.config import load_fleet_config
from fleet.dispatch import DispatchRequest, DispatchResult, dispatch
from fleet.locks import Lease
from fleet.models import Run, RunStatus
from fleet.services import Services
from tests.harness import AGENTS

WIDE = '\n[agents.wide]\ncommand = ["true"]\nest_cost_usd = 0.01\ntimeout_s = 30\nconcurrency = {n}\n'


@pytest.fixture
def services_agents() -> str:
    return AGENTS + WIDE.format(n=4)


def _dispatch(services: Services) -> DispatchResult:
    return dispatch(services, DispatchRequest("wide", f"wide-{uuid.uuid4().hex}", actor="test"),
                    lambda _run_id, _fence: None)


def _lower_to(services: Services, concurrency: int) -> None:
    path = Path(services.settings.config)
    path.write_text(path.read_text().replace("concurrency = 4", f"concurrency = {concurrency}"))
    services.config = load_fleet_config(path)
    assert services.config.agents["wide"].concurrency == concurrency


def _end(services: Services, result: DispatchResult, slot: int) -> None:
    """The run ends as the executor's finish leaves it: its row succeeded, its lease released."""
    assert result.fence is not None
    with db.session(services.engine) as session:
        session.execute(update(Run).where(col(Run.id) == result.run_id).values(status=RunStatus.SUCCEEDED))
        session.commit()
    assert services.leases.release(Lease("wide", slot, result.run_id, result.fence))


def test_a_dispatch_under_a_lowered_concurrency_counts_the_runs_above_it(services: Services) -> None:
    """Four runs took slots 0-3, the two in slots 0 and 1 ended, then fleet.toml lowered the concurrency to 2:
    the runs in slots 2 and 3 are the agent's two, and slots 0 and 1, free, must not start a third."""
    queued = [_dispatch(services) for _ in range(4)]
    assert [r.status for r in queued] == ["queued"] * 4
    for slot in (0, 1):
        _end(services, queued[slot], slot)
    _lower_to(services, 2)
    for _ in range(2):
        result = _dispatch(services)
        assert (result.status, result.reason) == ("refused", "busy"), result
    (batch,) = bulk.dispatch_many(services, [(services.config.agents["wide"], f"wide-{uuid.uuid4().hex}")],
                                  lambda _run_id, _fence: None, "test")
    assert (batch.status, batch.reason) == ("refused", "busy"), batch
