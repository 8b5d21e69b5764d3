"""Beat at scale: one tick pass over 1,000 scheduled agents, and sweep passes over a big runs table.

    python -m bench.beat [--quick] [--db sqlite,postgresql] [--reps 3]

(a) Tick pass. A fleet.toml with 1,000 agents (`schedule = "every 60s"`, command ["true"]);
    `fleet.ticks.tick(services, agent, send)` for each, in this process, with a real Celery send
    (`send_task("fleet.execute")`) to a private redis-server that no worker consumes. The clock is
    frozen at the start of the pass so every agent is due in the same slot. Timed: the whole pass
    (every agent dispatched), then a second pass in the same slot (every tick a duplicate, as when
    a second beat or a retried tick message fires). The floor is what bare Celery beat does for
    the same schedule: 1,000 `apply_async` messages to the same redis-server.
(b) Sweeps on a big table. 1k, then 10k, then 100k finished runs (realistic statuses and
    timestamps over 30 days across the 1,000 agents, 4 events each, a dead letter per dead run,
    ledger rows per agent and day, today's for every agent from the start) plus 20 live runs
    (running and queued, their leases held, so that the passes look at them and leave them alone).
    At each size, `fleet.sweeps.reap` and `fleet.watchdog.run_watchdog(services, None)` are timed
    (a warm-up pass, then the median of 3).
    Every SQL statement of the passes is timed through engine events; a statement that grows with
    the table is printed with its query plan. PostgreSQL tables are ANALYZEd after each bulk load,
    as autovacuum would; SQLite gets nothing (Fleet never runs ANALYZE there).
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy import text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from bench.common import (
    database,
    log,
    machine_note,
    median,
    parse_args,
    private_redis,
    spread,
    table,
    workdir,
)
from bench.sqltrace import Counts, Tracer, explain

# Imported up front: other people edit the code while benchmarks run, and a module imported late
# could come from a newer tree than the ones imported at start.
from fleet import db
from fleet import watchdog as wd
from fleet.config import Settings, load_fleet_config
from fleet.keys import GLOBAL
from fleet.models import DeadLetter, Run, RunEvent, SpendDay
from fleet.services import build
from fleet.sweeps import reap
from fleet.ticks import tick, tick_many
from fleet.watchdog import run_watchdog

SIZES = (1_000, 10_000, 100_000)
LIVE = 20
TRACED = 5  # passes traced statement by statement at each size; a statement's fastest call is compared
# (status, share of finished runs); failed is what an unstarted run ends as when its agent vanished
STATUS_MIX = (("succeeded", 0.86), ("idle", 0.06), ("archived", 0.03), ("dead", 0.02), ("killed", 0.02),
              ("failed", 0.01))


def agents_toml(count: int) -> str:
    """A fleet.toml with `count` scheduled no-op agents."""
    lines = ['[fleet]\ntimezone = "UTC"\n']
    for i in range(count):
        lines.append(f'[agents.agent-{i:04d}]\ncommand = ["true"]\nschedule = "every 60s"\ntimeout_s = 600\n')
    return "\n".join(lines)


def _services(home: Path, url: str, redis_url: str, agents: int) -> Any:
    config = home / "fleet.toml"
    config.write_text(agents_toml(agents))
    services = build(Settings(config=config, redis_url=redis_url, database_url=url, log_dir=home / "logs"),
                     load_fleet_config(config))
    services.redis.flushdb()
    db.upgrade(services.engine)
    return services


def _celery(redis_url: str) -> Any:
    client = Celery("bench-beat", broker=redis_url)
    client.conf.update(task_serializer="json", accept_content=["json"], broker_connection_retry_on_startup=True)
    return client


# ---------------------------------------------------------------- (a) tick pass


def tick_rep(kind: str, home: Path, redis_url: str, agents: int) -> dict[str, Any]:
    """One pass (all dispatched) and a second pass (all duplicates) on a fresh database."""
    home.mkdir(parents=True)
    celery = _celery(redis_url)

    def send(run_id: str, fence: int) -> None:
        celery.send_task("fleet.execute", args=[run_id, fence], queue="agents", ignore_result=True)

    with database(kind, home) as url:
        services = _services(home, url, redis_url, agents)
        names = list(services.config.agents)
        tracer = Tracer(services.engine)
        try:
            frozen = datetime.now(UTC)
            services.now = lambda: frozen
            tick(services, names[0], send, at=frozen)  # connections and caches warm; this agent is then a duplicate
            out: dict[str, Any] = {}
            for label, expected in (("first", "queued"), ("again", "duplicate")):
                statuses: dict[str, int] = {}
                with tracer.counting() as counts:
                    started = time.perf_counter()
                    for name in names:
                        status = tick(services, name, send, at=frozen).status
                        statuses[status] = statuses.get(status, 0) + 1
                    out[label] = time.perf_counter() - started
                want = {expected: agents} if label == "again" else {"queued": agents - 1, "duplicate": 1}
                if statuses != want:
                    raise RuntimeError(f"{label} tick pass: {statuses}, expected {want}")
                out[f"{label}_counts"] = counts.per(agents)
            out["queue"] = int(services.redis.llen("agents"))
            # The same pass as beat now sends it: one fleet.ticks batch for every agent of the schedule,
            # at the next slot (every key new again), then that slot once more (all duplicates).
            # The first pass's runs end (nobody consumes them here) so every agent's slot is free again.
            later = frozen + timedelta(seconds=60)
            services.now = lambda: later
            with services.engine.begin() as conn:
                conn.execute(text("UPDATE runs SET status = 'succeeded', slot = NULL"))
            services.redis.flushdb()
            for label, expected in (("batch", "queued"), ("batch_again", "duplicate")):
                with tracer.counting() as counts:
                    started = time.perf_counter()
                    answers = tick_many(services, names, send, at=later)
                    out[label] = time.perf_counter() - started
                got: dict[str, int] = {}
                for answer in answers.values():
                    got[answer.status] = got.get(answer.status, 0) + 1
                if got != {expected: agents}:
                    raise RuntimeError(f"{label} tick pass: {got}, expected {expected} for all {agents}")
                out[f"{label}_counts"] = counts.per(agents)
        finally:
            tracer.close()
            services.close()
    return out


def floor_rep(redis_url: str, agents: int) -> float:
    """Bare Celery beat's part of the same schedule: `agents` apply_async messages, nobody consuming."""
    app = Celery("bench-floor", broker=redis_url)
    app.conf.update(task_serializer="json", accept_content=["json"], broker_connection_retry_on_startup=True)

    @app.task(name="bench.floor.tick")
    def floor_tick(agent: str) -> None:
        return None

    floor_tick.apply_async(("warm-up",), queue="floor")
    started = time.perf_counter()
    for i in range(agents):
        floor_tick.apply_async((f"agent-{i:04d}",), queue="floor")
    return time.perf_counter() - started


