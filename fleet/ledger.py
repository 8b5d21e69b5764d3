"""The spend ledger: daily caps that a reservation can never pass, even under concurrent dispatches.

Each budget day has one row per scope ('*' for the fleet, one per agent). A reservation is a single
conditional UPDATE per row (`... WHERE spent + reserved + x <= cap`), inside a transaction that took
the write lock first (SQLite: BEGIN IMMEDIATE, see fleet/db.py) or that PostgreSQL serialises on the
row lock it re-checks under READ COMMITTED. There is no read-then-write anywhere.
Money is integer micro-dollars; the day is taken from the database's clock in the fleet's timezone,
so a worker with a skewed clock cannot open a second "today".
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo

from sqlalchemy import ColumnElement, TextClause, func, text, update
from sqlalchemy import select as core_select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import Session, col, select

from fleet import db
from fleet.keys import GLOBAL
from fleet.models import MICROS_PER_USD, Run, SpendDay, table_of


def to_micros(usd: float | None) -> int | None:
    """Dollars (as configured) to integer micro-dollars; None stays None (no cap)."""
    if usd is None:
        return None
    if not math.isfinite(usd) or usd < 0:
        raise ValueError("money must be a finite, non-negative amount")
    return round(usd * MICROS_PER_USD)


def to_usd(micros: int) -> float:
    """Micro-dollars to dollars, for display only."""
    return micros / MICROS_PER_USD


def amount(usd: float) -> str:
    """Dollars as shown: 1.20, cents when they say it all; 0.0350, four places for small amounts (a $0.001
    estimate must not read 0.00, as if nothing were reserved); micro-dollars, the ledger's unit, where four places
    would still read zero."""
    if round(usd, 2) == usd or abs(usd) >= 100:
        return f"{usd:,.2f}"
    return f"{usd:,.4f}" if round(usd, 4) != 0 else f"{usd:,.6f}"


def money(usd: float) -> str:
    """$1.20, $0.0350: `amount` with its sign."""
    return f"-${amount(-usd)}" if usd < 0 else f"${amount(usd)}"


def database_now(session: Session) -> datetime:
    """The database server's clock (one clock for every worker), as aware UTC."""
    return as_database_time(session.execute(_NOW[session.get_bind().dialect.name]).scalar_one())


def clock(dialect: str) -> ColumnElement[Any]:
    """The database clock as a column, for a statement that reads it beside other things (one round trip)."""
    return _CLOCK[dialect]


def as_database_time(value: datetime | str) -> datetime:
    """A value of `clock()`, or a timestamp column, as aware UTC: PostgreSQL answers an aware timestamp,
    SQLite a text or a naive datetime, both in UTC."""
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


def budget_day(session: Session, timezone: str, at: datetime | None = None) -> str:
    """Today's budget day (YYYY-MM-DD) by the database clock (or `at`, read from it) in the fleet's timezone."""
    return (at or database_now(session)).astimezone(ZoneInfo(timezone)).date().isoformat()


# Built once: every run reserves, counts and settles (a statement built per call costs more in
# SQLAlchemy than its round trip; see models.table_of).
_CLOCK: dict[str, ColumnElement[Any]] = {"postgresql": func.now(),
                                          "sqlite": func.strftime("%Y-%m-%d %H:%M:%f", "now")}
_NOW = {dialect: core_select(column) for dialect, column in _CLOCK.items()}
_ENSURE = {name: insert(table_of(SpendDay)).on_conflict_do_nothing()
           for name, insert in (("postgresql", pg_insert), ("sqlite", sqlite_insert))}
_ADD_RESERVED = {capped: text("UPDATE spend_days SET reserved_micros = reserved_micros + :amount, updated_at = :now "
                              "WHERE day = :day AND scope = :scope"
                              + (" AND spent_micros + reserved_micros + :amount <= :cap" if capped else ""))
                 for capped in (False, True)}
