"""The kill switch: global ('*') and per agent, in Redis for speed and mirrored in the database.

Whichever says "killed" wins. Redis unreachable reads as killed (fail closed). A Redis that lost its
data (restart without persistence) is noticed by its missing epoch marker and refilled from the mirror.

Engaging writes Redis first, so the kill is in force at once whatever the database is doing; the
mirror follows, retried within a short bound, and a mirror that still could not be written is written
by the watchdog (`repair_mirror`). Releasing goes the other way, the mirror first: a Redis delete that
fails leaves the fleet stopped, never half-released. Any value under a kill key counts as a kill, even
one Fleet did not write.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

import redis
from sqlalchemy import Engine, and_, bindparam, or_
from sqlalchemy import select as core_select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlmodel import Session, col, select

from fleet import alerts, db, keys, logs, store
from fleet.errors import KillNotMirroredError, UnavailableError, first_line
from fleet.keys import GLOBAL
from fleet.killflag import MAX_REASON, put_back, raise_flag, record
from fleet.models import KillSwitch, RunEvent, table_of

MIRROR_DEADLINE_S = 3.0  # how long `engage` keeps trying the mirror once the kill is in force in Redis
_FOREIGN_SHOWN = 80  # characters of a flag Fleet did not write, quoted in its reason
_SAME_ID_KILLS = 50  # the latest kills of one task id that `carried_out` compares a delivery with


@dataclass(frozen=True)
class KillState:
    """Whether work must stop, and why (the scope that is engaged, or the failure that forces it)."""

    killed: bool
    scope: str | None = None
    reason: str | None = None
    actor: str | None = None
    at: datetime | None = None  # when it was engaged, as its record says (None: unknown)
    hard: bool = False
    delivery_tag: str | None = None  # the broker message that engaged it, as its flag says (a fleet.kill's)

    def describe(self) -> str:
        """One line for a refusal or a gate verdict."""
        if not self.killed:
            return "not killed"
        where = "fleet" if self.scope == GLOBAL else f"agent {self.scope}"
        return f"killed ({where}): {self.reason or 'no reason given'}"


ALIVE = KillState(killed=False)


@dataclass(frozen=True)
class Engagement:
    """Where a kill landed: Redis (in force at once), the mirror (survives a Redis restart), or both."""

    scope: str
    in_redis: bool
    mirrored: bool
    problem: str | None = None  # why one of the two could not be written

    def describe(self) -> str:
        """One line for the operator: where the kill landed."""
        where = "the whole fleet" if self.scope == GLOBAL else f"agent {self.scope}"
        if self.in_redis and self.mirrored:
            return f"kill switch engaged for {where}"
        if self.mirrored:
            return (f"kill switch engaged for {where}, in the database only ({self.problem}; dispatches refuse, "
                    "running agents stop at their next mirror check)")
        return f"kill switch engaged for {where}, in Redis only (the database mirror could not be written)"

    def confirm(self) -> None:
        """Raise KillNotMirroredError (exit 75) when the kill is in force in Redis but not yet mirrored."""
        if not self.mirrored:
            raise KillNotMirroredError(
                f"the kill IS in force (Redis has it), but its database mirror could not be written ({self.problem})"
                ": the watchdog writes it on its next pass, or run `fleet kill` again; until then a Redis restart "
                "would lift this kill")


def engage(engine: Engine, client: redis.Redis, *, scope: str, reason: str | None, actor: str,
           hard: bool, now: datetime, mirror_deadline_s: float = MIRROR_DEADLINE_S,
           delivery_tag: str | None = None) -> Engagement:
    """Throw the switch: Redis first (in force at once), then the database mirror (durable).

    Raises BadInputError before anything is set, and UnavailableError when neither place could be
    written. A kill that reached only one of them is in force and is returned as such.
    `delivery_tag`: the broker message that asked for it (kombu's tag, one per send), kept in its event for
    `carried_out`.
    """
    redis_problem = None
    try:
        # Refuses a bad reason (BadInputError) before it sets anything, in Redis or the mirror.
        raise_flag(client, scope=scope, reason=reason, actor=actor, at=now, hard=hard, delivery_tag=delivery_tag)
    except redis.RedisError as exc:
        # The mirror alone still holds it: dispatches refuse, executors read the mirror while Redis is
        # away, and the next check copies it back into Redis.
        redis_problem = f"Redis unreachable: {first_line(exc)}"
        logs.get(__name__).warning("kill.redis_unreachable", scope=scope)
    mirror_problem = _write_mirror(engine, scope=scope, reason=reason, actor=actor, hard=hard, now=now,
                                   deadline_s=mirror_deadline_s, delivery_tag=delivery_tag)
    if redis_problem and mirror_problem:
        raise UnavailableError(f"the kill switch was NOT engaged: {redis_problem}; "
                               f"database: {mirror_problem}") from None
    outcome = Engagement(scope, in_redis=redis_problem is None, mirrored=mirror_problem is None,
                         problem=redis_problem or mirror_problem)
    if mirror_problem:
        logs.get(__name__).error("kill.mirror_unwritten", scope=scope, error=mirror_problem)
    where = "the fleet" if scope == GLOBAL else f"agent {scope}"
    alerts.alert("kill_engaged", f"kill switch engaged for {where} by {actor}: {reason or 'no reason given'}",
                 agent=None if scope == GLOBAL else scope, level="warning", scope=scope, actor=actor, hard=hard,
                 mirrored=outcome.mirrored, in_redis=outcome.in_redis)
    return outcome


def _write_mirror(engine: Engine, *, scope: str, reason: str | None, actor: str, hard: bool, now: datetime,
                  deadline_s: float, delivery_tag: str | None = None) -> str | None:
    """Write the engaged row and its event, retried until `deadline_s`; None once written, else why not."""
    give_up = time.monotonic() + deadline_s
    pause = 0.05
    message = {} if delivery_tag is None else {"delivery_tag": delivery_tag}
    while True:
        try:
            with db.bounded_session(engine, max(0.05, give_up - time.monotonic())) as session:
                _upsert(session, scope=scope, engaged=True, reason=reason, actor=actor, hard=hard, now=now)
                store.add_event(session=session, at=now, kind="kill.engaged",
                                agent=None if scope == GLOBAL else scope, actor=actor, scope=scope, reason=reason,
                                hard=hard, **message)
                session.commit()
            return None
        except (SQLAlchemyError, OSError) as exc:  # OSError: an SQLite folder that cannot be made
            problem = first_line(exc)
        if time.monotonic() + pause >= give_up:
            return problem
        time.sleep(pause)
        pause = min(2 * pause, 1.0)


def release(engine: Engine, client: redis.Redis, *, scope: str, actor: str, now: datetime) -> bool:
    """Lift the switch in both places, the mirror first; whether a kill was in force in either.

    `kill.released` is written only when the mirror row was engaged, read (locked, on PostgreSQL) in the
    transaction that releases it, or when Redis held a flag the mirror lacked (a kill whose mirror write
    failed): a resume of an agent only paused, or of one never killed, lifted no kill, and the audit trail
    must not say it did (nor twice, for two resumes racing on a mirrored kill).
    """
    only_redis = _flag_of(client, scope)  # read before the mirror is released, as the delete below comes after
    with db.session(engine) as session:
        was = _locked(session, scope).engaged
        # The row is written released even when it was not engaged: its changed_at tells repair_mirror
        # that a flag only Redis holds, set before now, was resumed and must not be mirrored back.
        _upsert(session, scope=scope, engaged=False, reason=None, actor=actor, hard=False, now=now)
        if was or only_redis is not None:
            # A kill only Redis held (its mirror unwritten) is lifted too, and named: `carried_out` must know
            # the fleet.kill it came from, should kombu deliver that again.
            store.add_event(session=session, at=now, kind="kill.released", agent=None if scope == GLOBAL else scope,
                            actor=actor, scope=scope, **({} if was or only_redis is None else _engaged_by(only_redis)))
        session.commit()
    try:
        return bool(client.delete(keys.kill(scope))) or was
    except redis.RedisError as exc:
        # Still killed in Redis: the fleet stays stopped (safe), and the operator must say it again.
        raise UnavailableError(f"released in the database, but Redis is unreachable ({exc.__class__.__name__}) "
                               "and still holds the flag: run `fleet resume` again once Redis is back") from None


def _flag_of(client: redis.Redis, scope: str) -> KillState | None:
    """The kill flag Redis holds for `scope`, if one can be read (None: none, or unreadable, which names no
    message: a release's delete then says what is wrong, or lifts a flag no fleet.kill wrote)."""
    try:
        value = client.get(keys.kill(scope))
    except (redis.RedisError, UnicodeDecodeError):
        return None
    return None if value is None else parse_flag(scope, value)


def _engaged_by(flag: KillState) -> dict[str, str]:
    """What a `kill.mirrored` or `kill.released` event says of the kill a flag only Redis held came from."""
    return ({} if flag.actor is None else {"flag_actor": flag.actor}) | \
        ({} if flag.delivery_tag is None else {"delivery_tag": flag.delivery_tag})


def carried_out(engine: Engine, *, message_id: str, delivery_tag: str | None = None) -> str | None:
    """Why a kill delivered again by the broker engages nothing, or None when its first delivery never engaged.

    kombu restores a message whose acknowledgement was lost, hours later (the visibility timeout): a kill
    carried out then, and resumed since by the operator, must not stop the fleet again. Its first delivery
    left a `kill.engaged` event whose actor ends with the message's id (workers/tasks.py names it so) and
    that names its delivery tag: a task id can be given by the sender (`celery call --task-id`) and used
    again by a later kill, but kombu's tag is drawn anew for every send and kept when it restores one, so
    a new kill restored before it ever ran (a warm shutdown gives back what it prefetched) still engages.
    An event that names no tag (written before tags were kept) matches by the id alone. A kill whose first
    delivery reached only Redis wrote no `kill.engaged`: the watchdog's `kill.mirrored`, or the resume's
    `kill.released`, names its flag's actor and tag instead."""
    suffix = f":{message_id}"
    in_detail = json.dumps(suffix)[1:-1]  # as the id is written inside an event's JSON detail
    with db.session(engine) as session:
        rows = session.exec(select(RunEvent.at, RunEvent.kind, RunEvent.detail)
                            .where(or_(and_(col(RunEvent.kind) == "kill.engaged",
                                            col(RunEvent.actor).endswith(suffix, autoescape=True)),
                                       and_(col(RunEvent.kind).in_(["kill.mirrored", "kill.released"]),
                                            col(RunEvent.detail).contains(in_detail, autoescape=True))))
                            .order_by(col(RunEvent.id).desc()).limit(_SAME_ID_KILLS)).all()
    found = next((at for at, kind, detail in rows
                  if (kind == "kill.engaged" or str(_detail(detail).get("flag_actor", "")).endswith(suffix))
                  and (delivery_tag is None or _detail(detail).get("delivery_tag") in (None, delivery_tag))), None)
    if found is None:
        return None
    return (f"already carried out at {found.isoformat(timespec='seconds')}: this kill was delivered again (a worker "
            "lost it before acknowledging it), and what followed it, a resume included, stands")


def _detail(detail: str | None) -> dict[str, Any]:
    """An event's detail, read back (nothing, or what cannot be read: empty)."""
    try:
        found = json.loads(detail or "{}")
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def still_in_force(engine: Engine, client: redis.Redis, *, scope: str, message_id: str,
                   delivery_tag: str | None) -> bool:
    """Whether the kill of `scope` in force is the one this message engaged (its flag, or its mirror row, names
    the message's task id and, the flag, its delivery tag): not a later kill, soft perhaps, after a resume."""
    suffix = f":{message_id}"
    with db.session(engine) as session:
        for row in db.execute(session, ENGAGED, {"scopes": [scope]}):
            if str(row.actor or "").endswith(suffix):
                return True
    flag = _flag_of(client, scope)
    return (flag is not None and str(flag.actor or "").endswith(suffix)
            and (delivery_tag is None or flag.delivery_tag in (None, delivery_tag)))


def stale_resume(engine: Engine, client: redis.Redis, *, scope: str) -> str | None:
    """Why a resume delivered again by the broker must lift nothing, or None when nothing it could lift holds.

    kombu restores a message whose acknowledgement was lost (a worker that died, or lost its connection, as it
    acked), after the visibility timeout: an hour later the operator may have killed the fleet once more, and
    an old resume must not lift that. Nor can the message say when it was sent. So it is refused while a kill
    holds the scope, and said (an alert): a resume whose first delivery never ran is asked for again."""
    with db.session(engine) as session:
        held = check(session, client, None if scope == GLOBAL else scope)
    if not held.killed:
        return None
    where = "the fleet" if scope == GLOBAL else f"agent {scope}"
    reason = (f"not resumed: this resume of {where} was delivered again (a worker lost it before acknowledging "
              "it), so it may be hours old, and the kill in force may have come after it; resume again to lift it")
    alerts.alert("resume_refused", reason, agent=None if scope == GLOBAL else scope, level="warning", scope=scope)
    return reason


def _locked(session: Session, scope: str) -> KillSwitch:
    """The scope's mirror row, locked; a missing one is made released and as old as can be (db.NEVER), so a
    flag only Redis holds is still mirrored back by repair_mirror, and a first kill and resume take turns."""
    return db.locked_row(session, KillSwitch, scope, engaged=False, hard=False, changed_at=db.NEVER)


def _upsert(session: Session, *, scope: str, engaged: bool, reason: str | None, actor: str, hard: bool,
            now: datetime) -> None:
    row = _locked(session, scope)
    row.engaged, row.reason, row.actor, row.hard, row.changed_at = engaged, reason, actor, hard, now
    session.add(row)


def check_redis(client: redis.Redis, agent: str | None) -> KillState:
    """The fast check: Redis only. Raises redis.RedisError when Redis cannot be reached.

    Any value under a kill key is a kill: one that is not Fleet's own record (set by hand, corrupted)
    kills with a reason saying so, never with an exception.
    """
    scopes = [GLOBAL] if agent is None else [GLOBAL, agent]
    try:
        values = client.mget([keys.kill(s) for s in scopes])
    except UnicodeDecodeError:  # not UTF-8: the reply cannot even be decoded, so find which key holds it
        values = ["\ufffd" if client.exists(keys.kill(s)) else None for s in scopes]
    for scope, value in zip(scopes, values, strict=True):
        if value is not None:
            return parse_flag(scope, value)
    return ALIVE


def parse_flag(scope: str, value: Any) -> KillState:
    """The kill a flag's value stands for: Fleet's JSON record, or anything else (still a kill)."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        shown = text if len(text) <= _FOREIGN_SHOWN else text[:_FOREIGN_SHOWN] + "..."
        return KillState(True, scope, f"kill flag not written by Fleet: {shown!r}")
    reason, actor = record.get("reason"), record.get("actor")
    tag = record.get("delivery_tag")
    return KillState(True, scope, None if reason is None else str(reason), None if actor is None else str(actor),
                     at=_when(record.get("at")), hard=record.get("hard") is True,
                     delivery_tag=None if tag is None else str(tag))


def _when(stamp: Any) -> datetime | None:
    if not isinstance(stamp, str):
        return None
    try:
        at = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    return at if at.tzinfo is not None else None  # a naive time cannot be compared: unknown


_TABLE = table_of(KillSwitch)
# Built once (bound value: "scopes"): every dispatch and every claim reads the mirror, and a statement
# built per call costs more in SQLAlchemy than the read costs in the database.
ENGAGED = core_select(_TABLE.c.scope, _TABLE.c.reason, _TABLE.c.actor) \
    .where(_TABLE.c.scope.in_(bindparam("scopes", expanding=True)), _TABLE.c.engaged)


def check_mirror(session: Session, agent: str | None) -> KillState:
    """The durable check: the database mirror only."""
    scopes = [GLOBAL] if agent is None else [GLOBAL, agent]
    rows = db.execute(session, ENGAGED, {"scopes": scopes})
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
    for row in list(session.exec(select(KillSwitch).where(col(KillSwitch.engaged)))):
        flag = record(reason=row.reason, actor=row.actor, at=row.changed_at, hard=row.hard)
        if put_back(client, keys.kill(row.scope), flag, partial(store.engaged_now, session, _TABLE, row.scope)):
            restored += 1
    return restored


def repair_mirror(engine: Engine, client: redis.Redis, scopes: list[str], now: datetime) -> list[str]:
    """Mirror every kill flag Redis holds that the database lacks (a kill whose mirror write failed, or a
    flag set by hand); the scopes repaired.

    A mirror row released after the flag was engaged is a `fleet resume` whose Redis delete has not
    happened (or failed): that flag is left alone, so a resume is never undone. `now` must be read
    before Redis, since it dates flags whose record says nothing of when they were set.
    """
    values = client.mget([keys.kill(s) for s in scopes])
    flags = [parse_flag(scope, value) for scope, value in zip(scopes, values, strict=True) if value is not None]
    return [flag.scope for flag in flags if flag.scope is not None and _mirror_one(engine, flag, flag.at or now)]


def _mirror_one(engine: Engine, flag: KillState, at: datetime) -> bool:
    assert flag.scope is not None
    reason = None if flag.reason is None else flag.reason[:MAX_REASON]
    agent = None if flag.scope == GLOBAL else flag.scope
    try:
        with db.session(engine) as session:
            # Locked (PostgreSQL; SQLite's transaction already holds the write lock), so a resume that
            # commits meanwhile is seen and not overwritten.
            row = _locked(session, flag.scope)
            if row.engaged or row.changed_at >= at:
                return False
            _upsert(session, scope=flag.scope, engaged=True, reason=reason, actor=(flag.actor or "watchdog")[:255],
                    hard=flag.hard, now=at)
            store.add_event(session=session, at=at, kind="kill.mirrored", agent=agent, actor="watchdog",
                            scope=flag.scope, reason=reason, **_engaged_by(flag))
            session.commit()
    except IntegrityError:  # another writer inserted the row first: the next pass looks again
        return False
    return True


def engaged(session: Session) -> list[KillSwitch]:
    """Every engaged switch, from the mirror (for status pages)."""
    return list(session.exec(select(KillSwitch).where(col(KillSwitch.engaged)).order_by(col(KillSwitch.scope))))
