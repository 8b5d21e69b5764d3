"""The spend ledger: daily caps that a reservation can never pass, even under concurrent dispatches.

Each budget day has one row per agent, and the fleet's budget in STRIPES rows ('*0' to '*7'). A
reservation is a single conditional UPDATE per row (`... WHERE spent + reserved + x <= cap`), inside a
transaction that took the write lock first (SQLite: BEGIN IMMEDIATE, see fleet/db.py) or that
PostgreSQL serialises on the row lock it re-checks under READ COMMITTED. There is no read-then-write
anywhere, except under the locks of every fleet stripe (below).

The fleet's stripes: one fleet-wide row, updated by every dispatch, settlement and charge of every
agent and held locked through each commit, made the whole fleet one queue. Each run's share of the
fleet budget lives on one stripe instead (chosen by its id), and each stripe holds an allotment of
the fleet's cap: the allotments always add up to the cap, so a stripe reserving within its own
allotment keeps the fleet within the cap with one row lock. A stripe that has no room left locks all
of them (in order), checks the fleet's whole room, and shares what is left out again: the fleet
refuses exactly when the sum of its stripes cannot take the amount, as the single row did.
Money is integer micro-dollars; the day is taken from the database's clock in the fleet's timezone,
so a worker with a skewed clock cannot open a second "today".
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from sqlalchemy import text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, col, select

from fleet import db
from fleet.keys import GLOBAL
from fleet.models import MICROS_PER_USD, Run, SpendDay


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


def database_now(session: Session) -> datetime:
    """The database server's clock (one clock for every worker), as aware UTC."""
    if session.get_bind().dialect.name == "postgresql":
        value = session.execute(text("SELECT now()")).scalar_one()
        return value.astimezone(UTC)  # type: ignore[no-any-return]
    value = session.execute(text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')")).scalar_one()
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


def budget_day(session: Session, timezone: str, at: datetime | None = None) -> str:
    """Today's budget day (YYYY-MM-DD) by the database clock (or `at`, read from it) in the fleet's timezone."""
    return (at or database_now(session)).astimezone(ZoneInfo(timezone)).date().isoformat()


@dataclass(frozen=True)
class Caps:
    """The caps a reservation is checked against, in micro-dollars (None: no cap)."""

    agent: int | None
    fleet: int | None


STRIPES = 8
DEADLOCK = "40P01"  # PostgreSQL's SQLSTATE for a deadlock's victim
FLEET_STRIPES = tuple(f"{GLOBAL}{i}" for i in range(STRIPES))


def stripe_of(run_id: str) -> str:
    """The fleet stripe that holds a run's share of the fleet's budget (every attempt, every day)."""
    return FLEET_STRIPES[zlib.crc32(run_id.encode()) % STRIPES]


def reserve(session: Session, *, day: str, agent: str, run_id: str, amount: int, caps: Caps, now: datetime) -> bool:
    """Reserve `amount` for run `run_id` against the agent's and the fleet's caps for `day`, both or neither.

    Runs in the caller's transaction; on False the caller must roll back (nothing is then reserved).
    """
    _ensure_many(session, day, [agent], now, stripes=[stripe_of(run_id)])
    if not _add_reserved(session, day, agent, amount, caps.agent, now):  # the agent's row first: no deadlock
        return False
    return _reserve_fleet(session, day, {stripe_of(run_id): amount}, caps.fleet, now)


def _reserve_fleet(session: Session, day: str, amounts: dict[str, int], cap: int | None, now: datetime) -> bool:
    """Add each stripe's amount to its reservations, within the fleet's cap; False (roll back) when it cannot
    take them all. Within each stripe's allotment, one conditional UPDATE; otherwise the rebalance.

    The conditional UPDATEs run under a savepoint, rolled back when one fails: a PostgreSQL UPDATE whose
    row changed under it locks the newest version before it re-checks its WHERE, and keeps that lock
    when the check fails. Holding it, the rebalance would take the stripes out of order (a deadlock)."""
    stripes = sorted(amounts)  # in order: two transactions never wait on each other in a cycle
    if cap is None:
        for stripe in stripes:
            _add_reserved(session, day, stripe, amounts[stripe], None, now)
        return True
    session.execute(text("SAVEPOINT fleet_stripes"))
    if all(_add_within_allotment(session, day, stripe, amounts[stripe], cap, now) for stripe in stripes):
        return True
    session.execute(text("ROLLBACK TO SAVEPOINT fleet_stripes"))
    return _rebalance(session, day, amounts, cap, now)


def _add_within_allotment(session: Session, day: str, stripe: str, amount: int, cap: int, now: datetime) -> bool:
    # The allotment counts only while it was shared out for this cap (a changed cap shares them out anew).
    result = session.execute(
        text("UPDATE spend_days SET reserved_micros = reserved_micros + :amount, updated_at = :now "
             "WHERE day = :day AND scope = :scope AND cap_micros = :cap "
             "AND spent_micros + reserved_micros + :amount <= allot_micros"),
        params={"amount": amount, "cap": cap, "day": day, "scope": stripe, "now": now})
    return db.rowcount(result) == 1


def _rebalance(session: Session, day: str, wants: dict[str, int], cap: int, now: datetime) -> bool:
    """`_rebalance_locked`, tried again when PostgreSQL ends it as a deadlock's victim: a transaction that
    booked on a stripe earlier (a stale run archived by the same dispatch) holds that stripe already, and
    may meet another rebalance that took the stripes before it in order. Under a savepoint, the victim
    gives back only the locks the rebalance took, and the other goes on."""
    for attempt in range(3):
        session.execute(text("SAVEPOINT fleet_rebalance"))
        try:
            return _rebalance_locked(session, day, wants, cap, now)
        except OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) != DEADLOCK or attempt == 2:
                raise
            session.execute(text("ROLLBACK TO SAVEPOINT fleet_rebalance"))
    raise AssertionError("unreachable")