_COUNT_RUN = {bounded: text("UPDATE spend_days SET runs = runs + 1, updated_at = :now WHERE day = :day AND "
                            "scope = :scope" + (" AND runs < :limit" if bounded else ""))
              for bounded in (False, True)}
_SETTLE_RUN = text("UPDATE runs SET settled_at = :now, reserved_micros = 0 WHERE id = :id")


@dataclass(frozen=True)
class Caps:
    """The caps a reservation is checked against, in micro-dollars (None: no cap)."""

    agent: int | None
    fleet: int | None


def reserve(session: Session, *, day: str, agent: str, amount: int, caps: Caps, now: datetime) -> bool:
    """Reserve `amount` against the agent's and the fleet's caps for `day`, both or neither.

    Runs in the caller's transaction; on False the caller must roll back (nothing is then reserved).
    """
    return reserve_counted(session, day=day, agent=agent, amount=amount, caps=caps, now=now) == "ok"


Reserved = Literal["ok", "caps", "bounded"]


def reserve_counted(session: Session, *, day: str, agent: str, amount: int, caps: Caps, now: datetime,
                    count: bool = False, limit: int | None = None) -> Reserved:
    """`reserve`, and with `count` also `count_run` (the day's run count of the agent, refused at `limit`):
    `ok`, or what refused it (`caps`, `bounded`), in which case the caller must roll back.

    On PostgreSQL the agent's row and then the fleet's are updated by one statement: a round trip and
    the time the fleet's row stays locked are saved on every dispatch (the row every dispatch waits on).
    Anything but both rows taken (a day's first reservation finds no rows; a cap or the bound refused)
    is decided again the long way, on exactly what is left to do, so the answer is the same as there."""
    if session.get_bind().dialect.name == "postgresql":
        took_agent, took_fleet = session.execute(_reserve_both(caps.agent is not None, caps.fleet is not None,
                                                               count, limit is not None),
                                                 {"amount": amount, "day": day, "scope": agent, "now": now,
                                                  "agent_cap": caps.agent, "fleet_cap": caps.fleet,
                                                  "limit": limit}).one()
        if took_agent and took_fleet:
            return "ok"
        if took_agent:  # the fleet's row is missing or its cap refused: the agent's part is done
            return "ok" if _add_reserved(session, day, GLOBAL, amount, caps.fleet, now) else "caps"
    for scope, cap in ((agent, caps.agent), (GLOBAL, caps.fleet)):  # fixed order: no deadlock
        if not _add_reserved(session, day, scope, amount, cap, now):
            return "caps"
    if count and not count_run(session, day=day, agent=agent, limit=limit, now=now):
        return "bounded"
    return "ok"


@functools.cache
def _reserve_both(agent_capped: bool, fleet_capped: bool, count: bool, bounded: bool) -> TextClause:
    """The agent's row, then (only if it was taken) the fleet's: a reservation in one statement."""
    room = " AND spent_micros + reserved_micros + :amount <= "
    return _both_rows(agent_sets=", runs = runs + 1" if count else "",
                      agent_where=(room + ":agent_cap" if agent_capped else "")
                      + (" AND runs < :limit" if count and bounded else ""),
                      fleet_where=(room + ":fleet_cap" if fleet_capped else "") + " AND EXISTS (SELECT 1 FROM agent)")


def _both_rows(*, both_sets: str = "", agent_sets: str = "", agent_where: str = "", fleet_where: str) -> TextClause:
    """One PostgreSQL statement that updates the agent's row, then the fleet's, and says how many of each it
    took. The fleet's UPDATE names the agent's RETURNING in its WHERE (a one-time filter, evaluated before
    it scans), so the agent's row is locked first, in the same order as everywhere else: no deadlock."""
    sets = f"reserved_micros = reserved_micros + :amount{both_sets}, updated_at = :now"
    agent = f"UPDATE spend_days SET {sets}{agent_sets} WHERE day = :day AND scope = :scope{agent_where} RETURNING 1"
    fleet = f"UPDATE spend_days SET {sets} WHERE day = :day AND scope = '{GLOBAL}'{fleet_where} RETURNING 1"
    return text(f"WITH agent AS ({agent}), fleet AS ({fleet}) "
                "SELECT (SELECT count(*) FROM agent), (SELECT count(*) FROM fleet)")