# ---------------------------------------------------------------- (b) sweeps on a big table


def _finished_rows(count: int, agents: int, now: datetime, rng: random.Random) -> tuple[list[dict[str, Any]], ...]:
    """`count` finished runs with their events, dead letters and (day, agent) pairs."""
    statuses = [s for s, _ in STATUS_MIX]
    weights = [w for _, w in STATUS_MIX]
    runs, events, dead, days = [], [], [], set()
    for _ in range(count):
        run_id = uuid.uuid4().hex
        agent = f"agent-{rng.randrange(agents):04d}"
        status = rng.choices(statuses, weights)[0]
        created = now - timedelta(seconds=rng.uniform(120, 30 * 86400))
        queued = created + timedelta(milliseconds=rng.uniform(5, 50))
        started = None if status == "archived" else queued + timedelta(milliseconds=rng.uniform(10, 2000))
        finished = (started or queued) + timedelta(seconds=rng.uniform(1, 600))
        day = created.date().isoformat()
        cost = rng.randrange(0, 50_000)
        runs.append({
            "id": run_id, "idem_key": f"{agent}:schedule:{created.isoformat(timespec='seconds')}:{run_id[:8]}",
            "agent": agent, "work_key": f"schedule:{created.isoformat(timespec='seconds')}", "status": status,
            "attempt": 2 if status == "dead" else (0 if status == "archived" else 1), "max_attempts": 2,
            "fence": rng.randrange(10**15, 2 * 10**15), "slot": 0, "payload": None, "budget_day": day,
            "reserved_micros": 0, "cost_micros": 0 if status == "archived" else cost,
            "exit_code": {"succeeded": 0, "idle": 3, "dead": 1, "killed": 143, "failed": None}.get(status),
            "error": {"dead": "exit code 1", "killed": "killed", "archived": "stale"}.get(status),
            "host": "bench-host", "pid": None, "pgid": None, "dispatched_by": "beat:bench", "prev_run_id": None,
            "replay_of": None, "created_at": created, "updated_at": finished, "queued_at": queued,
            "started_at": started, "heartbeat_at": started and finished - timedelta(seconds=rng.uniform(0, 5)),
            "finished_at": finished, "retry_at": None, "settled_at": finished})
        kinds = ["run.created", "run.queued"] + ([] if status == "archived" else ["run.started"]) + [f"run.{status}"]
        for n, kind in enumerate(kinds):
            events.append({"at": created + timedelta(milliseconds=10 * n), "kind": kind, "run_id": run_id,
                           "agent": agent, "actor": "beat:bench" if n == 0 else None,
                           "detail": json.dumps({"attempt": 1})})
        if status == "dead":
            dead.append({"run_id": run_id, "agent": agent, "reason": "failed", "attempts": 2, "exit_code": 1,
                         "last_error": "exit code 1", "output_tail": "boom\n" * 20, "created_at": finished,
                         "replayed_run_id": None, "replayed_at": None})
        days.add((day, agent))
    return runs, events, dead, [{"day": d, "scope": a} for d, a in days]


