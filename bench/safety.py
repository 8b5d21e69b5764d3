"""The safety rails under load: kill latency, and spend reservations under maximum contention.

    python -m bench.safety [--quick] [--db sqlite,postgresql] [--reps 3]

(a) Kill latency. A real fleet (2 worker nodes x 26 pool processes) runs K sleeping agents
    (`python -m fleet.examples.sleeper 120 --pidfile F`, concurrency 100). Once every pid is in F,
    `killswitch.engage(...)` (global) is called and each agent's pid is polled in /proc every ~5 ms;
    an agent's latency is from the start of the engage call to the moment its pid is gone (a zombie
    counts as gone). p50 and max per repetition, for K = 10 and 50; the switch is released after.
    Fleet's own settings are the defaults: kill_poll_s = 0.2 s, kill_grace_s = 5 s (the sleeper
    obeys SIGTERM). There is no Celery baseline: Celery's revoke(terminate=True) kills the pool
    process and leaves the agent subprocess running (FACTS.md: 6 of 6 orphaned), so the bare
    Celery latency is "never".
(b) Reservation throughput. P processes (1, then 8) each call `ledger.reserve` (1 micro-dollar,
    caps high enough never to refuse) in its own transaction, commit, and repeat for a fixed time:
    all for one agent (two hot rows, the agent's and the fleet's), or each process for its own agent
    (the fleet-wide figure: only the fleet's row is shared). Total reservations/s and per-reservation
    latency; afterwards the ledger rows must equal the number of reservations made, to the micro-dollar.
    Beside each case, the same in the same run through the bare driver (psycopg / sqlite3, no SQLAlchemy,
    no Fleet): the SQL Fleet sends (SQLite: two guarded UPDATEs; PostgreSQL: ledger's one statement over
    both rows) and COMMIT, with Fleet's durability settings. It is the floor of a reservation that is exact
    under race: what the database and its driver cost, before Fleet.
"""

from __future__ import annotations

import multiprocessing
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url
from sqlmodel import select

from bench.common import (
    database,
    log,
    machine_note,
    med_of,
    parse_args,
    pct,
    private_redis,
    spread,
    table,
    wait_until,
    workdir,
)

# Imported up front: other people edit the code while benchmarks run, and a module imported late
# could come from a newer tree than the ones imported at start.
from fleet import db, keys, killswitch, ledger
from fleet.dispatch import DispatchRequest, dispatch
from fleet.keys import GLOBAL
from fleet.models import Run
from tests.harness import Fleet

SLEEPER_AGENTS = """
[fleet]
timezone = "UTC"

[agents.sleeper]
command = ["python", "-m", "fleet.examples.sleeper", "120", "--pidfile", "{tmp}/sleeper.pids"]
concurrency = 100
timeout_s = 300
"""

HUGE_CAP = 10**15  # micro-dollars: never refuses


# ---------------------------------------------------------------- (a) kill latency


