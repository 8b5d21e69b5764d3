"""The kill switch: global ('*') and per agent, in Redis for speed and mirrored in the database.

Whichever says "killed" wins. Redis unreachable reads as killed (fail closed). A Redis that lost its
data (restart without persistence) is noticed by its missing epoch marker and refilled from the mirror.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

import redis
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from fleet import alerts, db, keys, logs, store
from fleet.errors import UnavailableError
from fleet.keys import GLOBAL
from fleet.models import KillSwitch


@dataclass(frozen=True)
class KillState:
    """Whether work must stop, and why (the scope that is engaged, or the failure that forces it)."""

    killed: bool
    scope: str | None = None
    reason: str | None = None
    actor: str | None = None

    def describe(self) -> str:
        """One line for a refusal or a gate verdict."""
        if not self.killed:
            return "not killed"
        where = "fleet" if self.scope == GLOBAL else f"agent {self.scope}"
        return f"killed ({where}): {self.reason or 'no reason given'}"


ALIVE = KillState(killed=False)


def engage(engine: Engine, client: redis.Redis, *, scope: str, reason: str | None, actor: str,
           hard: bool, now: datetime) -> None:
    """Throw the switch: the database first (durable), then Redis (fast)."""
    with db.session(engine) as session:
        _upsert(session, scope=scope, engaged=True, reason=reason, actor=actor, hard=hard, now=now)
        store.add_event(session=session, at=now, kind="kill.engaged", agent=None if scope == GLOBAL else scope,
                        actor=actor, scope=scope, reason=reason, hard=hard)
        session.commit()
    record = json.dumps({"reason": reason, "actor": actor, "at": now.isoformat(), "hard": hard})
    try:
        client.set(keys.kill(scope), record)
    except redis.RedisError:
        # The mirror already holds it: dispatches refuse, executors read the mirror while Redis is
        # away, and the next check copies it back into Redis. The kill is in force.
        logs.get(__name__).warning("kill.redis_unreachable", scope=scope)
    where = "the fleet" if scope == GLOBAL else f"agent {scope}"
    alerts.alert("kill_engaged", f"kill switch engaged for {where} by {actor}: {reason or 'no reason given'}",
                 agent=None if scope == GLOBAL else scope, level="warning", scope=scope, actor=actor, hard=hard)


def release(engine: Engine, client: redis.Redis, *, scope: str, actor: str, now: datetime) -> None:
    """Lift the switch in both places."""
    with db.session(engine) as session:
        _upsert(session, scope=scope, engaged=False, reason=None, actor=actor, hard=False, now=now)
        store.add_event(session=session, at=now, kind="kill.released", agent=None if scope == GLOBAL else scope,
                        actor=actor, scope=scope)
        session.commit()
    try:
        client.delete(keys.kill(scope))
    except redis.RedisError as exc:
        # Still killed in Redis: the fleet stays stopped (safe), and the operator must say it again.
        raise UnavailableError(f"released in the database, but Redis is unreachable ({exc.__class__.__name__}) "
                               "and still holds the flag: run `fleet resume` again once Redis is back") from None


def _upsert(session: Session, *, scope: str, engaged: bool, reason: str | None, actor: str, hard: bool,
            now: datetime) -> None:
    row = session.get(KillSwitch, scope) or KillSwitch(scope=scope, changed_at=now)
    row.engaged, row.reason, row.actor, row.hard, row.changed_at = engaged, reason, actor, hard, now
    session.add(row)


def check_redis(client: redis.Redis, agent: str | None) -> KillState:
    """The fast check: Redis only. Raises redis.RedisError when Redis cannot be reached."""
    scopes = [GLOBAL] if agent is None else [GLOBAL, agent]
    values = client.mget([keys.kill(s) for s in scopes])
    for scope, value in zip(scopes, values, strict=True):
        if value:
            record = json.loads(value)
            return KillState(True, scope, record.get("reason"), record.get("actor"))
    return ALIVE


def check_mirror(session: Session, agent: str | None) -> KillState:
    """The durable check: the database mirror only."""
    scopes = [GLOBAL] if agent is None else [GLOBAL, agent]
    rows = session.exec(select(KillSwitch).where(col(KillSwitch.scope).in_(scopes), col(KillSwitch.engaged)))
    for row in sorted(rows, key=lambda r: r.scope != GLOBAL):
        return KillState(True, row.scope, row.reason, row.actor)
    return ALIVE


def check(session: Session, client: redis.Redis, agent: str | None) -> KillState:
    """Both checks, either one killing wins; a flag Redis lost is put back from the mirror.

    Redis unreachable raises UnavailableError unless the mirror already says killed: nothing
    is let through on a guess (fail closed).
    """
    mirror = check_mirror(session, agent)
    try:
        fast = check_redis(client, agent)
        if mirror.killed and not fast.killed:
            restore(session, client)  # Redis lost the flag (a restart without persistence)
    except redis.RedisError as exc:
        if mirror.killed:
            return mirror
        if isinstance(exc, redis.AuthenticationError):
            raise
        raise UnavailableError(f"Redis unreachable ({exc.__class__.__name__}): refusing to start work") from None
    return mirror if mirror.killed else fast


def restore(session: Session, client: redis.Redis) -> int:
    """Copy every engaged flag from the mirror into Redis; returns how many were missing there."""
    restored = 0
    for row in session.exec(select(KillSwitch).where(col(KillSwitch.engaged))):
        record = json.dumps({"reason": row.reason, "actor": row.actor, "at": row.changed_at.isoformat(),
                             "hard": row.hard})
        if client.set(keys.kill(row.scope), record, nx=True):
            restored += 1
    return restored


def engaged(session: Session) -> list[KillSwitch]:
    """Every engaged switch, from the mirror (for status pages)."""
    return list(session.exec(select(KillSwitch).where(col(KillSwitch.engaged)).order_by(col(KillSwitch.scope))))