def _rebalance_locked(session: Session, day: str, wants: dict[str, int], cap: int, now: datetime) -> bool:
    """With every stripe locked: whether the fleet can take `wants` at all (exactly the check the single
    fleet row made), and if so, reserve them and share the room left equally among the stripes again,
    each stripe's allotment being what it holds plus its share, so that the allotments add up to `cap`."""
    _ensure_many(session, day, [], now, stripes=list(FLEET_STRIPES))
    # Columns, not entities: nothing stale stays in the session once the UPDATEs below change the rows.
    rows = session.exec(select(SpendDay.scope, SpendDay.spent_micros, SpendDay.reserved_micros)
                        .where(col(SpendDay.day) == day, col(SpendDay.scope).in_(FLEET_STRIPES))
                        .order_by(col(SpendDay.scope)).with_for_update()).all()
    held = {scope: spent + reserved + wants.get(scope, 0) for scope, spent, reserved in rows}
    room = cap - sum(held.values())
    if room < 0:
        return False
    share, extra = divmod(room, STRIPES)
    for i, stripe in enumerate(FLEET_STRIPES):
        session.execute(
            text("UPDATE spend_days SET reserved_micros = reserved_micros + :amount, allot_micros = :allot, "
                 "cap_micros = :cap, updated_at = :now WHERE day = :day AND scope = :scope"),
            params={"amount": wants.get(stripe, 0), "allot": held[stripe] + share + (1 if i < extra else 0),
                    "cap": cap, "now": now, "day": day, "scope": stripe})
    return True


def _add_reserved(session: Session, day: str, scope: str, amount: int, cap: int | None, now: datetime) -> bool:
    guard = "" if cap is None else " AND spent_micros + reserved_micros + :amount <= :cap"
    result = session.execute(
        text("UPDATE spend_days SET reserved_micros = reserved_micros + :amount, updated_at = :now "
             f"WHERE day = :day AND scope = :scope{guard}"),
        params={"amount": amount, "cap": cap, "day": day, "scope": scope, "now": now},
    )
    return db.rowcount(result) == 1


@dataclass(frozen=True)
class Want:
    """One run of a batch to reserve and count: its agent (one run per agent), estimate, cap and daily bound."""

    agent: str
    run_id: str
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
    _ensure_many(session, day, agents, now, stripes=sorted({stripe_of(want.run_id) for want in wants}))
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
    amounts: dict[str, int] = {}
    for want in wants:
        if want.agent not in refused:
            amounts[stripe_of(want.run_id)] = amounts.get(stripe_of(want.run_id), 0) + want.amount
    if not _reserve_fleet(session, day, amounts, fleet_cap, now):
        return None
    return refused