def load(services: Any, count: int, agents: int, rng: random.Random) -> None:
    """Bulk-insert `count` more finished runs (and their events, dead letters, ledger rows)."""
    now = datetime.now(UTC)
    engine = services.engine
    insert = pg_insert if engine.dialect.name == "postgresql" else sqlite_insert
    for start in range(0, count, 10_000):
        runs, events, dead, days = _finished_rows(min(10_000, count - start), agents, now, rng)
        days += [{"day": d["day"], "scope": GLOBAL} for d in days]
        spend = [{**d, "reserved_micros": 0, "spent_micros": rng.randrange(0, 10**6), "updated_at": now}
                 for d in days]
        with engine.begin() as conn:
            conn.execute(Run.__table__.insert(), runs)  # type: ignore[attr-defined]
            conn.execute(RunEvent.__table__.insert(), events)  # type: ignore[attr-defined]
            if dead:
                conn.execute(DeadLetter.__table__.insert(), dead)  # type: ignore[attr-defined]
            conn.execute(insert(SpendDay).on_conflict_do_nothing(), spend)
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("ANALYZE"))
            conn.commit()


def add_live_runs(services: Any, agents: int) -> None:
    """20 unfinished runs the sweeps must look at and leave alone (their leases are held in Redis),
    and today's ledger rows."""
    now = datetime.now(UTC)
    rows = []
    for i in range(LIVE):
        agent = f"agent-{(agents - 1 - i) % agents:04d}"
        run_id = uuid.uuid4().hex
        lease = services.leases.acquire(agent, 1, run_id, ttl_s=3 * 3600)
        if lease is None:
            raise RuntimeError(f"slot of {agent} is taken")
        running = i % 2 == 0
        # Half of each kind look silent (old heartbeat, or queued long ago) but hold their lease.
        age = timedelta(seconds=120 if i % 4 < 2 else 1)
        rows.append({
            "id": run_id, "idem_key": f"{agent}:live-{i}", "agent": agent, "work_key": f"live-{i}",
            "status": "running" if running else "queued", "attempt": 1 if running else 0, "max_attempts": 2,
            "fence": lease.fence, "slot": lease.slot, "budget_day": now.date().isoformat(), "reserved_micros": 0,
            "cost_micros": 0, "host": "another-host", "created_at": now - age, "updated_at": now - age,
            "queued_at": now - age, "started_at": now - age if running else None,
            "heartbeat_at": now - age if running else None, "dispatched_by": "bench"})
    # Today's ledger: every agent of a fleet that ticks every minute has spent something today,
    # whatever the size of its history (so the spend check reads the same rows at every size).
    insert = pg_insert if services.engine.dialect.name == "postgresql" else sqlite_insert
    today = [{"day": now.date().isoformat(), "scope": scope, "reserved_micros": 0, "spent_micros": 1000,
              "updated_at": now} for scope in [GLOBAL, *services.config.agents]]
    with services.engine.begin() as conn:
        conn.execute(Run.__table__.insert(), rows)  # type: ignore[attr-defined]
        conn.execute(insert(SpendDay).on_conflict_do_nothing(), today)


