"""An agent's concurrency lowered in fleet.toml while its runs are live, in-process on both databases and a real
Redis: the runs already holding slots above the new concurrency count against it, so no dispatch (single or a
beat's batch) starts a run beyond it until enough of them end."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from sqlmodel import col, update

from fleet import bulk, db, refusals
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


def test_a_busy_refusal_under_a_lowered_concurrency_names_the_runs_that_hold_it(services: Services) -> None:
    """The refusal's words come from who holds the agent's slots: the runs above the lowered concurrency hold it,
    and "free now; try again" would send the operator into a loop of refusals."""
    queued = [_dispatch(services) for _ in range(4)]
    for slot in (0, 1):
        _end(services, queued[slot], slot)
    _lower_to(services, 2)
    said = refusals.explain(services, "wide", _dispatch(services))
    assert "free now" not in said, said
    assert queued[2].run_id in said and queued[3].run_id in said, said


def test_a_busy_refusal_after_redis_lost_the_leases_names_the_runs_the_database_shows(services: Services) -> None:
    """Redis restarted without its data: the live runs' slots are still theirs by the database, and the refusal
    says so instead of "free now; try again"."""
    queued = [_dispatch(services) for _ in range(4)]
    services.redis.flushdb()
    refused = _dispatch(services)
    assert (refused.status, refused.reason) == ("refused", "busy"), refused
    said = refusals.explain(services, "wide", refused)
    assert "free now" not in said and "4 of 4 slots" in said, said
    assert queued[0].run_id in said, said


def test_a_busy_refusal_with_more_runs_live_than_the_lowered_concurrency_says_how_many_must_end(
        services: Services) -> None:
    queued = [_dispatch(services) for _ in range(4)]
    _lower_to(services, 2)
    said = refusals.explain(services, "wide", _dispatch(services))
    assert "4 runs live, more than its concurrency of 2" in said and "when 3 of them have ended" in said, said
    assert queued[0].run_id in said, said


def _plan(services: Services) -> DispatchResult:
    return dispatch(services, DispatchRequest("wide", f"wide-{uuid.uuid4().hex}", actor="test", dry_run=True),
                    lambda _run_id, _fence: None)


def test_a_dry_run_counts_the_slots_the_database_shows_held_as_the_dispatch_does(services: Services) -> None:
    """`fleet dispatch --dry-run` after Redis lost the leases, and under a lowered concurrency: the plan says busy,
    as the dispatch it previews is refused, never "would fire" with every slot "free"."""
    queued = [_dispatch(services) for _ in range(4)]
    services.redis.flushdb()
    planned = _plan(services)
    assert (planned.reason, planned.gates["lock"].ok) == ("busy", False), planned
    assert planned.gates["lock"].detail == "0 of 4 slot(s) free", planned
    with db.session(services.engine) as session:  # the runs in slots 0 and 1 end (their leases went with Redis)
        session.execute(update(Run).where(col(Run.id).in_([queued[0].run_id, queued[1].run_id]))
                        .values(status=RunStatus.SUCCEEDED))
        session.commit()
    _lower_to(services, 2)  # runs in slots 2 and 3 live, slots 0 and 1 free in both stores
    planned = _plan(services)
    assert (planned.reason, planned.gates["lock"].ok) == ("busy", False), planned