def count_run(session: Session, *, day: str, agent: str, limit: int | None, now: datetime) -> bool:
    """Count one more run of `agent` on `day`, unless `limit` runs are counted already (a bounded
    agent): one conditional UPDATE, in the caller's reservation transaction, after `reserve` (which
    made the row). Two dispatchers at `limit - 1` cannot both pass: the second waits on the row lock
    the first took and its WHERE is evaluated again on the committed count (PostgreSQL, READ
    COMMITTED), or it never started before the first committed (SQLite's BEGIN IMMEDIATE)."""
    guard = "" if limit is None else " AND runs < :limit"
    result = session.execute(
        text(f"UPDATE spend_days SET runs = runs + 1, updated_at = :now WHERE day = :day AND scope = :scope{guard}"),
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


def _ensure_many(session: Session, day: str, agents: list[str], now: datetime, *, stripes: list[str]) -> None:
    dialect = session.get_bind().dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    rows = [{"day": day, "scope": scope, "reserved_micros": 0, "spent_micros": 0, "runs": 0, "updated_at": now,
             "allot_micros": None, "cap_micros": None} for scope in (*agents, *stripes)]
    table = SpendDay.__table__  # type: ignore[attr-defined]  # Core executemany: one statement, compiled once
    session.execute(insert(table).on_conflict_do_nothing(), rows)


def charge(session: Session, *, run: Run, amount: int, now: datetime, own_reservation: bool = True) -> None:
    """Add `amount` to what a run spent: for money no owner is tracking any more (an attempt that lost its
    run books what it spent all the same, the money is gone, with `own_reservation=False`, leaving the new
    owner's reservation alone; an abandoned attempt is booked its whole reservation). The owner of a
    running attempt books through `book_attempt` instead, which cannot count a step twice."""
    current = session.get(Run, run.id, with_for_update=True, populate_existing=True)
    if current is not None:
        _book(session, current, amount, run.budget_day, now, own_reservation=own_reservation)


def book_attempt(session: Session, *, run: Run, total: int, now: datetime, final: bool = False) -> int | None:
    """Book the current attempt's cost so far as `total` (the agent's cumulative figure): only the part not
    booked yet is added, so a retry of a commit whose answer was lost books nothing twice. `final`: the
    agent's own last figure, which may also come in below what its steps added up to (a correction,
    never taking back more than the run has booked). Returns what was added (or taken back); None when
    the row is no longer this attempt's (another fence owns it: the caller books what it knows it spent
    with `charge`, as a lost attempt's).

    Its own reservation is used up first, so the ledger always holds spent + what is still reserved.
    Only the run's fenced owner calls this, in its own transaction.
    """
    current = session.get(Run, run.id, with_for_update=True, populate_existing=True)
    if current is None or current.fence != run.fence:
        return None
    amount = total - current.attempt_cost_micros
    if amount == 0 or (amount < 0 and not final):
        return 0
    session.execute(text("UPDATE runs SET attempt_cost_micros = :total WHERE id = :id"),
                    params={"total": total, "id": run.id})
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
    _ensure_many(session, day, [current.agent], now, stripes=[stripe_of(current.id)])
    for scope in (current.agent, stripe_of(current.id)):
        session.execute(text("UPDATE spend_days SET spent_micros = spent_micros + :amount, "
                             "reserved_micros = reserved_micros - :consumed, updated_at = :now "
                             "WHERE day = :day AND scope = :scope"),
                        params={"amount": amount, "consumed": consumed, "now": now, "day": day, "scope": scope})
    return amount


def settle(session: Session, *, run: Run, now: datetime) -> bool:
    """Close the run's reservation: what it did not spend goes back, once; False if already settled.

    The actual cost was booked as it was reported (`charge`), so the reservation is replaced by it.
    """
    if run.budget_day is None:
        return False
    current = session.get(Run, run.id, with_for_update=True, populate_existing=True)
    if current is None or current.settled_at is not None:
        return False
    remaining = current.reserved_micros
    session.execute(text("UPDATE runs SET settled_at = :now, reserved_micros = 0 WHERE id = :id"),
                    params={"now": now, "id": run.id})
    _ensure_many(session, run.budget_day, [run.agent], now, stripes=[stripe_of(run.id)])
    for scope in (run.agent, stripe_of(run.id)):
        session.execute(text("UPDATE spend_days SET reserved_micros = reserved_micros - :remaining, "
                             "updated_at = :now WHERE day = :day AND scope = :scope"),
                        params={"remaining": remaining, "now": now, "day": run.budget_day, "scope": scope})
    current.settled_at, current.reserved_micros = now, 0
    run.settled_at, run.reserved_micros = now, 0
    return True


def headroom(session: Session, *, day: str, agent: str, caps: Caps) -> int | None:
    """What the tighter of the two caps still allows today (None: neither is capped)."""
    scopes = [agent, *FLEET_STRIPES] if caps.fleet is not None else [agent]
    rows = session.exec(select(SpendDay.scope, SpendDay.spent_micros, SpendDay.reserved_micros)
                        .where(col(SpendDay.day) == day, col(SpendDay.scope).in_(scopes))).all()
    used = {agent: sum(spent + reserved for scope, spent, reserved in rows if scope == agent),
            GLOBAL: sum(spent + reserved for scope, spent, reserved in rows if scope in FLEET_STRIPES)}
    room = [cap - used[scope] for scope, cap in ((agent, caps.agent), (GLOBAL, caps.fleet)) if cap is not None]
    return min(room) if room else None


def day_rows(session: Session, *, day: str) -> list[SpendDay]:
    """Every scope's row for a day, the fleet's stripes summed into one '*' row (not attached to the session)."""
    rows = list(session.exec(select(SpendDay).where(SpendDay.day == day).order_by(col(SpendDay.scope))))
    stripes = [row for row in rows if row.scope in FLEET_STRIPES]
    agents = [row for row in rows if row.scope not in FLEET_STRIPES]
    if not stripes:
        return agents
    fleet = SpendDay(day=day, scope=GLOBAL, reserved_micros=sum(row.reserved_micros for row in stripes),
                     spent_micros=sum(row.spent_micros for row in stripes), runs=0,
                     updated_at=max(row.updated_at for row in stripes))
    return sorted([fleet, *agents], key=lambda row: row.scope)
