"""The dead-letter queue: inspect, replay (once per dead letter), purge."""

from __future__ import annotations

from sqlalchemy import delete, update
from sqlmodel import col, select

from fleet import db, store
from fleet.dispatch import DispatchRequest, DispatchResult, Sender, dispatch, duplicate_of
from fleet.errors import NotFoundError
from fleet.models import DeadLetter, Run
from fleet.services import Services


def get(services: Services, dead_id: int) -> DeadLetter:
    """One dead letter (69 when there is none)."""
    with db.session(services.engine) as session:
        dead = store.get_dead_letter(session=session, dead_id=dead_id)
    if dead is None:
        raise NotFoundError(f"no dead letter {dead_id}")
    return dead


def replay(services: Services, dead_id: int, send: Sender, actor: str) -> DispatchResult:
    """Run a dead letter's work again as a new run linked to it.

    The work key is `replay:<the dead run's id>`, so replaying the same dead letter twice returns the
    first replay (`duplicate`) instead of running it twice. Not the dead letter's id: SQLite hands a
    purged one's id out again, and a new dead letter would have been answered with an old one's replay.
    A dead letter marked replayed is answered with its replay before any dispatch: the key alone does not
    last (the idempotency sweep frees a finished run's key, retention deletes its row).
    """
    dead = get(services, dead_id)
    with db.session(services.engine) as session:
        if dead.replayed_run_id is not None:
            replayed = session.get(Run, dead.replayed_run_id)
            if replayed is not None:
                return duplicate_of(replayed)
            return DispatchResult(dead.replayed_run_id, "duplicate", reason="already replayed")
        original = session.get(Run, dead.run_id)
    payload = None
    if original is not None and original.payload:
        import json

        payload = json.loads(original.payload)
    request = DispatchRequest(agent=dead.agent, work_key=f"replay:{dead.run_id}", payload=payload, actor=actor,
                              prev_run_id=dead.run_id, replay_of=dead.id)
    result = dispatch(services, request, send)
    if result.run_id and result.status in ("queued", "duplicate"):
        now = services.now()
        with db.session(services.engine) as session:
            session.execute(update(DeadLetter).where(col(DeadLetter.id) == dead.id,
                                                     col(DeadLetter.replayed_run_id).is_(None))
                            .values(replayed_run_id=result.run_id, replayed_at=now))
            store.add_event(session=session, at=now, kind="dlq.replayed", run_id=result.run_id, agent=dead.agent,
                            actor=actor, dead_letter=dead.id, status=result.status)
            session.commit()
    return result


def purge(services: Services, dead_ids: list[int] | None, actor: str) -> int:
    """Delete the given dead letters (all of them when None); returns how many went."""
    now = services.now()
    with db.session(services.engine) as session:
        query = delete(DeadLetter)
        if dead_ids is not None:
            known = set(session.exec(select(DeadLetter.id).where(col(DeadLetter.id).in_(dead_ids))))
            missing = sorted(set(dead_ids) - known)
            if missing:  # nothing is purged when any id is wrong: a typo must not half-run
                raise NotFoundError(f"no dead letter {', '.join(map(str, missing))}; nothing purged")
            query = query.where(col(DeadLetter.id).in_(dead_ids))
        removed = db.rowcount(session.execute(query))
        store.add_event(session=session, at=now, kind="dlq.purged", actor=actor, count=removed,
                        ids=dead_ids if dead_ids is not None else "all")
        session.commit()
    return int(removed)
