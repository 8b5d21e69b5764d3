"""fleet.ledger on SQLite and PostgreSQL: charges, corrections and settlement keep spent + reserved true."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, delete, event

from fleet import db, ledger
from fleet.keys import GLOBAL
from fleet.models import Run, RunStatus, SpendDay
from tests.harness import lock_waits

NOW = datetime(2026, 12, 1, 12, tzinfo=UTC)
DAY = "2026-12-01"
CAPS = ledger.Caps(agent=1_000_000, fleet=5_000_000)


def reserved_run(engine: Engine, amount: int) -> Run:
    """A running run that reserved `amount` today."""
    with db.session(engine) as session:
        assert ledger.reserve(session, day=DAY, agent="a", amount=amount, caps=CAPS, now=NOW)
        run = Run(id="r" * 32, idem_key="a:k", agent="a", work_key="k", status=RunStatus.RUNNING, budget_day=DAY,
                  reserved_micros=amount, created_at=NOW, updated_at=NOW)
        session.add(run)
        session.commit()
        session.refresh(run)
        session.expunge(run)
    return run


def books(engine: Engine) -> list[tuple[int, int]]:
    """(cost, reserved) of the run, then (spent, reserved) of the agent's and the fleet's rows."""
    with db.session(engine) as session:
        run = session.get(Run, "r" * 32)
        rows = [row for scope in ("a", GLOBAL) if (row := session.get(SpendDay, (DAY, scope))) is not None]
        assert run is not None and len(rows) == 2
        return [(run.cost_micros, run.reserved_micros), *((row.spent_micros, row.reserved_micros) for row in rows)]


def charge(engine: Engine, run: Run, amount: int) -> None:
    with db.session(engine) as session:
        ledger.charge(session, run=run, amount=amount, now=NOW)
        session.commit()


def test_a_correction_takes_spend_back_and_leaves_the_reservation(engine: Engine) -> None:
    """A final total below the running sum: the difference comes off spend, not off what is still reserved."""
    run = reserved_run(engine, 200_000)
    charge(engine, run, 300_000)  # past the reservation: all of it consumed
    assert books(engine) == [(300_000, 0)] * 3
    charge(engine, run, -100_000)
    assert books(engine) == [(200_000, 0)] * 3


def test_a_correction_never_books_below_zero(engine: Engine) -> None:
    run = reserved_run(engine, 200_000)
    charge(engine, run, 50_000)
    assert books(engine) == [(50_000, 150_000)] * 3
    charge(engine, run, -80_000)  # more than was booked: only what was booked comes back
    assert books(engine) == [(0, 150_000)] * 3
    charge(engine, run, -1)
    assert books(engine) == [(0, 150_000)] * 3
    with db.session(engine) as session:
        assert ledger.settle(session, run=run, now=NOW)
        session.commit()
    assert books(engine) == [(0, 0)] * 3


def _reserve_for(engine: Engine, agent: str, amount: int, fleet_cap: int | None) -> bool:
    with db.session(engine) as session:
        ok = ledger.reserve(session, day=DAY, agent=agent, amount=amount, caps=ledger.Caps(agent=None, fleet=fleet_cap),
                            now=NOW)
        session.commit() if ok else session.rollback()
        return ok


def _fleet_used(engine: Engine) -> int:
    with db.session(engine) as session:
        row = session.get(SpendDay, (DAY, GLOBAL))
        return 0 if row is None else row.spent_micros + row.reserved_micros


def test_money_spent_past_a_reservation_closes_the_fleet_to_every_agent(engine: Engine) -> None:
    """A run reserved $0.2 and spent $5 (the fleet's whole cap, charged as it ran: the money is gone): no
    agent may reserve again today. (A review of a striped fleet budget found stripes that kept admitting.)"""
    run = reserved_run(engine, 200_000)
    charge(engine, run, 5_000_000)
    assert _fleet_used(engine) == 5_000_000
    assert not _reserve_for(engine, "b", 100, fleet_cap=5_000_000)


def test_reservations_made_without_a_cap_count_once_a_cap_is_set(engine: Engine) -> None:
    """The fleet ran uncapped for a while, then fleet.toml set a cap: what was reserved meanwhile counts."""
    assert _reserve_for(engine, "a", 100, fleet_cap=1_000)
    assert _reserve_for(engine, "a", 900, fleet_cap=None)
    assert not _reserve_for(engine, "b", 100, fleet_cap=1_000)
    assert _fleet_used(engine) == 1_000


def test_an_orphaned_attempts_spend_is_booked_through_a_database_blip(engine: Engine) -> None:
    """An attempt that lost its run (another owner took it over) still spent what it reported. The booking had
    one try: a database restarting at that moment lost the money from the ledger, and the caps stopped
    counting it. It is retried, as an outcome is, until the database answers (within outcome_retry_s)."""
    from types import SimpleNamespace

    from sqlalchemy import event
    from sqlalchemy.exc import OperationalError

    from fleet import executor

    run = reserved_run(engine, 100_000)
    refusals = [3]  # the first statements the database refuses, as one restarting does

    def restarting(*_args: object) -> None:
        if refusals[0] > 0:
            refusals[0] -= 1
            raise OperationalError("SELECT", None, Exception("the database system is starting up"))

    services = SimpleNamespace(engine=engine, now=lambda: NOW,
                               config=SimpleNamespace(fleet=SimpleNamespace(outcome_retry_s=30.0)))
    event.listen(engine, "before_cursor_execute", restarting)
    try:
        executor._book_orphaned_spend(services, run, 70_000)  # type: ignore[arg-type]
    finally:
        event.remove(engine, "before_cursor_execute", restarting)
    assert refusals == [0], "the blip never reached the booking"
    with db.session(engine) as session:
        fleet_row, agent_row = session.get(SpendDay, (DAY, GLOBAL)), session.get(SpendDay, (DAY, "a"))
    assert fleet_row is not None and fleet_row.spent_micros == 70_000, "the orphaned attempt's spend was lost"
    assert agent_row is not None and agent_row.spent_micros == 70_000
    # A retry whose commit had gone through (its answer lost with the connection) books nothing twice.
    executor._book_orphaned_spend(services, run, 70_000)  # type: ignore[arg-type]
    with db.session(engine) as session:
        again = session.get(SpendDay, (DAY, GLOBAL))
    assert again is not None and again.spent_micros == 70_000, "the orphaned spend was booked twice"


def test_money_at_the_config_limit_fits_the_ledger(engine: Engine) -> None:
    """fleet.toml allows at most MAX_USD per cap or estimate: in micro-dollars that, and sums of it, fit the
    database's signed 64-bit integers (past it every dispatch crashed with OverflowError)."""
    from fleet.config import MAX_USD

    most = ledger.to_micros(MAX_USD)
    assert most is not None
    caps = ledger.Caps(agent=most, fleet=most)
    with db.session(engine) as session:
        assert ledger.reserve(session, day=DAY, agent="a", amount=most, caps=caps, now=NOW)
        assert not ledger.reserve(session, day=DAY, agent="a", amount=most, caps=caps, now=NOW)  # over, not overflow
        session.rollback()
    with db.session(engine) as session:  # no caps at all: a thousand of the largest estimates still fit
        for _ in range(1000):
            assert ledger.reserve(session, day=DAY, agent="a", amount=most, caps=ledger.Caps(None, None), now=NOW)
        session.commit()
        row = session.get(SpendDay, (DAY, GLOBAL))
        assert row is not None and row.reserved_micros == 1000 * most


# ---------------------------------------------------------------- reserve and count: every branch, both databases


def _day_rows(engine: Engine) -> dict[str, tuple[int, int]]:
    with db.session(engine) as session:
        return {row.scope: (row.reserved_micros, row.runs) for row in ledger.day_rows(session, day=DAY)}


def _reserve_counted(engine: Engine, agent: str, amount: int, caps: ledger.Caps, limit: int | None) -> str:
    with db.session(engine) as session:
        answer = ledger.reserve_counted(session, day=DAY, agent=agent, amount=amount, caps=caps, now=NOW,
                                        count=True, limit=limit)
        session.commit() if answer == "ok" else session.rollback()
        return answer


def test_reserve_and_count_takes_both_rows_once_and_refuses_for_the_first_reason(engine: Engine) -> None:
    """The day's first run (no rows), the next (both rows there), a fleet cap that refuses after the agent's row
    was taken, the agent's bound, and a run over both cap and bound (the cap is named, as it is checked first):
    each refusal leaves the rows as they were, and each pass reserves and counts exactly once."""
    caps = ledger.Caps(agent=1_000, fleet=300)
    assert _reserve_counted(engine, "a", 100, caps, limit=2) == "ok"
    assert _day_rows(engine) == {"a": (100, 1), GLOBAL: (100, 0)}
    assert _reserve_counted(engine, "a", 100, caps, limit=2) == "ok"
    assert _day_rows(engine) == {"a": (200, 2), GLOBAL: (200, 0)}
    assert _reserve_counted(engine, "a", 150, caps, limit=None) == "caps"  # the agent's row fits, the fleet's not
    assert _reserve_counted(engine, "b", 200, caps, limit=None) == "caps"  # ... and on a row the day has not made
    assert _reserve_counted(engine, "a", 50, caps, limit=2) == "bounded"
    assert _reserve_counted(engine, "a", 200, caps, limit=2) == "caps"
    assert _day_rows(engine) == {"a": (200, 2), GLOBAL: (200, 0)}
    assert _reserve_counted(engine, "b", 100, caps, limit=None) == "ok"
    assert _day_rows(engine) == {"a": (200, 2), "b": (100, 1), GLOBAL: (300, 0)}


def test_reserve_and_count_makes_a_missing_fleet_row_without_reserving_the_agent_twice(engine: Engine) -> None:
    """The agent's row exists and the fleet's does not (a fleet row purged, or a database edited by hand): the
    agent's part is taken once, the fleet's row is made and taken."""
    assert _reserve_counted(engine, "a", 100, ledger.Caps(None, None), limit=None) == "ok"
    with db.session(engine) as session:
        session.execute(delete(SpendDay).where(SpendDay.scope == GLOBAL))
        session.commit()
    assert _reserve_counted(engine, "a", 100, ledger.Caps(None, 1_000), limit=None) == "ok"
    assert _day_rows(engine) == {"a": (200, 2), GLOBAL: (100, 0)}


def test_settling_on_a_day_without_its_rows_gives_back_nothing_there(engine: Engine) -> None:
    """A run's day rows are gone (purged by hand): settling what it had reserved makes no row of negative
    reservations (it used to make empty rows, then take the reservation off them)."""
    run = reserved_run(engine, 200_000)
    with db.session(engine) as session:
        session.execute(delete(SpendDay))
        session.commit()
    with db.session(engine) as session:
        assert ledger.settle(session, run=run, now=NOW)
        session.commit()
    assert _day_rows(engine) == {}


# ---------------------------------------------------------------- lock order: agent row first, even when it is missing


def test_a_booking_on_a_day_without_the_agents_row_never_deadlocks_with_its_first_reservation(
        engine: Engine) -> None:
    """The agent's day row is gone (purged by hand; the fleet's stays) while the run that reserved on it books what
    it spent, and a new run of the same agent reserves that day (its first reservation now: it makes the agent's
    row). Rows are locked agent first, fleet last, everywhere: the booking must not take the fleet's row before
    the agent's (it would wait on the new agent row while the reservation waits on the fleet's row: a cycle)."""
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite writers are serialised (BEGIN IMMEDIATE): no row locks, no deadlock")
    run = reserved_run(engine, 200_000)
    with db.session(engine) as session:  # the agent's row purged, the fleet's kept
        session.execute(delete(SpendDay).where(SpendDay.scope == "a"))
        session.commit()
    made, go = threading.Event(), threading.Event()
    reserving: list[int] = []
    errors: list[BaseException] = []

    def after_execute(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        # the reservation has just made the agent's row (its upsert), and holds it uncommitted
        if threading.get_ident() in reserving and statement.lstrip().upper().startswith("INSERT INTO SPEND_DAYS"):
            made.set()
            assert go.wait(20), "never let go"

    def reserve() -> None:
        reserving.append(threading.get_ident())
        try:
            with db.session(engine) as session:
                assert ledger.reserve(session, day=DAY, agent="a", amount=100_000, caps=CAPS, now=NOW)
                session.commit()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def book() -> None:
        try:
            charge(engine, run, 50_000)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    event.listen(engine, "after_cursor_execute", after_execute)
    first, second = threading.Thread(target=reserve), threading.Thread(target=book)
    try:
        first.start()
        assert made.wait(20), "the reservation never made the agent's row"
        second.start()
        deadline = time.monotonic() + 20
        while not lock_waits(engine):  # the booking waits on the reservation (the agent's row it is making)
            assert time.monotonic() < deadline and second.is_alive(), "the booking never waited"
            time.sleep(0.02)
        go.set()
        first.join(30)
        second.join(30)
    finally:
        go.set()
        event.remove(engine, "after_cursor_execute", after_execute)
    assert not first.is_alive() and not second.is_alive()
    assert errors == [], f"a transaction failed: {errors!r}"
    # the new reservation on both rows; the booking: 50_000 spent out of its 200_000 reserved (the agent's row
    # came back without the old reservation: it only takes the booking's part off)
    with db.session(engine) as session:
        rows = {row.scope: (row.spent_micros, row.reserved_micros) for row in ledger.day_rows(session, day=DAY)}
    assert rows == {"a": (50_000, 100_000 - 50_000), GLOBAL: (50_000, 200_000 + 100_000 - 50_000)}, rows


@pytest.mark.parametrize(("usd", "shown"), [
    (0.001, "$0.0010"), (0.0125, "$0.0125"), (0.01, "$0.01"), (1.2, "$1.20"), (5.0, "$5.00"), (1234.5678, "$1,234.57"),
    (-0.25, "-$0.25"), (-0.001, "-$0.0010"),
])
def test_small_amounts_are_never_shown_as_zero(usd: float, shown: str) -> None:
    """A $0.001 estimate (the starter's sleeper) read "reserved $0.00" in a dry run, and 0.00 in `fleet agents`,
    as if nothing were reserved: every amount Fleet shows keeps four places below a cent."""
    assert ledger.money(usd) == shown
    assert ledger.amount(abs(usd)) == shown.lstrip("-$")


@pytest.mark.parametrize(("micros", "shown"), [
    (1, "$0.000001"), (10, "$0.000010"), (40, "$0.000040"), (-40, "-$0.000040"),
])
def test_an_amount_the_config_allows_is_never_shown_as_zero_either(micros: int, shown: str) -> None:
    """est_cost_usd may be as small as 0.000001 (one micro-dollar, the ledger's unit; the config check says "at
    least 0.000001"): an estimate below $0.00005 read "reserved $0.0000" in a dry run and in `fleet agents`,
    the very "as if nothing were reserved" that four places were meant to end."""
    assert ledger.money(ledger.to_usd(micros)) == shown
