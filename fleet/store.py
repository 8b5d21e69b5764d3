"""Queries over the tables. Every function takes the session as a keyword; none commits on its own."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import String, Table, bindparam, cast, event, func, insert
from sqlalchemy import select as core_select
from sqlmodel import Session, col, select

from fleet import db
from fleet.models import NOT_STARTED, DeadLetter, Run, RunEvent, RunStatus, table_of

_RUNS, _EVENTS = table_of(Run), table_of(RunEvent)
_AT_COMMIT = "fleet.events_at_commit"  # session.info: the events waiting for the commit
# Built once (models.table_of): every run passes through these.
_ADD_EVENT = insert(_EVENTS)
_NOT_STARTED = sorted(NOT_STARTED)
_PENDING_IDS = core_select(_RUNS.c.id).where(
    _RUNS.c.agent == bindparam("agent"), _RUNS.c.work_key == bindparam("work_key"), _RUNS.c.status.in_(_NOT_STARTED))
# One row per agent, its slots joined by the database (string_agg, group_concat): an agent with hundreds of
# runs queued cost hundreds of rows fetched and built into Python objects on every dispatch.
_LIVE_SLOTS = core_select(_RUNS.c.agent, func.aggregate_strings(cast(_RUNS.c.slot, String), ",").label("slots")).where(
    _RUNS.c.agent.in_(bindparam("agents", expanding=True)),
    _RUNS.c.status.in_([RunStatus.QUEUED, RunStatus.RUNNING]), _RUNS.c.slot.is_not(None))


def add_event(*, session: Session, at: datetime, kind: str, run_id: str | None = None,
              agent: str | None = None, actor: str | None = None, **detail: Any) -> None:
    """Append one entry to the audit trail (written in the caller's transaction; see `events_at_commit`)."""
    row = {"at": at, "kind": kind, "run_id": run_id, "agent": agent, "actor": actor, "detail": event_detail(**detail)}
    waiting = session.info.get(_AT_COMMIT)
    if waiting is not None:
        waiting.append(row)
    else:
        db.execute(session, _ADD_EVENT, row)


def events_at_commit(session: Session) -> None:
    """From now on the session's events wait for its commit and go in one INSERT there (a rollback drops
    them). An event's id is taken when it is inserted, and a follower reading the trail by id (`fleet
    events -f`) moves past every id committed before its poll: a transaction that may wait meanwhile (the
    dispatch, on the fleet's spend row) must take its ids at the very end, or one would land behind it."""
    if _AT_COMMIT in session.info:
        return
    session.info[_AT_COMMIT] = []
    event.listen(session, "before_commit", _write_events)
    event.listen(session, "after_rollback", _drop_events)


def _write_events(session: Session) -> None:
    rows = session.info[_AT_COMMIT]
    if rows:
        session.execute(_ADD_EVENT, list(rows))  # in the order they were added: their ids follow it
        rows.clear()


def _drop_events(session: Session) -> None:
    session.info[_AT_COMMIT].clear()


def event_detail(**detail: Any) -> str | None:
    """An event's detail as it is stored: JSON with sorted keys, or nothing."""
    return json.dumps(detail, default=str, sort_keys=True) if detail else None


def engaged_now(session: Session, table: Table, scope: str) -> bool:
    """Whether a kill or pause mirror row (`table`) is engaged as committed now: a fresh statement, so on
    PostgreSQL a later snapshot than the caller's earlier reads."""
    return bool(session.execute(core_select(table.c.engaged).where(table.c.scope == scope)).scalar())


def get_run(*, session: Session, run_id: str) -> Run | None:
    """A run by id."""
    return session.get(Run, run_id)


def get_run_by_key(*, session: Session, idem_key: str) -> Run | None:
    """A run by its idempotency key."""
    return session.exec(select(Run).where(Run.idem_key == idem_key)).first()


def list_runs(*, session: Session, agent: str | None = None, status: str | None = None,
              limit: int = 50) -> list[Run]:
    """The newest runs, optionally of one agent or status."""
    query = select(Run).order_by(col(Run.created_at).desc()).limit(limit)
    if agent:
        query = query.where(Run.agent == agent)
    if status:
        query = query.where(Run.status == status)
    return list(session.exec(query))


def last_run(*, session: Session, agent: str) -> Run | None:
    """An agent's newest run."""
    return session.exec(select(Run).where(Run.agent == agent).order_by(col(Run.created_at).desc()).limit(1)).first()


def pending_runs(*, session: Session, agent: str, work_key: str) -> list[Run]:
    """A unit's runs that have not started (created or queued)."""
    # Nearly always none: a cheap look for their ids first, the rows only when there are some.
    ids = list(db.execute(session, _PENDING_IDS, {"agent": agent, "work_key": work_key}).scalars())
    if not ids:
        return []
    # Still not started when read (another transaction may have moved one on between the two reads).
    return list(session.exec(select(Run).where(col(Run.id).in_(ids), col(Run.status).in_(_NOT_STARTED))))


def live_slots(*, session: Session, agent: str, besides: str | None = None) -> set[int]:
    """The slots the agent's queued and running runs hold by the database (other than run `besides`): after
    a Redis restart their lease keys are gone, but their agents are not, so no new lease may take them."""
    return live_slots_of(session=session, agents=[agent], besides=besides).get(agent, set())


LIVE_SLOTS_CHUNK = 200  # agents per query (SQLite limits the bound values of one statement)


def live_slots_of(*, session: Session, agents: list[str], besides: str | None = None) -> dict[str, set[int]]:
    """`live_slots` of many agents, by agent (an agent without any is left out)."""
    taken: dict[str, set[int]] = {}
    for start in range(0, len(agents), LIVE_SLOTS_CHUNK):
        query = _LIVE_SLOTS if besides is None else _LIVE_SLOTS.where(_RUNS.c.id != besides)
        chunk = {"agents": agents[start:start + LIVE_SLOTS_CHUNK]}
        for row in db.execute(session, query.group_by(_RUNS.c.agent), chunk):
            taken[row.agent] = {int(slot) for slot in str(row.slots).split(",")}
    return taken


def has_event(*, session: Session, run_id: str, kind: str, attempt: int, fence: int) -> bool:
    """Whether the run's trail holds a `kind` event of this attempt under this fence (its detail's)."""
    return bool(attempt_events(session=session, run_id=run_id, kind=kind, attempt=attempt, fence=fence))


def attempt_events(*, session: Session, run_id: str, kind: str, attempt: int, fence: int) -> list[dict[str, Any]]:
    """The details of the run's `kind` events of this attempt under this fence."""
    details = session.exec(select(RunEvent.detail).where(RunEvent.run_id == run_id, RunEvent.kind == kind))
    parsed = (json.loads(detail) for detail in details if detail)
    return [d for d in parsed if (d.get("attempt"), d.get("fence")) == (attempt, fence)]


def run_events(*, session: Session, run_id: str) -> list[RunEvent]:
    """A run's audit trail, oldest first."""
    query = select(RunEvent).where(RunEvent.run_id == run_id).order_by(col(RunEvent.id))
    return list(session.exec(query))


def events_after(*, session: Session, after_id: int = 0, limit: int = 100) -> list[RunEvent]:
    """Events newer than `after_id`, oldest first (for `fleet events -f`)."""
    query = select(RunEvent).where(col(RunEvent.id) > after_id).order_by(col(RunEvent.id)).limit(limit)
    return list(session.exec(query))


def recent_events(*, session: Session, limit: int = 50) -> list[RunEvent]:
    """The newest `limit` events, oldest first."""
    query = select(RunEvent).order_by(col(RunEvent.id).desc()).limit(limit)
    return list(reversed(list(session.exec(query))))


def count_by_status(*, session: Session, since: datetime) -> dict[str, int]:
    """How many runs of each status were created since `since`."""
    query = select(Run.status, func.count()).where(col(Run.created_at) >= since).group_by(Run.status)
    return {str(status): int(n) for status, n in session.exec(query)}


def count_running(*, session: Session, agent: str | None = None) -> int:
    """How many runs are running now (of one agent, or of all)."""
    query = select(func.count()).select_from(Run).where(Run.status == RunStatus.RUNNING)
    return int(session.exec(query if agent is None else query.where(Run.agent == agent)).one())


def get_dead_letter(*, session: Session, dead_id: int) -> DeadLetter | None:
    """A dead letter by id."""
    return session.get(DeadLetter, dead_id)


def list_dead_letters(*, session: Session, limit: int = 100) -> list[DeadLetter]:
    """The newest dead letters."""
    return list(session.exec(select(DeadLetter).order_by(col(DeadLetter.id).desc()).limit(limit)))