def _timed_passes(fn: Callable[[], Any], reps: int) -> tuple[float, Any]:
    fn()  # warm-up
    times, last = [], None
    for _ in range(reps):
        started = time.perf_counter()
        last = fn()
        times.append(time.perf_counter() - started)
    return median(times), last


def _watchdog_parts(services: Any) -> dict[str, float]:
    """Each part of a watchdog pass on its own, ms."""
    parts: dict[str, Callable[[Any], Any]] = {
        "heal (every lease in one look-up)": lambda _s: wd.heal(services),
        "stuck_check": lambda s: wd.stuck_check(services, s, services.now()),
        "dlq_check": lambda s: wd.dlq_check(s, services.now()),
        "spend_check": lambda s: wd.spend_check(services, s),
        "breaker_check (every breaker in one pipeline)":
            lambda s: wd.breaker_check(services, s, wd.breaker_states(services), services.now()),
        "kill_check": lambda s: wd.kill_check(s),
    }
    out = {}
    for name, part in parts.items():
        times = []
        for _ in range(3):
            with db.session(services.engine) as session:
                started = time.perf_counter()
                part(session)
                times.append(time.perf_counter() - started)
                session.rollback()
        out[name] = 1000 * median(times)
    return out


def sweep_bench(kind: str, home: Path, redis_url: str, sizes: tuple[int, ...], reps: int,
                agents: int) -> dict[str, Any]:
    """Grow the table through `sizes`; time the passes and profile their statements at each size."""
    home.mkdir(parents=True)
    celery = _celery(redis_url)
    sent: list[tuple[str, int]] = []

    def send(run_id: str, fence: int) -> None:
        sent.append((run_id, fence))
        celery.send_task("fleet.execute", args=[run_id, fence], queue="agents", ignore_result=True)

    rng = random.Random(42)
    results: dict[str, Any] = {"sizes": {}, "explain": {}}
    with database(kind, home) as url:
        services = _services(home, url, redis_url, agents)
        tracer = Tracer(services.engine)
        try:
            add_live_runs(services, agents)
            loaded = 0
            for size in sizes:
                log(f"sweeps on {kind}: loading to {size:,} finished runs")
                load(services, size - loaded, agents, rng)
                loaded = size
                log(f"sweeps on {kind}: timing passes at {size:,} rows")
                reaper_s, report = _timed_passes(lambda: reap(services, send), reps)
                if report.counts:
                    raise RuntimeError(f"the reaper changed something: {report.counts}")
                watchdog_s, verdict = _timed_passes(lambda: run_watchdog(services, None), reps)
                with tracer.counting() as reaper_sql:
                    for _ in range(TRACED):
                        reap(services, send)
                with tracer.counting() as watchdog_sql:
                    for _ in range(TRACED):
                        run_watchdog(services, None)
                results["sizes"][size] = {"reaper": reaper_s, "watchdog": watchdog_s,
                                          "reaper_sql": reaper_sql, "watchdog_sql": watchdog_sql,
                                          "parts": _watchdog_parts(services),
                                          "checks": {c.name: c.status for c in verdict.checks}}
            if sent:
                raise RuntimeError(f"the reaper sent {len(sent)} message(s) for runs it should leave alone")
            if kind == "sqlite":
                results["lock_probe"] = lock_probe(services, url)
            results["explain"] = _explain_growers(services, results["sizes"])
            results["plans"] = _plans(services, results["sizes"][max(sizes)])
            with services.engine.connect() as conn:
                results["rows"] = {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one()
                                   for t in ("runs", "run_events", "dead_letters", "spend_days")}
        finally:
            tracer.close()
            services.close()
    return results