def _alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (a pid that vanishes mid-read is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
    except OSError:  # FileNotFoundError, or ProcessLookupError when it exits between open and read
        return False


def _pids(pidfile: Path) -> list[int]:
    if not pidfile.exists():
        return []
    return [int(line.split()[0]) for line in pidfile.read_text().splitlines() if line.strip()]


def kill_rep(fleet: Any, agents: int, tag: str) -> dict[str, Any]:
    """Start `agents` sleepers, engage the global kill, time each pid's end, release."""
    services = fleet.services
    pidfile = fleet.tmp / "sleeper.pids"
    pidfile.unlink(missing_ok=True)
    run_ids = []
    for i in range(agents):
        result = dispatch(services, DispatchRequest("sleeper", f"{tag}-{i}", actor="bench"), fleet.send_execute)
        if result.status != "queued":
            raise RuntimeError(f"dispatch of sleeper {i} was {result.status}: {result.reason}")
        run_ids.append(result.run_id)
    wait_until(lambda: len(_pids(pidfile)) == agents, 300, f"{agents} sleepers to write their pids", 0.1)
    pids = _pids(pidfile)
    if not all(_alive(p) for p in pids):
        raise RuntimeError("a sleeper died before the kill")
    time.sleep(0.5)  # every executor is in its watch loop
    gone: dict[int, float] = {}
    started = time.monotonic()
    killswitch.engage(services.engine, services.redis, scope=keys.GLOBAL, reason="bench", actor="bench",
                      hard=False, now=services.now())
    engaged = time.monotonic() - started
    try:
        deadline = started + 30
        while len(gone) < len(pids) and time.monotonic() < deadline:
            for pid in pids:
                if pid not in gone and not _alive(pid):
                    gone[pid] = time.monotonic() - started
            time.sleep(0.005)
        if len(gone) < len(pids):
            raise RuntimeError(f"{len(pids) - len(gone)} agent(s) still alive 30 s after the kill")

        def all_killed() -> bool:
            with db.session(services.engine) as session:
                statuses = {r.status for r in session.exec(select(Run).where(Run.id.in_(run_ids)))}  # type: ignore[union-attr]
                session.rollback()
            return statuses == {"killed"}

        wait_until(all_killed, 60, "every run to be recorded as killed", 0.1)
    finally:
        killswitch.release(services.engine, services.redis, scope=keys.GLOBAL, actor="bench", now=services.now())
    latencies = list(gone.values())
    return {"p50": 1000 * pct(latencies, 50), "max": 1000 * max(latencies), "engage": 1000 * engaged}


def kill_bench(kind: str, home: Path, redis_url: str, sizes: list[int], reps: int, procs: tuple[int, int]
               ) -> dict[int, list[dict[str, Any]]]:
    """One fleet on a fresh database; every size `reps` times, interleaved."""
    home.mkdir(parents=True)
    out: dict[int, list[dict[str, Any]]] = {size: [] for size in sizes}
    with database(kind, home) as url:
        fleet = Fleet(home, redis_url, url, agents=SLEEPER_AGENTS)
        try:
            fleet.start(workers=procs[0], concurrency=procs[1])
            for rep in range(reps):
                for size in sizes:
                    log(f"kill latency on {kind}: {size} agents, rep {rep + 1}/{reps}")
                    out[size].append(kill_rep(fleet, size, f"r{rep}-k{size}"))
        finally:
            fleet.stop()
    return out


# ---------------------------------------------------------------- (b) reservations


def _reserver(url: str, day: str, agent: str, duration: float, go: Any, start_at: Any, ready: Any, out: Any,
              raw: bool) -> None:
    """One contending process: reserve 1 micro-dollar per transaction until the time is up; `raw`: the same
    SQL and COMMIT through the bare driver (no SQLAlchemy, no Fleet), the floor of the design."""
    engine = db.make_engine(url)
    caps = ledger.Caps(agent=HUGE_CAP, fleet=HUGE_CAP)
    reserve_once = _raw_reserver(url, day, agent) if raw else None
    with engine.connect():
        pass  # connected before the start line
    ready.put(True)
    go.wait()
    while time.time() < start_at.value:
        time.sleep(0.0005)
    end = start_at.value + duration
    latencies = []
    while True:
        began = time.perf_counter()
        if time.time() >= end:
            break
        if reserve_once is not None:
            reserve_once()
        else:
            with db.session(engine) as session:
                if not ledger.reserve(session, day=day, agent=agent, amount=1, caps=caps, now=datetime.now(UTC)):
                    raise RuntimeError("a reservation was refused under a cap that cannot be reached")
                session.commit()
        latencies.append(time.perf_counter() - began)
    engine.dispose()
    out.put({"agent": agent, "count": len(latencies), "latencies": latencies})


_RAW_RESERVE = ("UPDATE spend_days SET reserved_micros = reserved_micros + {p}, updated_at = {p} "
                "WHERE day = {p} AND scope = {p} AND spent_micros + reserved_micros + {p} <= {p}")


def _raw_reserver(url: str, day: str, agent: str) -> Callable[[], None]:
    """One reservation through a driver connection of its own, with Fleet's durability settings, in the SQL
    Fleet sends: on SQLite (WAL, synchronous=FULL, BEGIN IMMEDIATE) the agent's row, then the fleet's, each
    guarded by its cap, then COMMIT; on PostgreSQL both rows in ledger's one statement, then COMMIT."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        conn: Any = sqlite3.connect(parsed.database or "", isolation_level=None, timeout=10)
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "busy_timeout=10000"):
            conn.execute(f"PRAGMA {pragma}")

        def reserve_once() -> None:
            now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
            cursor = conn.cursor()
            cursor.execute("BEGIN IMMEDIATE")
            for scope in (agent, GLOBAL):
                cursor.execute(_RAW_RESERVE.format(p="?"), (1, now, day, scope, 1, HUGE_CAP))
                if cursor.rowcount != 1:
                    raise RuntimeError("a raw reservation was refused under a cap that cannot be reached")
            cursor.execute("COMMIT")
        return reserve_once
    import psycopg

    conn = psycopg.connect(parsed.set(drivername="postgresql").render_as_string(hide_password=False))
    # ledger's own statement, in the driver's parameter style
    both = re.sub(r":(\w+)", r"%(\1)s", ledger._reserve_both(True, True, False, False).text)

    def reserve_both() -> None:
        cursor = conn.cursor()
        cursor.execute(both, {"amount": 1, "now": datetime.now(UTC), "day": day, "scope": agent,
                              "agent_cap": HUGE_CAP, "fleet_cap": HUGE_CAP})
        if cursor.fetchone() != (1, 1):
            raise RuntimeError("a raw reservation was refused under a cap that cannot be reached")
        conn.commit()
    return reserve_both


def reserve_rep(url: str, processes: int, duration: float, spread: bool, raw: bool = False) -> dict[str, Any]:
    """`processes` reservers for `duration` seconds, on one agent or (`spread`) one each; checks the ledger."""
    engine = db.make_engine(url)
    agents = [f"agent-{i}" if spread else "hot" for i in range(processes)]
    with db.session(engine) as session:
        day = ledger.budget_day(session, "UTC")
        for agent in agents:  # the day's rows exist before the start line (raw reservers do not make them)
            ledger.reserve(session, day=day, agent=agent, amount=0, caps=ledger.Caps(None, None),
                           now=datetime.now(UTC))
        session.commit()
        before = {row.scope: row.reserved_micros for row in ledger.day_rows(session, day=day)}
        session.rollback()
    ctx = multiprocessing.get_context("spawn")
    out, ready, go, start_at = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0)
    workers = [ctx.Process(target=_reserver, args=(url, day, agent, duration, go, start_at, ready, out, raw))
               for agent in agents]
    for proc in workers:
        proc.start()
    for _ in workers:  # a start line: every process has imported and connected
        ready.get(timeout=120)
    start_at.value = time.time() + 0.1
    go.set()
    results = [out.get(timeout=duration + 120) for _ in workers]
    for proc in workers:
        proc.join(30)
    total = sum(r["count"] for r in results)
    with db.session(engine) as session:
        after = {row.scope: row.reserved_micros for row in ledger.day_rows(session, day=day)}
        session.rollback()
    engine.dispose()
    made: Counter[str] = Counter()
    for result in results:
        made[result["agent"]] += result["count"]
    for scope, count in [*made.items(), (GLOBAL, total)]:
        if after[scope] - before.get(scope, 0) != count:
            raise RuntimeError(f"ledger row {scope!r} does not add up: {after[scope] - before.get(scope, 0)} "
                               f"reserved, {count} reservations made")
    latencies = [x for r in results for x in r["latencies"]]
    return {"rate": total / duration, "p50": 1000 * pct(latencies, 50), "p99": 1000 * pct(latencies, 99),
            "total": total}


Case = tuple[int, bool, bool]  # (processes, one agent each, through the bare driver)


def reserve_bench(kind: str, home: Path, cases: list[Case], duration: float, reps: int
                  ) -> dict[Case, list[dict[str, Any]]]:
    """Every case `reps` times, interleaved, on one fresh, migrated database."""
    home.mkdir(parents=True)
    out: dict[Case, list[dict[str, Any]]] = {case: [] for case in cases}
    with database(kind, home) as url:
        engine = db.make_engine(url)
        db.upgrade(engine)
        engine.dispose()
        for rep in range(reps):
            for n, spread_, raw in cases:
                log(f"reservations on {kind}: {n} process(es), {'an agent each' if spread_ else 'one agent'}, "
                    f"{'bare driver' if raw else 'ledger.reserve'}, rep {rep + 1}/{reps}")
                out[(n, spread_, raw)].append(reserve_rep(url, n, duration, spread_, raw))
    return out


# ---------------------------------------------------------------- main


def main() -> None:
    """(a) then (b), each on every database asked for; print the tables."""
    args = parse_args("Fleet safety rails: kill latency and reservation throughput under contention",
                      extra=lambda parser: parser.add_argument("--reservations-only", action="store_true",
                                                               help="skip (a), the kill latency"))
    reps = args.reps or (1 if args.quick else 3)
    sizes = [10] if args.quick else [10, 50]
    procs = (2, 6) if args.quick else (2, 26)
    duration = 1.0 if args.quick else 5.0
    kill_kinds = [] if args.reservations_only else args.kinds[:1] if args.quick else args.kinds
    began = time.monotonic()
    kills: dict[str, dict[int, list[dict[str, Any]]]] = {}
    reservations: dict[str, dict[Case, list[dict[str, Any]]]] = {}
    with workdir("safety") as tmp:
        with private_redis(tmp) as redis:
            for kind in kill_kinds:
                kills[kind] = kill_bench(kind, tmp / f"kill-{kind}", redis.url, sizes, reps, procs)
        for kind in args.kinds:
            shapes = [(8, False), (8, True)] if args.quick else [(1, False), (8, False), (8, True)]
            cases: list[Case] = [(n, spread_, raw) for n, spread_ in shapes for raw in (True, False)]
            reservations[kind] = reserve_bench(kind, tmp / f"reserve-{kind}", cases, duration, reps)
    print(f"\nbench.safety: {reps} repetition(s), medians (min..max); {machine_note()}; "
          f"took {time.monotonic() - began:.0f} s")
    rows = []
    for kind, by_size in kills.items():
        for size, reps_ in by_size.items():
            rows.append([kind, size, f"{procs[0]} x {procs[1]}", spread(reps_, "p50", "{:.0f}"),
                         spread(reps_, "max", "{:.0f}"), spread(reps_, "engage", "{:.1f}"),
                         "never (agents orphaned, FACTS.md)"])
    table("(a) kill latency: engage() to agent pid gone, ms (kill_poll_s 0.2, kill_grace_s 5)",
          ["DB", "running agents", "workers x processes", "p50 ms", "max ms", "engage() call ms",
           "bare Celery revoke(terminate)"], rows)
    rows = []
    for kind, by_case in reservations.items():
        for (count, spread_, raw), reps_ in by_case.items():
            rows.append([kind, "bare driver (the same SQL)" if raw else "Fleet's ledger.reserve", count,
                         "one each" if spread_ else "one (hot row)", spread(reps_, "rate", "{:.0f}"),
                         f"{med_of(reps_, 'p50'):.2f}", f"{med_of(reps_, 'p99'):.2f}"])
    table(f"(b) ledger.reserve under the fleet's cap, {duration:.0f} s per run, exact (checked after each run)",
          ["DB", "through", "processes", "agents", "reservations/s (total)", "latency p50 ms", "latency p99 ms"],
          rows)


if __name__ == "__main__":
    main()
