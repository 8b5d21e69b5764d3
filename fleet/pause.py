"""The pause: intake stops (ticks and dispatches are refused `paused`) while running runs finish.

`fleet kill` is "stop now"; a pause is for maintenance: nothing new starts, and what runs is left
to end on its own (its retry included: a retry is the same run). Global ('*') or per agent, stored
as the kill switch is: a Redis flag (`fleet:paused:SCOPE`, a JSON record of who and why) read on
every tick, mirrored in the `pauses` table so that a Redis restart cannot lift it (a flag Redis lost
is put back from the mirror by the next check).

One mechanism for every pause: an agent that said it is done for good (`fleet_done`), exited 78 or
reported usage Fleet cannot price is paused here too (actor `agent:RUN_ID`), so `fleet resume AGENT`
lifts either kind and `fleet status` shows both the same way. Any value under a pause key pauses:
a bare reason string (as workers before this module wrote) or a flag set by hand.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

import redis
from sqlalchemy import Engine, bindparam
from sqlalchemy import select as core_select
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select

from fleet import db, keys, store
from fleet.errors import UnavailableError
from fleet.keys import GLOBAL
from fleet.killflag import check_reason, put_back
from fleet.models import Pause, table_of


@dataclass(frozen=True)
class PauseState:
    """Whether intake is paused for an agent, and by which scope, whom and why."""

    paused: bool
    scope: str | None = None
    reason: str | None = None
    actor: str | None = None
    at: datetime | None = None

    def describe(self) -> str:
        """One line for a refusal or a gate verdict."""
        if not self.paused:
            return "not paused"
        where = "fleet" if self.scope == GLOBAL else f"agent {self.scope}"
        return f"paused ({where}): {self.reason or 'no reason given'}"


RUNNING = PauseState(paused=False)


def engage(engine: Engine, client: redis.Redis, *, scope: str, reason: str | None, actor: str,
           now: datetime) -> None:
    """Pause intake for `scope`: Redis first (ticks read it at once), then the database mirror.

    Raises BadInputError before anything is set for a reason the mirror cannot keep, and
    UnavailableError when the pause is not durable: neither place written (nothing is paused), or
    Redis only (paused until Redis restarts: say it again).
    """
    check_reason(reason)
    redis_problem = None
    try:
        raise_flag(client, scope=scope, reason=reason, actor=actor, now=now)
    except redis.RedisError as exc:
        redis_problem = f"Redis unreachable ({exc.__class__.__name__})"
    try:
        with db.session(engine) as session:
            mirror(session, scope=scope, reason=reason, actor=actor, now=now)
            session.commit()
    except SQLAlchemyError as exc:
        if redis_problem:
            raise UnavailableError(f"NOT paused: {redis_problem} and the database is unreachable "
                                   f"({exc.__class__.__name__})") from None
        raise UnavailableError(f"paused in Redis (in force), but the database mirror could not be written "
                               f"({exc.__class__.__name__}): a Redis restart would lift it; run it again") from None


def raise_flag(client: redis.Redis, *, scope: str, reason: str | None, actor: str, now: datetime) -> None:
    """The pause's Redis flag alone (ticks read it at once); raises redis.RedisError."""
    client.set(keys.paused(scope), _flag(reason, actor, now))


def raise_mirrored_flag(engine: Engine, client: redis.Redis, *, scope: str, reason: str | None, actor: str,
                        now: datetime) -> None:
    """The Redis flag of a pause whose mirror was committed already (an agent's own, with its outcome), taken
    back if the mirror is released by the time it is set: a `fleet resume` that came in between (it found no
    flag to delete) is never undone. Raises redis.RedisError or SQLAlchemyError."""
    def engaged() -> bool:
        with db.session(engine) as session:
            return store.engaged_now(session, _TABLE, scope)

    put_back(client, keys.paused(scope), _flag(reason, actor, now), engaged, only_if_missing=False)


def _flag(reason: str | None, actor: str | None, now: datetime) -> str:
    return json.dumps({"reason": reason, "actor": actor, "at": now.isoformat()})


def mirror(session: Session, *, scope: str, reason: str | None, actor: str, now: datetime) -> None:
    """The pause's durable half and its event, in the caller's transaction: an agent's own pause is written
    with the outcome that asks for it, so one cannot be kept without the other."""
    _upsert(session, scope=scope, engaged=True, reason=reason, actor=actor, now=now)
    store.add_event(session=session, at=now, kind="pause.engaged", agent=None if scope == GLOBAL else scope,
                    actor=actor, scope=scope, reason=reason)


