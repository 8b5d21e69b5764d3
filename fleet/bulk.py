"""Many dispatches at once: a beat pass over every agent due at the same moment, at the cost of a few.

The same steps and gates as fleet/dispatch.py, for a batch of keys of different agents: one database
transaction (a handful of statements for the whole batch) and one Redis round trip (every admission
script in a pipeline, each still atomic), then the messages. A thousand agents on one schedule cost a
beat pass about what the messages cost, instead of a thousand transactions.

Whatever a batch cannot decide exactly as one-at-a-time dispatches would — a key that another process
created in the meantime (a second beat), a fleet cap that cannot take the whole batch — rolls the batch
back, gives every lease back, and dispatches its keys one at a time instead: the slow path is the
reference, and the batch only ever answers what it would have answered.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import redis
from sqlalchemy import insert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select

from fleet import alerts, db, killswitch, ledger, pause, store
from fleet.admission import Admission
from fleet.config import AgentSpec
from fleet.dispatch import (
    DispatchRequest,
    DispatchResult,
    Gate,
    Sender,
    admission_refusal,
    caps_of,
    dispatch,
    duplicate_of,
    first_refusal_today,
    give_back,
    refuse,
    still_queued,
    unsend,
)
from fleet.errors import UnavailableError
from fleet.keys import GLOBAL
from fleet.locks import Lease
from fleet.models import NOT_STARTED, KillSwitch, Pause, Run, RunEvent, RunStatus, table_of
from fleet.services import Services, as_fleet_error

CHUNK = 200  # rows per multi-row INSERT (SQLite limits the bound values of one statement)


@dataclass
class _Item:
    """One key of the batch and what became of it."""

    spec: AgentSpec
    work_key: str
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    result: DispatchResult | None = None
    lease: Lease | None = None
    day: str | None = None  # the budget day it reserved on

    @property
    def idem_key(self) -> str:
        return f"{self.spec.name}:{self.work_key}"


class _OneAtATime(Exception):  # a signal, not an error: the batch defers to the slow path
    """The batch cannot decide this exactly: roll back and dispatch each key on its own."""


def dispatch_many(services: Services, wanted: Iterable[tuple[AgentSpec, str]], send: Sender,
                  actor: str) -> list[DispatchResult]:
    """Dispatch one key per agent (`wanted`: the agent and its work key), in one transaction; the answers, in
    order. Raises UnavailableError (75) when Redis or the database is down: then nothing was kept."""
    answers = [_Item(spec, work_key) for spec, work_key in wanted]
    if len({item.spec.name for item in answers}) != len(answers):
        raise ValueError("dispatch_many takes one key per agent")
    # Rows are locked in agent order (and the fleet's row last, as `ledger.reserve` does), so two batches
    # and any single dispatch can only wait on each other, never deadlock.
    items = sorted(answers, key=lambda item: item.spec.name)
    try:
        _accept(services, items, actor)
    except _OneAtATime:
        return [_one(services, item, send, actor) for item in answers]
    except (redis.RedisError, SQLAlchemyError) as exc:
        raise as_fleet_error(exc) from None
    _send_all(services, items, send)
    return [item.result for item in answers if item.result is not None]


def _one(services: Services, item: _Item, send: Sender, actor: str) -> DispatchResult:
    """One key on the slow path. A message that cannot be sent undoes that run only (dispatch.unsend) and is
    answered `unavailable`, as on the batch's path: the keys after it are still dispatched."""
    tried: list[str] = []

    def sending(run_id: str, fence: int) -> None:
        tried.append(run_id)
        send(run_id, fence)

    try:
        return dispatch(services, DispatchRequest(item.spec.name, item.work_key, actor=actor), sending)
    except UnavailableError as exc:
        if not tried:  # Redis or the database is down: the pass stops, as the batch's own path would
            raise
        return DispatchResult(tried[0], "unavailable", reason=str(exc))


def _accept(services: Services, items: list[_Item], actor: str) -> None:
    """Everything up to the commit; on any failure every lease taken is given back."""
    try:
        with db.session(services.engine) as session:
            now = services.now()
            fresh = _answer_duplicates(session, services, items, now)
            admitted = _admit(session, services, fresh)
            _reserve(session, services, admitted)
            _insert(session, admitted, actor, now, queued_at=ledger.database_now(session))
            session.commit()
    except BaseException:
        _give_back_all(services, items)
        raise
    _answer_raced_keys(services, items)
    _record_refusals(services, items)