# A booking or a settlement: spent and reserved moved on both rows, neither refused. The fleet's row is taken only
# when the agent's was: a day without the agent's row must make that row (and lock it) before the fleet's is
# locked, or a booking holding the fleet's row waits on a reservation making the agent's row that waits on it.
_MOVE_BOTH = _both_rows(both_sets=", spent_micros = spent_micros + :spent",
                        fleet_where=" AND EXISTS (SELECT 1 FROM agent)")
_MOVE_ONE = text("UPDATE spend_days SET reserved_micros = reserved_micros + :amount, "
                 "spent_micros = spent_micros + :spent, updated_at = :now WHERE day = :day AND scope = :scope")


def _move(session: Session, *, day: str, agent: str, reserved: int, spent: int, now: datetime,
          make_missing: bool) -> None:
    """Add `reserved` and `spent` to the agent's row and the fleet's (one statement on PostgreSQL). A row the
    day lacks is made first when `make_missing` (money spent must be counted), else left out (a reservation
    given back that the day never held)."""
    params = {"amount": reserved, "spent": spent, "day": day, "scope": agent, "now": now}
    if session.get_bind().dialect.name == "postgresql":
        took = tuple(session.execute(_MOVE_BOTH, params).one())
        if not took[0]:  # no agent row: the fleet's was left alone, and is taken after it (agent first, fleet last)
            if make_missing:
                _ensure_many(session, day, [agent], now)
                session.execute(_MOVE_ONE, params)
            session.execute(_MOVE_ONE, {**params, "scope": GLOBAL})
            return
    else:
        took = tuple(db.rowcount(session.execute(_MOVE_ONE, {**params, "scope": scope})) for scope in (agent, GLOBAL))
    if all(took) or not make_missing:
        return
    _ensure_many(session, day, [agent], now)
    for scope, done in zip((agent, GLOBAL), took, strict=True):
        if not done:
            session.execute(_MOVE_ONE, {**params, "scope": scope})


def _add_reserved(session: Session, day: str, scope: str, amount: int, cap: int | None, now: datetime) -> bool:
    params = {"amount": amount, "cap": cap, "day": day, "scope": scope, "now": now}
    if db.rowcount(session.execute(_ADD_RESERVED[cap is not None], params)) == 1:
        return True
    # The day's first reservation finds no row (or the cap refused): make the rows, then ask once more. The
    # upsert is not made in every reservation: its round trip was a third of one on the fleet's hot row.
    _ensure_many(session, day, [] if scope == GLOBAL else [scope], now)
    return db.rowcount(session.execute(_ADD_RESERVED[cap is not None], params)) == 1


@dataclass(frozen=True)
class Want:
    """One run of a batch to reserve and count: its agent (one run per agent), estimate, cap and daily bound."""

    agent: str
    amount: int
    cap: int | None
    bound: int | None


