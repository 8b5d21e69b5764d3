"""fleet.ledger on SQLite and PostgreSQL: charges, corrections and settlement keep spent + reserved true."""

from __future__ import annotations

import multiprocessing
from datetime import UTC, datetime
from multiprocessing.synchronize import Barrier

from sqlalchemy import Engine
from sqlmodel import col, select

from fleet import db, ledger
from fleet.keys import GLOBAL
from fleet.models import Run, RunStatus, SpendDay

NOW = datetime(2026, 12, 1, 12, tzinfo=UTC)
DAY = "2026-12-01"
CAPS = ledger.Caps(agent=1_000_000, fleet=5_000_000)


def reserved_run(engine: Engine, amount: int) -> Run:
    """A running run that reserved `amount` today."""
    with db.session(engine) as session:
        assert ledger.reserve(session, day=DAY, agent="a", run_id="r" * 32, amount=amount, caps=CAPS, now=NOW)
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
        view = {row.scope: row for row in ledger.day_rows(session, day=DAY)}
        rows = [view[scope] for scope in ("a", GLOBAL) if scope in view]
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


# ---------------------------------------------------------------- the fleet's stripes

def _reserve(engine: Engine, run_id: str, amount: int, fleet_cap: int | None, agent: str = "a") -> bool:
    with db.session(engine) as session:
        ok = ledger.reserve(session, day=DAY, agent=agent, run_id=run_id, amount=amount,
                            caps=ledger.Caps(agent=None, fleet=fleet_cap), now=NOW)
        session.commit() if ok else session.rollback()
        return ok


def _fleet_reserved(engine: Engine) -> int:
    with db.session(engine) as session:
        view = {row.scope: row for row in ledger.day_rows(session, day=DAY)}
        return view[GLOBAL].reserved_micros if GLOBAL in view else 0


def _allotments(engine: Engine) -> dict[str, tuple[int | None, int | None]]:
    with db.session(engine) as session:
        rows = session.exec(select(SpendDay).where(SpendDay.day == DAY, col(SpendDay.scope).in_(ledger.FLEET_STRIPES)))
        return {row.scope: (row.allot_micros, row.cap_micros) for row in rows}


def _ids_on(stripe: str, count: int) -> list[str]:
    """`count` run ids whose share of the fleet budget lives on `stripe`."""
    found = []
    for i in range(100_000):
        run_id = f"{i:032d}"
        if ledger.stripe_of(run_id) == stripe:
            found.append(run_id)
            if len(found) == count:
                return found
    raise AssertionError("no such ids")


def test_the_fleet_refuses_exactly_at_its_cap_whichever_stripes_the_runs_fall_on(engine: Engine) -> None:
    """One stripe takes every run (its allotment runs out long before the cap): it borrows the others' room
    under their locks, and the fleet refuses only the reservation that would pass the cap."""
    ids = _ids_on(ledger.FLEET_STRIPES[3], 11)
    assert [_reserve(engine, run_id, 100, fleet_cap=1_000, agent=f"a{i}") for i, run_id in enumerate(ids)] == (
        [True] * 10 + [False])
    assert _fleet_reserved(engine) == 1_000
    shares = _allotments(engine)
    assert sum(allot or 0 for allot, _ in shares.values()) == 1_000, shares  # the allotments add up to the cap


def test_the_allotments_follow_a_changed_fleet_cap(engine: Engine) -> None:
    """Raised from $0.0005 to $0.001 (fleet.toml edited): the stripes' allotments were shared out for the
    old cap, so the next reservation shares them out for the new one, and the room is the new cap's."""
    ids = [f"{i:032d}" for i in range(12)]
    assert [_reserve(engine, run_id, 100, fleet_cap=500) for run_id in ids[:6]] == [True] * 5 + [False]
    assert [_reserve(engine, run_id, 100, fleet_cap=1_000) for run_id in ids[6:]] == [True] * 5 + [False]
    assert _fleet_reserved(engine) == 1_000
    assert {cap for _, cap in _allotments(engine).values()} == {1_000}
    assert _reserve(engine, "f" * 32, 100, fleet_cap=None)  # no cap: nothing refuses, the stripes still count
    assert _fleet_reserved(engine) == 1_100


def test_settling_gives_the_room_back_to_the_fleet(engine: Engine) -> None:
    """A run's unspent reservation returns to its own stripe, where the next run on it finds the room."""
    run = reserved_run(engine, 200_000)  # agent cap 1,000,000 and fleet cap 5,000,000 (CAPS)
    charge(engine, run, 50_000)
    with db.session(engine) as session:
        assert ledger.settle(session, run=run, now=NOW)
        session.commit()
    assert books(engine) == [(50_000, 0), (50_000, 0), (50_000, 0)]
    with db.session(engine) as session:
        assert ledger.headroom(session, day=DAY, agent="a", caps=CAPS) == 1_000_000 - 50_000


def _race(url: str, run_ids: list[str], cap: int, barrier: Barrier) -> None:
    engine = db.make_engine(url)
    barrier.wait()
    for i, run_id in enumerate(run_ids):
        _reserve(engine, run_id, 7, fleet_cap=cap, agent=f"{run_id[-4:]}-{i}")
    engine.dispose()


def test_concurrent_reservations_across_stripes_stop_exactly_at_the_cap(database_url: str, engine: Engine) -> None:
    """Eight processes, 40 runs each spread over every stripe, a fleet cap of 100 runs' worth: fast paths,
    rebalances and refusals interleave, and the fleet ends exactly at the cap (100 x 7 micro-dollars)."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(8)
    procs = [ctx.Process(target=_race, args=(database_url, [f"{p:02d}{i:030d}" for i in range(40)], 700, barrier))
             for p in range(8)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    assert _fleet_reserved(engine) == 700
    assert sum(allot or 0 for allot, _ in _allotments(engine).values()) == 700