def _answer_duplicates(session: Session, services: Services, items: list[_Item], now: datetime) -> list[_Item]:
    """Keys that have a run already are answered from it (a stale unstarted one sends the batch the
    one-at-a-time way, whose archive-stale archives it); the rest, to create."""
    by_key = {item.idem_key: item for item in items}
    cutoff = now - timedelta(seconds=services.config.fleet.stale_after_s)
    for start in range(0, len(items), CHUNK):
        keys = [item.idem_key for item in items[start:start + CHUNK]]
        for run in session.exec(select(Run).where(col(Run.idem_key).in_(keys))):
            item = by_key[run.idem_key]
            if run.status in NOT_STARTED and run.attempt == 0 and run.created_at < cutoff:
                # Archiving settles the stale run: its agent's spend row, then the fleet's, before this batch
                # takes its agents' rows. Holding the fleet's row while waiting on an agent's, against a single
                # dispatch that holds that agent's row and waits on the fleet's, deadlocks (PostgreSQL). Rare
                # (a run unstarted for stale_after_s): the one-at-a-time path archives in its own order.
                raise _OneAtATime()
            item.result = duplicate_of(run)
    return [item for item in items if item.result is None]


def _admit(session: Session, services: Services, items: list[_Item]) -> list[_Item]:
    """The mirrors (a kill or pause that Redis lost still stops intake), then every admission in one
    round trip; the items admitted, their leases in hand."""
    if not items:
        return []
    fleet = services.config.fleet
    names = [item.spec.name for item in items]
    killed = _mirrored(session, KillSwitch, names)
    paused = _mirrored(session, Pause, names)
    if killed:
        killswitch.restore(session, services.redis)
    taken = store.live_slots_of(session=session, agents=names)
    judged = services.admissions.admit_many([
        (item.spec.name, item.spec.concurrency, item.run_id, item.spec.breaker_settings(fleet)[1],
         fleet.queued_lease_ttl_s, taken.get(item.spec.name, set())) for item in items])
    for item, verdict in zip(items, judged, strict=True):  # every lease in hand before any judging can fail:
        item.lease = verdict.lease  # a failure below gives all of them back (see _accept)
    admitted = []
    for item, verdict in zip(items, judged, strict=True):
        refused = _refusal(session, services, item, verdict, killed, paused)
        if refused is None:
            admitted.append(item)
        else:
            item.result = refused
            if item.lease is not None:
                give_back(services, item.lease, refused)
                item.lease = None
    return admitted


def _refusal(session: Session, services: Services, item: _Item, verdict: Admission, killed: set[str],
             paused: set[str]) -> DispatchResult | None:
    if verdict.verdict == "error":  # a single dispatch of this key would fail with 75; the others go on
        return DispatchResult(item.run_id, "unavailable", reason=f"Redis refused its admission: {verdict.error}")
    result = DispatchResult(item.run_id, "refused", would_fire=[item.run_id])
    refused = admission_refusal(result, verdict, item.spec)
    if refused is not None:
        return refused
    # The detail read decides, as in a single dispatch: on PostgreSQL it is a later snapshot than the mirror
    # read, and a release committed in between lets the key go on (a refusal never says "not killed").
    name = item.spec.name
    state = killswitch.check_mirror(session, name) if killed & {GLOBAL, name} else killswitch.ALIVE
    if state.killed:
        return refuse(result, "kill", Gate(False, state.describe()))
    # pause.check puts the flag Redis lost back
    held = pause.check(session, services.redis, name) if paused & {GLOBAL, name} else None
    if held is not None and held.paused:
        return refuse(result, "pause", Gate(False, held.describe()))
    return None


def _mirrored(session: Session, table: type[KillSwitch] | type[Pause], names: list[str]) -> set[str]:
    scopes = {GLOBAL, *names}
    engaged = session.exec(select(table.scope).where(col(table.engaged)))  # a handful at most
    return {scope for scope in engaged if scope in scopes}


def _reserve(session: Session, services: Services, items: list[_Item]) -> None:
    """The spend reservations and the day's run counts of the admitted items; a refused one gives its
    lease back. A fleet cap that cannot take the whole batch sends it down the one-at-a-time path."""
    if not items:
        return
    fleet = services.config.fleet
    day = ledger.budget_day(session, fleet.timezone)
    wants = [ledger.Want(item.spec.name, _estimate(item.spec), caps_of(services, item.spec).agent,
                         item.spec.max_runs_per_day) for item in items]
    refused = ledger.reserve_many(session, day=day, wants=wants, fleet_cap=ledger.to_micros(fleet.daily_cap_usd),
                                  now=services.now())
    if refused is None:
        raise _OneAtATime()
    for item in items:
        why = refused.get(item.spec.name)
        item.day = day
        if why is not None:
            item.result = refuse(DispatchResult(item.run_id, "refused", would_fire=[item.run_id]), why,
                                 Gate(False, f"refused by the ledger ({why})"))
            if item.lease is not None:
                give_back(services, item.lease, item.result)
                item.lease = None
        else:
            item.result = DispatchResult(item.run_id, "queued", would_fire=[item.run_id],
                                         fence=item.lease.fence if item.lease else None)


def _estimate(spec: AgentSpec) -> int:
    return ledger.to_micros(spec.est_cost_usd) or 0