def reserve_many(session: Session, *, day: str, wants: list[Want], fleet_cap: int | None,
                 now: datetime) -> dict[str, str] | None:
    """`reserve` and `count_run` for a batch of runs of different agents, in the caller's transaction and a
    few statements: the agents refused and why (`caps`, `bounded`). None when the fleet's cap cannot take
    the whole batch at once: the caller must roll back and reserve one run at a time, in order, so that
    which runs fit is decided exactly as one-by-one dispatches would decide it."""
    agents = sorted(want.agent for want in wants)
    _ensure_many(session, day, agents, now)
    # The agents' rows locked in name order first: two batches over the same agents wait, never deadlock.
    session.exec(select(SpendDay.scope).where(col(SpendDay.day) == day, col(SpendDay.scope).in_(agents))
                 .order_by(col(SpendDay.scope)).with_for_update()).all()
    refused: dict[str, str] = {}
    plain: dict[int, list[str]] = {}
    for want in wants:  # a capped or bounded agent alone, with its conditional updates
        if want.cap is None and want.bound is None:
            plain.setdefault(want.amount, []).append(want.agent)
        elif not _add_reserved(session, day, want.agent, want.amount, want.cap, now):
            refused[want.agent] = "caps"
        elif not count_run(session, day=day, agent=want.agent, limit=want.bound, now=now):
            _add_reserved(session, day, want.agent, -want.amount, None, now)  # this run does not happen
            refused[want.agent] = "bounded"
    for amount, group in plain.items():  # the rest: nothing can refuse them, one statement per estimate
        session.execute(update(SpendDay).where(col(SpendDay.day) == day, col(SpendDay.scope).in_(group)).values(
            reserved_micros=SpendDay.reserved_micros + amount, runs=SpendDay.runs + 1, updated_at=now))
    total = sum(want.amount for want in wants if want.agent not in refused)
    if not _add_reserved(session, day, GLOBAL, total, fleet_cap, now):
        return None
    return refused


def count_run(session: Session, *, day: str, agent: str, limit: int | None, now: datetime) -> bool:
    """Count one more run of `agent` on `day`, unless `limit` runs are counted already (a bounded
    agent): one conditional UPDATE, in the caller's reservation transaction, after `reserve` (which
    made the row). Two dispatchers at `limit - 1` cannot both pass: the second waits on the row lock
    the first took and its WHERE is evaluated again on the committed count (PostgreSQL, READ
    COMMITTED), or it never started before the first committed (SQLite's BEGIN IMMEDIATE)."""
    result = session.execute(_COUNT_RUN[limit is not None],
                             params={"limit": limit, "day": day, "scope": agent, "now": now})
    return db.rowcount(result) == 1


def uncount_run(session: Session, *, day: str, agent: str) -> None:
    """Give back a run counted by `count_run` whose row is deleted (its message could not be sent)."""
    session.execute(text("UPDATE spend_days SET runs = runs - 1 WHERE day = :day AND scope = :scope AND runs > 0"),
                    params={"day": day, "scope": agent})


def runs_counted(session: Session, *, day: str, agent: str) -> int:
    """How many runs of `agent` were counted on `day`."""
    row = session.get(SpendDay, (day, agent))
    return 0 if row is None else row.runs


def _ensure_many(session: Session, day: str, agents: list[str], now: datetime) -> None:
    rows = [{"day": day, "scope": scope, "reserved_micros": 0, "spent_micros": 0, "runs": 0, "updated_at": now}
            for scope in (*agents, GLOBAL)]
    db.execute(session, _ENSURE[session.get_bind().dialect.name], rows)  # Core executemany: one statement


def charge(session: Session, *, run: Run, amount: int, now: datetime, own_reservation: bool = True,
           current: Run | None = None) -> None:
    """Add `amount` to what a run spent: for money no owner is tracking any more (an attempt that lost its
    run books what it spent all the same, the money is gone, with `own_reservation=False`, leaving the new
    owner's reservation alone; an abandoned attempt is booked its whole reservation). The owner of a
    running attempt books through `book_attempt` instead, which cannot count a step twice. `current`: the run's
    row as this transaction already holds it, locked and read (it is not read again)."""
    if current is None:
        current = session.get(Run, run.id, with_for_update=True, populate_existing=True)
    if current is not None:
        _book(session, current, amount, run.budget_day, now, own_reservation=own_reservation)