def release(engine: Engine, client: redis.Redis, *, scope: str, actor: str, now: datetime) -> bool:
    """Lift the pause of `scope`, the mirror first (so a failed Redis delete leaves it paused, never
    half-lifted); whether it was paused at all. `pause.released` only for a mirror row that was engaged, read
    (locked, on PostgreSQL) in the transaction that releases it, so two resumes racing record one release."""
    with db.session(engine) as session:
        row = session.get(Pause, scope, with_for_update=True)
        was = row is not None and row.engaged
        if was:
            _upsert(session, scope=scope, engaged=False, reason=None, actor=actor, now=now)
            store.add_event(session=session, at=now, kind="pause.released", agent=None if scope == GLOBAL else scope,
                            actor=actor, scope=scope)
            session.commit()
    try:
        return bool(client.delete(keys.paused(scope))) or was
    except redis.RedisError as exc:
        raise UnavailableError(f"the pause is released in the database, but Redis is unreachable "
                               f"({exc.__class__.__name__}) and still holds the flag: run `fleet resume` again "
                               "once Redis is back") from None


def _upsert(session: Session, *, scope: str, engaged: bool, reason: str | None, actor: str, now: datetime) -> None:
    row = db.locked_row(session, Pause, scope, engaged=False, changed_at=db.NEVER)  # two first pauses take turns
    row.engaged, row.reason, row.actor, row.changed_at = engaged, reason, actor[:255], now
    session.add(row)


def parse_flag(scope: str, value: Any) -> PauseState:
    """The pause a flag's value stands for: Fleet's JSON record, or any other text as its reason."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        return PauseState(True, scope, text)
    reason, actor = record.get("reason"), record.get("actor")
    return PauseState(True, scope, None if reason is None else str(reason), None if actor is None else str(actor),
                      _when(record.get("at")))


def _when(stamp: Any) -> datetime | None:
    try:
        at = datetime.fromisoformat(stamp) if isinstance(stamp, str) else None
    except ValueError:
        return None
    return at if at is not None and at.tzinfo is not None else None


def check(session: Session, client: redis.Redis, agent: str | None) -> PauseState:
    """Whether intake is paused for `agent` (the fleet's pause counts for every agent): the mirror and
    Redis, either one pausing wins; a flag Redis lost is put back from the mirror. Redis unreachable
    raises UnavailableError unless the mirror already says paused."""
    scopes = [GLOBAL] if agent is None else [GLOBAL, agent]
    mirrored = {row.scope: row for row in session.exec(
        select(Pause).where(col(Pause.scope).in_(scopes), col(Pause.engaged)))}
    try:
        values = client.mget([keys.paused(s) for s in scopes])
        for scope, row in mirrored.items():
            if values[scopes.index(scope)] is None:  # Redis restarted and lost it
                put_back(client, keys.paused(scope), _flag(row.reason, row.actor, row.changed_at),
                         partial(store.engaged_now, session, _TABLE, scope))
    except redis.RedisError as exc:
        if mirrored:
            return _from_row(mirrored.get(GLOBAL) or next(iter(mirrored.values())))
        raise UnavailableError(f"Redis unreachable ({exc.__class__.__name__}): refusing to start work") from None
    for scope in scopes:  # the fleet's pause first: it is the wider one
        if scope in mirrored:
            return _from_row(mirrored[scope])
        value = values[scopes.index(scope)]
        if value is not None:
            return parse_flag(scope, value)
    return RUNNING


_TABLE = table_of(Pause)
# Built once (bound value: "scopes"): every dispatch asks, in its gate read (dispatch._MIRRORS_AND_CLOCK).
ENGAGED = core_select(_TABLE.c.scope).where(
    _TABLE.c.scope.in_(bindparam("scopes", expanding=True)), _TABLE.c.engaged).limit(1)


def _from_row(row: Pause) -> PauseState:
    return PauseState(True, row.scope, row.reason, row.actor, row.changed_at)


def paused(session: Session, client: redis.Redis | None, scopes: list[str]) -> list[PauseState]:
    """Every pause in force among `scopes` (the mirror's, then flags only Redis holds), for status pages.
    With `client` None (Redis down) the mirror alone."""
    found = {row.scope: _from_row(row) for row in session.exec(
        select(Pause).where(col(Pause.engaged)).order_by(col(Pause.scope)))}
    if client is not None and scopes:
        values = client.mget([keys.paused(s) for s in scopes])
        for scope, value in zip(scopes, values, strict=True):
            if value is not None and scope not in found:
                found[scope] = parse_flag(scope, value)
    return sorted(found.values(), key=lambda p: (p.scope != GLOBAL, p.scope or ""))