def _insert(session: Session, items: list[_Item], actor: str, now: datetime, *, queued_at: datetime) -> None:
    """The queued rows and their events, a few multi-row statements; a key someone else created since we
    looked (a second beat) defers the batch to the one-at-a-time path."""
    queued = [item for item in items if item.result is not None and item.result.status == "queued"]
    if not queued:
        return
    upsert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    runs, events = table_of(Run), table_of(RunEvent)  # Core: one statement, compiled once
    rows = [_row(item, actor, now, queued_at) for item in queued]
    inserted = session.execute(upsert(runs).on_conflict_do_nothing().returning(runs.c.id), rows).all()
    if len(inserted) != len(rows):
        raise _OneAtATime()
    session.execute(insert(events), [event for item in queued for event in _events(item, actor, now)])


def _row(item: _Item, actor: str, now: datetime, queued_at: datetime) -> dict[str, object]:
    # queued_at is the reaper's to compare (resend_after_s): by the database's clock, one for every host.
    assert item.lease is not None and item.result is not None
    return {"id": item.run_id, "idem_key": item.idem_key, "agent": item.spec.name, "work_key": item.work_key,
            "status": RunStatus.QUEUED.value, "attempt": 0, "max_attempts": 2, "payload": None,
            "reserved_micros": _estimate(item.spec), "cost_micros": 0, "dispatched_by": actor[:255],
            "fence": item.lease.fence, "slot": item.lease.slot, "budget_day": item.day,
            "queued_at": queued_at, "sends": 1, "created_at": now, "updated_at": now}


def _events(item: _Item, actor: str, now: datetime) -> list[dict[str, object]]:
    assert item.lease is not None
    name, run_id = item.spec.name, item.run_id
    return [{"at": now, "kind": "run.created", "run_id": run_id, "agent": name, "actor": actor,
             "detail": store.event_detail(actor=actor, work_key=item.work_key, replay_of=None)},
            {"at": now, "kind": "run.queued", "run_id": run_id, "agent": name, "actor": None,
             "detail": store.event_detail(fence=item.lease.fence, slot=item.lease.slot,
                                      reserved_micros=_estimate(item.spec))}]


def _give_back_all(services: Services, items: list[_Item]) -> None:
    for item in items:
        if item.lease is not None:
            with contextlib.suppress(redis.RedisError):
                give_back(services, item.lease, DispatchResult(item.run_id, "refused"))
            item.lease = None
        item.result = None if item.result is None or item.result.status != "duplicate" else item.result


def _answer_raced_keys(services: Services, items: list[_Item]) -> None:
    """A refused key may have been refused because of its own run, created meanwhile by a batch racing this
    one (a second beat): its slot or its money taken by it. A single dispatch would have waited on that
    key and answered `duplicate`, so do we."""
    refused = {item.idem_key: item for item in items if item.result is not None and item.result.status == "refused"}
    if not refused:
        return
    # After the commit: the runs accepted are kept and must be sent, so a database that fails now leaves the
    # refusals as they are (what a single dispatch racing that key could also have answered).
    with contextlib.suppress(SQLAlchemyError), db.session(services.engine) as session:
        for run in session.exec(select(Run).where(col(Run.idem_key).in_(list(refused)))):
            refused[run.idem_key].result = duplicate_of(run)


def _record_refusals(services: Services, items: list[_Item]) -> None:
    """One event per refusal (a paused agent's tick records none, as a single tick does), one transaction."""
    refused = [item for item in items if item.result is not None and item.result.status == "refused"
               and item.result.reason != "paused"]
    for item in refused:
        if item.result is not None and item.result.reason == "over_cap" and item.day is not None \
                and first_refusal_today(services, item.spec.name, item.day):
            alerts.alert("cap_refusal", f"dispatch of {item.spec.name} refused: its daily cap is reached",
                         agent=item.spec.name, level="warning")
    if not refused:
        return
    now = services.now()
    with contextlib.suppress(SQLAlchemyError), db.session(services.engine) as session:
        session.execute(insert(RunEvent), [
            {"at": now, "kind": "dispatch.refused", "run_id": item.run_id, "agent": item.spec.name, "actor": None,
             "detail": store.event_detail(reason=item.result.reason if item.result else None)} for item in refused])
        session.commit()


def _send_all(services: Services, items: list[_Item], send: Sender) -> None:
    """One message per queued run. A run whose message could not be sent is undone (see dispatch.unsend)
    and answered `unavailable`: its key may be dispatched again, and the other runs of the batch stand."""
    for item in items:
        result = item.result
        if result is None or result.status != "queued" or result.fence is None or item.lease is None:
            continue
        try:
            send(item.run_id, result.fence)
        except Exception as exc:  # noqa: BLE001 - whatever the broker raised, nothing may stay half-done
            undone = unsend(services, Run(id=item.run_id, agent=item.spec.name, idem_key=item.idem_key,
                                          work_key=item.work_key, status=RunStatus.QUEUED, fence=result.fence,
                                          slot=item.lease.slot, created_at=services.now(), updated_at=services.now()))
            if undone != "undone":
                result.reason = still_queued(services, undone, exc)
                continue
            result.status, result.reason = "unavailable", f"could not enqueue ({exc.__class__.__name__}); undone"