def book_attempt(session: Session, *, run: Run, total: int, now: datetime, final: bool = False,
                 current: Run | None = None) -> int | None:
    """Book the current attempt's cost so far as `total` (the agent's cumulative figure): only the part not
    booked yet is added, so a retry of a commit whose answer was lost books nothing twice. `final`: the
    agent's own last figure, which may also come in below what its steps added up to (a correction,
    never taking back more than the run has booked). Returns what was added (or taken back); None when
    the row is no longer this attempt's (another fence owns it: the caller books what it knows it spent
    with `charge`, as a lost attempt's).

    Its own reservation is used up first, so the ledger always holds spent + what is still reserved.
    Only the run's fenced owner calls this, in its own transaction. `current`: the run's row as this
    transaction already holds it, locked and read (it is not read again, and is kept up to date).
    """
    if current is None:
        current = session.get(Run, run.id, with_for_update=True, populate_existing=True)
    if current is None or current.fence != run.fence:
        return None
    amount = total - current.attempt_cost_micros
    if amount == 0 or (amount < 0 and not final):
        return 0
    session.execute(text("UPDATE runs SET attempt_cost_micros = :total WHERE id = :id"),
                    params={"total": total, "id": run.id})
    set_committed_value(current, "attempt_cost_micros", total)
    return _book(session, current, amount, current.budget_day, now, own_reservation=True)


def _book(session: Session, current: Run, amount: int, day: str | None, now: datetime, *,
          own_reservation: bool) -> int:
    if amount == 0 or day is None:
        return 0
    owned = own_reservation and current.settled_at is None
    reserved = current.reserved_micros if owned else 0
    if amount < 0:
        amount = max(amount, -current.cost_micros)
        if amount == 0:
            return 0
    consumed = min(reserved, max(amount, 0))
    session.execute(text("UPDATE runs SET cost_micros = cost_micros + :amount, "
                         "reserved_micros = reserved_micros - :consumed WHERE id = :id"),
                    params={"amount": amount, "consumed": consumed, "id": current.id})
    # What the row now holds, without a flush of its own at commit (the UPDATE above wrote it).
    set_committed_value(current, "cost_micros", current.cost_micros + amount)
    set_committed_value(current, "reserved_micros", current.reserved_micros - consumed)
    _move(session, day=day, agent=current.agent, reserved=-consumed, spent=amount, now=now, make_missing=True)
    return amount


def settle(session: Session, *, run: Run, now: datetime, current: Run | None = None) -> bool:
    """Close the run's reservation: what it did not spend goes back, once; False if already settled.

    The actual cost was booked as it was reported (`charge`), so the reservation is replaced by it.
    `current`: the run's row as this transaction already holds it, locked and read (see `book_attempt`).
    """
    if run.budget_day is None:
        return False
    if current is None:
        current = session.get(Run, run.id, with_for_update=True, populate_existing=True)
    if current is None or current.settled_at is not None:
        return False
    remaining = current.reserved_micros
    session.execute(_SETTLE_RUN, params={"now": now, "id": run.id})
    if remaining:  # what the day holds for it goes back (a day without its rows holds nothing of it)
        _move(session, day=run.budget_day, agent=run.agent, reserved=-remaining, spent=0, now=now, make_missing=False)
    set_committed_value(current, "settled_at", now)  # written above: no second UPDATE at commit
    set_committed_value(current, "reserved_micros", 0)
    if run is not current:
        run.settled_at, run.reserved_micros = now, 0
    return True


def headroom(session: Session, *, day: str, agent: str, caps: Caps) -> int | None:
    """What the tighter of the two caps still allows today (None: neither is capped)."""
    if caps.agent is None and caps.fleet is None:
        return None
    rows = {row.scope: row for row in session.exec(
        select(SpendDay).where(SpendDay.day == day, col(SpendDay.scope).in_([agent, GLOBAL])))}
    room = [cap - _used(rows.get(scope)) for scope, cap in ((agent, caps.agent), (GLOBAL, caps.fleet))
            if cap is not None]
    return min(room) if room else None


def _used(row: SpendDay | None) -> int:
    return 0 if row is None else row.spent_micros + row.reserved_micros


def day_rows(session: Session, *, day: str) -> list[SpendDay]:
    """Every scope's row for a day."""
    return list(session.exec(select(SpendDay).where(SpendDay.day == day).order_by(col(SpendDay.scope))))