def lock_probe(services: Any, url: str, passes: int = 5) -> dict[str, float]:
    """SQLite only: how long another writer waits while a watchdog pass runs.

    Every SQLite transaction in Fleet begins IMMEDIATE (it takes the write lock before its first
    read), so a session that makes Redis round trips inside holds the lock that long. A probe
    thread commits one small row every ~2 ms on its own engine; its commit latency is compared
    between writes that began during a pass and writes that began well outside one.
    """
    writer = db.make_engine(url)
    samples: list[tuple[float, float]] = []
    windows: list[tuple[float, float]] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            began = time.perf_counter()
            with writer.connect() as conn:
                conn.execute(text("INSERT INTO run_events (at, kind) VALUES ('2000-01-01 00:00:00', 'bench.probe')"))
                conn.commit()
            samples.append((began, time.perf_counter() - began))
            time.sleep(0.002)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    time.sleep(0.5)
    for _ in range(passes):
        began = time.perf_counter()
        run_watchdog(services, None)
        windows.append((began, time.perf_counter()))
        time.sleep(0.3)
    stop.set()
    thread.join(10)
    writer.dispose()
    with services.engine.begin() as conn:
        conn.execute(text("DELETE FROM run_events WHERE kind = 'bench.probe'"))
    inside = [took for at, took in samples if any(a <= at <= b for a, b in windows)]
    outside = [took for at, took in samples if not any(a - 0.1 <= at <= b + 0.1 for a, b in windows)]
    return {"pass_ms": 1000 * median([b - a for a, b in windows]),
            "inside_n": len(inside), "inside_p50": 1000 * median(inside), "inside_max": 1000 * max(inside or [0]),
            "outside_n": len(outside), "outside_p50": 1000 * median(outside),
            "outside_max": 1000 * max(outside or [0])}


def _growers(sizes: dict[int, Any]) -> list[tuple[str, str, float, float]]:
    """(pass, SQL, fastest call ms at the smallest size, at the largest) for reads that grew > 3x.

    The fastest of TRACED calls is compared, not the mean: on a loaded machine a single call can
    wait for the CPU, and a scan is slow on every call."""
    small, large = sizes[min(sizes)], sizes[max(sizes)]
    out = []
    for which in ("reaper_sql", "watchdog_sql"):
        a: Counts = small[which]
        b: Counts = large[which]
        for sql, entry in b.by_statement.items():
            if sql.startswith("INSERT"):
                continue  # appends one row: nothing to scan
            fastest_large = 1000 * entry[2]
            base = a.by_statement.get(sql)
            fastest_small = 1000 * base[2] if base else float("nan")
            if fastest_large > 0.3 and (base is None or fastest_large > 3 * fastest_small):
                out.append((which.removesuffix("_sql"), sql, fastest_small, fastest_large))
    return out


def _explain_growers(services: Any, sizes: dict[int, Any]) -> dict[str, Any]:
    out = {}
    large = sizes[max(sizes)]
    for which, sql, per_small, per_large in _growers(sizes):
        params = large[f"{which}_sql"].params.get(sql)
        out[sql] = {"pass": which, "small_ms": per_small, "large_ms": per_large,
                    "plan": explain(services.engine, sql, params)}
    return out


def _plans(services: Any, largest: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(pass, SQL, plan) of every distinct statement both passes ran at the largest size."""
    out = []
    for which in ("reaper_sql", "watchdog_sql"):
        counts: Counts = largest[which]
        for sql in counts.by_statement:
            if sql.startswith(("SELECT", "select")):
                plan = explain(services.engine, sql, counts.params.get(sql))
                out.append((which.removesuffix("_sql"), sql, " | ".join(line.strip() for line in plan)))
    return out


def _short(sql: str) -> str:
    """A SELECT's column list elided: `SELECT … FROM runs WHERE …`."""
    head, sep, tail = sql.partition(" FROM ")
    if sep and head.count(",") > 2:
        head = "SELECT …"
    return f"{head}{sep}{tail}"


# ---------------------------------------------------------------- (c) loading fleet.toml


def config_load(home: Path, counts: list[int], reps: int) -> dict[int, float]:
    """Median seconds to load and validate a fleet.toml of each agent count."""
    home.mkdir(parents=True)
    out = {}
    for count in counts:
        path = home / f"fleet-{count}.toml"
        path.write_text(agents_toml(count))
        times = []
        for _ in range(reps):
            started = time.perf_counter()
            load_fleet_config(path)
            times.append(time.perf_counter() - started)
        out[count] = median(times)
    return out


# ---------------------------------------------------------------- main


def _print_ticks(ticks: dict[str, list[dict[str, Any]]], floors: list[float], agents: int) -> None:
    rows = [["bare Celery beat (floor)", "-", spread([{"t": f} for f in floors], "t", "{:.3f}"),
             f"{1e6 * median(floors) / agents:.0f}", "-", "-", "-"]]
    for kind, reps in ticks.items():
        first = [{"t": r["first"]} for r in reps]
        again = [{"t": r["again"]} for r in reps]
        counts = reps[0]["first_counts"]
        rows.append([f"Fleet tick pass, {kind}", "dispatched", spread(first, "t", "{:.2f}"),
                     f"{1e6 * median([r['first'] for r in reps]) / agents:.0f}",
                     f"{median([r['first'] for r in reps]) / median(floors):.0f}x",
                     f"{counts['write_commits']:.1f}", f"{counts['checkouts']:.1f}"])
        counts = reps[0]["again_counts"]
        rows.append([f"Fleet tick pass, {kind}", "all duplicates", spread(again, "t", "{:.2f}"),
                     f"{1e6 * median([r['again'] for r in reps]) / agents:.0f}",
                     f"{median([r['again'] for r in reps]) / median(floors):.0f}x",
                     f"{counts['write_commits']:.1f}", f"{counts['checkouts']:.1f}"])
        for label, outcome in (("batch", "dispatched"), ("batch_again", "all duplicates")):
            counts = reps[0][f"{label}_counts"]
            times = [r[label] for r in reps]
            rows.append([f"Fleet batch pass (fleet.ticks), {kind}", outcome, spread([{"t": t} for t in times], "t",
                                                                                   "{:.2f}"),
                         f"{1e6 * median(times) / agents:.0f}", f"{median(times) / median(floors):.1f}x",
                         f"{counts['write_commits']:.3f}", f"{counts['checkouts']:.3f}"])
    table(f"(a) one tick pass over {agents} due agents (real send to Redis, no consumer)",
          ["what", "outcome", "pass s", "µs per agent", "vs floor", "commits that wrote / tick",
           "connection checkouts / tick"], rows)


def _print_sweeps(sweeps: dict[str, dict[str, Any]]) -> None:
    rows = []
    for kind, res in sweeps.items():
        sizes = res["sizes"]
        for name in ("reaper", "watchdog"):
            times = [1000 * sizes[s][name] for s in sizes]
            # The SQL floor of a pass: each statement's fastest call times its calls per pass.
            sql = [1000 * sum(e[0] * e[2] for e in sizes[s][f"{name}_sql"].by_statement.values()) / TRACED
                   for s in sizes]
            rows.append([kind, name, *[f"{t:.1f} ({q:.2f})" for t, q in zip(times, sql, strict=True)],
                         f"{times[-1] / times[0]:.2f} ({sql[-1] / sql[0]:.2f})",
                         f"{sizes[max(sizes)][f'{name}_sql'].statements / TRACED:.0f}"])
    sizes_ = list(next(iter(sweeps.values()))["sizes"])
    table(f"(b) sweep pass time, ms: whole pass, median of 3 (its SQL alone: each statement's fastest "
          f"of {TRACED} traced passes)",
          ["DB", "pass", *[f"{s:,} runs" for s in sizes_], "largest / smallest", "SQL statements per pass"], rows)
    parts_rows = []
    for kind, res in sweeps.items():
        sizes = res["sizes"]
        for part in sizes[min(sizes)]["parts"]:
            parts_rows.append([kind, part, *[f"{sizes[s]['parts'][part]:.1f}" for s in sizes]])
    table("(b) watchdog pass by part (median of 3, ms)", ["DB", "part", *[f"{s:,} runs" for s in sizes_]],
          parts_rows)
    probe = sweeps.get("sqlite", {}).get("lock_probe")
    if probe:
        table(f"(b) SQLite: another writer's commit during a watchdog pass at {max(sweeps['sqlite']['sizes']):,} runs "
              f"(pass p50 {probe['pass_ms']:.0f} ms)",
              ["probe commits that began", "count", "p50 ms", "max ms"],
              [[label, probe[f"{key}_n"], f"{probe[f'{key}_p50']:.1f}", f"{probe[f'{key}_max']:.1f}"]
               for label, key in (("during a watchdog pass", "inside"), ("outside any pass", "outside"))])
    for kind, res in sweeps.items():
        print(f"\n{kind}: rows at the end: {res['rows']}")
        if not res["explain"]:
            print(f"{kind}: no statement of either pass grew more than 3x from the smallest to the largest table")
        print(f"\n{kind}: query plan of every distinct SELECT of both passes at {max(res['sizes']):,} runs:")
        for which, sql, plan in res["plans"]:
            print(f"  [{which}] {_short(sql)}\n      -> {plan}")
        for sql, info in res["explain"].items():
            print(f"\n{kind}: {info['pass']} statement grew from {info['small_ms']:.2f} ms to "
                  f"{info['large_ms']:.2f} ms (fastest of {TRACED} calls):\n  {sql}\n  plan:")
            for line in info["plan"]:
                print(f"    {line}")


def main() -> None:
    """(a) then (b) on every database asked for; print the tables."""
    args = parse_args("Fleet beat at scale: a tick pass over 1,000 agents; reaper and watchdog on 100k runs")
    reps = args.reps or (1 if args.quick else 3)
    agents = 100 if args.quick else 1000
    sizes = SIZES[:2] if args.quick else SIZES
    began = time.monotonic()
    ticks: dict[str, list[dict[str, Any]]] = {kind: [] for kind in args.kinds}
    floors: list[float] = []
    sweeps: dict[str, dict[str, Any]] = {}
    with workdir("beat") as tmp, private_redis(tmp) as redis:
        base = redis.url.rsplit("/", 1)[0]
        for rep in range(reps):
            log(f"rep {rep + 1}/{reps}: bare Celery floor, {agents} apply_async")
            floors.append(floor_rep(f"{base}/1", agents))
            for kind in args.kinds:
                log(f"rep {rep + 1}/{reps}: Fleet tick pass on {kind}, {agents} agents")
                ticks[kind].append(tick_rep(kind, tmp / f"tick-{kind}-{rep}", f"{base}/0", agents))
        for kind in args.kinds:
            sweeps[kind] = sweep_bench(kind, tmp / f"sweep-{kind}", f"{base}/2", sizes, 3, 1000)
        log("loading fleet.toml files of 100 to 1,000 agents")
        loads = config_load(tmp / "config", [100, 300] if args.quick else [100, 300, 1000], 3)
    print(f"\nbench.beat: {reps} repetition(s) of (a), medians (min..max); {machine_note()}; "
          f"took {time.monotonic() - began:.0f} s")
    _print_ticks(ticks, floors, agents)
    _print_sweeps(sweeps)
    base = min(loads)
    table("(c) load_fleet_config (parse + validate), median of 3",
          ["agents", "seconds", "ms per agent", f"vs {base} agents"],
          [[n, f"{t:.3f}", f"{1000 * t / n:.2f}", f"{t / loads[base]:.0f}x"] for n, t in loads.items()])


if __name__ == "__main__":
    main()
