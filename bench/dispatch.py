"""Dispatch-to-finish throughput and dispatch-to-running latency of a no-op agent, Fleet versus bare Celery.

    python -m bench.dispatch [--quick] [--db sqlite,postgresql] [--reps 3]

Fleet: an agent `noop` (command ["true"]); N runs with distinct work keys dispatched one after the
other from this process (`fleet.dispatch.dispatch` with a `send_task("fleet.execute")` sender, as in
tests/harness.py) to one real worker (prefork -c 2, -O fair, Fleet's own Celery settings).
Bare Celery: bench/bare_app.py, a task running `subprocess.run(["true"])` with the same worker
settings on the same private redis-server; N fire-and-forget sends, then every result.

Figures per repetition (tables show the median of the repetitions, with min..max):
- throughput: N / (last run finished - first dispatch call started), from the run rows (Fleet) or
  the tasks' own end times (bare), so polling granularity does not count;
- producer rate: N / time spent in the N dispatch (or send) calls alone: the producer's ceiling;
- consumer (drain) rate: D runs queued while no worker runs, then drained by a fresh worker:
  D / (last finished - first started): the worker side's ceiling;
- burst latency: per run, its start (`started_at`, or the task's first line) minus the start of
  the call that dispatched it, while the rest of the burst queues up too;
- isolated latency: the same with one run at a time (each waits for the previous one to finish), and
  by part: the dispatch up to its send, the send call, and from the send to the claim starting;
- commits per run (PostgreSQL): pg_stat_database.xact_commit of the benchmark's own database
  before and after the burst, with every connection closed so the counters are flushed;
- events per run: run_events rows per run (a proxy on SQLite, which keeps no commit counter);
- the beat path: N agents sharing one schedule, ticked by one `fleet.ticks` message (as beat sends it),
  dispatched in one batch (fleet/bulk.py): N / (last run finished - the send), beside bare Celery's N tasks.
Then, in this process without Celery, runs are dispatched and executed one at a time with
SQLAlchemy engine events counting each side's transactions (the same count on SQLite and
PostgreSQL), and each step of the dispatch and the executor is timed; last, one dispatch is timed with
0 to 600 of the agent's runs queued ahead of it (none executed), where a cost per live run would show.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, text

from bench.common import (
    database,
    epoch,
    log,
    machine_note,
    med_of,
    parse_args,
    pct,
    pg_backends,
    pg_commits,
    private_redis,
    spread,
    start_bare_worker,
    stop_group,
    table,
    wait_until,
    workdir,
)
from bench.redistrace import RoundTrips
from bench.sqltrace import Counts, Tracer

# Everything imported up front: other people edit the code while benchmarks run, and a module
# imported late could come from a newer tree than the ones imported at start.
from fleet import db, executor
from fleet import dispatch as dispatching
from fleet.config import Settings, load_fleet_config
from fleet.dispatch import DispatchRequest, dispatch
from fleet.services import build
from tests.harness import Fleet

NOOP_AGENTS = """
[fleet]
timezone = "UTC"

[agents.noop]
command = ["true"]
concurrency = 1000
timeout_s = 60
"""

# The floor of Fleet's design: bare Celery with the events Fleet's workers send, and a run made of two
# messages (the dispatch, then the execute) for throughput, of one for the in-process dispatch's latency.
_HOP = "bare Celery with Fleet's events: 2 messages per run (throughput), 1 (isolated latency)"

_PARTS = ("dispatch", "send", "hop")  # of an isolated run's latency: the transaction, the send, the message

BEAT_AGENT = 'command = ["true"]\nschedule = "every 3600s"\ntimeout_s = 60\n'


def _fleet_toml(beat_agents: int) -> str:
    """The noop agent, and the agents that share one schedule for the beat path."""
    return NOOP_AGENTS + "".join(f"\n[agents.beat-{i:04}]\n{BEAT_AGENT}" for i in range(beat_agents))


_TERMINAL_SQL = "('succeeded','idle','failed','killed','archived','dead')"


# ---------------------------------------------------------------- Fleet


def _reader(url: str) -> Engine:
    """A plain engine for polling: no BEGIN IMMEDIATE, so it never takes SQLite's write lock."""
    return create_engine(url)


def _terminal_count(reader: Engine, actor: str) -> int:
    with reader.connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM runs WHERE dispatched_by = :a AND status IN "
                                     f"{_TERMINAL_SQL}"), {"a": actor}).scalar_one())


def _rows(reader: Engine, actor: str) -> list[Any]:
    with reader.connect() as conn:
        return list(conn.execute(text("SELECT id, status, started_at, finished_at FROM runs "
                                      "WHERE dispatched_by = :a"), {"a": actor}))


def _events_per_run(reader: Engine, actor: str) -> float:
    with reader.connect() as conn:
        runs = conn.execute(text("SELECT count(*) FROM runs WHERE dispatched_by = :a"), {"a": actor}).scalar_one()
        events = conn.execute(text("SELECT count(*) FROM run_events WHERE run_id IN "
                                   "(SELECT id FROM runs WHERE dispatched_by = :a)"), {"a": actor}).scalar_one()
    return float(events / runs) if runs else float("nan")


def _close_all(fleet: Any, reader: Engine, pg_url: str | None) -> None:
    """Stop the workers and close our connections (PostgreSQL flushes a backend's counters as it exits)."""
    for proc in list(fleet.workers):
        fleet.stop_worker(proc)
    fleet.services.engine.dispose()
    reader.dispose()
    if pg_url is not None:
        wait_until(lambda: pg_backends(pg_url) == 0, 30, "every connection to the benchmark database to close", 0.05)


def _as_epoch(value: Any) -> float:
    if isinstance(value, str):  # SQLite through a plain engine hands timestamps back as text
        value = datetime.fromisoformat(value)
    return epoch(value)


def _fleet_burst(fleet: Any, n: int, actor: str) -> tuple[dict[str, float], list[float], float]:
    """N dispatches one after the other: when each call began, how long each took, when the first began."""
    sent_at: dict[str, float] = {}
    called: list[float] = []
    statuses: dict[str, int] = {}
    first = time.time()
    for i in range(n):
        at = time.time()
        result = dispatch(fleet.services, DispatchRequest("noop", f"{actor}-{i}", actor=actor), fleet.send_execute)
        called.append(time.time() - at)
        statuses[result.status] = statuses.get(result.status, 0) + 1
        sent_at[str(result.run_id)] = at
    if statuses != {"queued": n}:
        raise RuntimeError(f"not every dispatch was queued: {statuses}")
    return sent_at, called, first


def _finished_rows(reader: Engine, actor: str, n: int) -> list[Any]:
    wait_until(lambda: _terminal_count(reader, actor) == n, 600, f"{n} runs of {actor} to finish", 0.05)
    rows = _rows(reader, actor)
    if {r.status for r in rows} != {"succeeded"}:
        raise RuntimeError(f"not every run succeeded: {sorted({r.status for r in rows})}")
    return rows


def fleet_rep(kind: str, home: Path, redis_url: str, n: int, paced: int, drain: int) -> dict[str, Any]:
    """One repetition on a fresh database: isolated runs (they also warm up), the burst, then the drain."""
    home.mkdir(parents=True)
    with database(kind, home) as url:
        fleet = Fleet(home, redis_url, url, agents=_fleet_toml(n))
        reader = _reader(url)
        try:
            fleet.start(workers=1, concurrency=2)
            isolated: list[float] = []
            parts: dict[str, list[float]] = {part: [] for part in _PARTS}
            for i in range(paced):
                actor = f"paced-{i}"
                sends: list[float] = []

                def send(run_id: str, fence: int, sends: list[float] = sends) -> None:
                    sends.append(time.time())
                    fleet.send_execute(run_id, fence)
                    sends.append(time.time())

                at = time.time()
                dispatch(fleet.services, DispatchRequest("noop", actor, actor=actor), send)
                wait_until(lambda a=actor: _terminal_count(reader, a) == 1, 60, "an isolated run to finish", 0.005)
                started = _as_epoch(_rows(reader, actor)[0].started_at)
                isolated.append(started - at)
                for part, seconds in zip(parts, (sends[0] - at, sends[1] - sends[0], started - sends[1]), strict=True):
                    parts[part].append(seconds)
            # A fresh worker for the burst, with every connection closed first so that PostgreSQL's
            # per-database commit counter is flushed before and after.
            _close_all(fleet, reader, url if kind == "postgresql" else None)
            before = pg_commits(url) if kind == "postgresql" else None
            fleet.start_worker(concurrency=2)
            fleet.wait_consuming()
            sent_at, called, first = _fleet_burst(fleet, n, "burst")
            rows = _finished_rows(reader, "burst", n)
            events = _events_per_run(reader, "burst")
            _close_all(fleet, reader, url if kind == "postgresql" else None)
            commits = (pg_commits(url)[0] - before[0]) / n if before is not None else None
            # The consumer alone: runs queued while no worker runs, then drained by a fresh one.
            _fleet_burst(fleet, drain, "drain")
            fleet.start_worker(concurrency=2)
            drained = _finished_rows(reader, "drain", drain)
            # The beat / `celery call` path: N fleet.dispatch tasks, dispatched and run by the one worker.
            tasks_first = time.time()
            for i in range(n):
                fleet.celery.send_task("fleet.dispatch", kwargs={"agent": "noop", "work_key": f"task-{i}"},
                                       queue="dispatch")
            task_rows = _finished_task_rows(reader, n)
            # The beat path: one fleet.ticks message over N agents sharing a schedule, dispatched in one batch.
            beat_first = time.time()
            fleet.celery.send_task("fleet.ticks", kwargs={"agents": [f"beat-{i:04}" for i in range(n)]},
                                   queue="dispatch")
            beat_rows = _finished_rows_like(reader, "beat-%", n)
        finally:
            fleet.stop()
            reader.dispose()
    latency = [_as_epoch(r.started_at) - sent_at[r.id] for r in rows]
    elapsed = max(_as_epoch(r.finished_at) for r in rows) - first
    tasks_s = max(_as_epoch(r.finished_at) for r in task_rows) - tasks_first
    beat_s = max(_as_epoch(r.finished_at) for r in beat_rows) - beat_first
    drain_s = max(_as_epoch(r.finished_at) for r in drained) - min(_as_epoch(r.started_at) for r in drained)
    return {"throughput": n / elapsed, "dispatch_rate": n / sum(called), "call_p50": 1000 * pct(called, 50),
            "drain_rate": drain / drain_s, "task_rate": n / tasks_s, "beat_rate": n / beat_s,
            "lat_p50": 1000 * pct(latency, 50), "lat_p95": 1000 * pct(latency, 95),
            "iso_p50": 1000 * pct(isolated, 50), "iso_p95": 1000 * pct(isolated, 95),
            **{f"iso_{part}_p50": 1000 * pct(values, 50) for part, values in parts.items()},
            "commits": commits, "events": events}


def _finished_task_rows(reader: Engine, n: int) -> list[Any]:
    """The runs the fleet.dispatch tasks made (the task's actor is `celery:HOST:TASK_ID`), once all finished."""
    return _finished_matching(reader, "work_key LIKE 'task-%'", n, "task-dispatched runs")


def _finished_rows_like(reader: Engine, agents: str, n: int) -> list[Any]:
    """The runs of the agents named like `agents` (SQL LIKE), once all N finished."""
    return _finished_matching(reader, f"agent LIKE '{agents}'", n, f"runs of {agents}")


def _finished_matching(reader: Engine, where: str, n: int, what: str) -> list[Any]:
    def done() -> bool:
        with reader.connect() as conn:
            return int(conn.execute(text(f"SELECT count(*) FROM runs WHERE {where} AND status IN "
                                         f"{_TERMINAL_SQL}")).scalar_one()) == n
    wait_until(done, 600, f"{n} {what} to finish", 0.05)
    with reader.connect() as conn:
        rows = list(conn.execute(text(f"SELECT id, status, started_at, finished_at FROM runs WHERE {where}")))
    if {r.status for r in rows} != {"succeeded"}:
        raise RuntimeError(f"not every one of the {what} succeeded: {sorted({r.status for r in rows})}")
    return rows


# ---------------------------------------------------------------- bare Celery


def bare_rep(home: Path, broker: str, n: int, paced: int, drain: int) -> dict[str, Any]:
    """One repetition: a fresh worker, isolated tasks (warm-up), N fire-and-forget sends, then the drain."""
    os.environ["BENCH_BROKER_URL"] = broker
    from bench import bare_app

    bare_app.app.conf.update(broker_url=broker, result_backend=broker)
    home.mkdir(parents=True)
    worker = start_bare_worker(home, broker)
    try:
        bare_app.run.apply_async().get(timeout=60)  # the worker consumes
        isolated = []
        for _ in range(paced):
            at = time.time()
            out = bare_app.run.apply_async().get(timeout=60)
            isolated.append(out["start"] - at)
        sent: list[tuple[Any, float]] = []
        called: list[float] = []
        first = time.time()
        for _ in range(n):
            at = time.time()
            sent.append((bare_app.run.apply_async(), at))
            called.append(time.time() - at)
        outs = [(result.get(timeout=600), at) for result, at in sent]
        stop_group(worker)
        # The consumer alone: tasks queued while no worker runs, then drained by a fresh one.
        queued = [bare_app.run.apply_async() for _ in range(drain)]
        worker = start_bare_worker(home, broker)
        drained = [result.get(timeout=600) for result in queued]
    finally:
        stop_group(worker)
    latency = [out["start"] - at for out, at in outs]
    elapsed = max(out["end"] for out, _ in outs) - first
    drain_s = max(out["end"] for out in drained) - min(out["start"] for out in drained)
    return {"throughput": n / elapsed, "dispatch_rate": n / sum(called), "call_p50": 1000 * pct(called, 50),
            "drain_rate": drain / drain_s, "task_rate": n / elapsed,
            "lat_p50": 1000 * pct(latency, 50), "lat_p95": 1000 * pct(latency, 95),
            "iso_p50": 1000 * pct(isolated, 50), "iso_p95": 1000 * pct(isolated, 95),
            "commits": None, "events": None}


def hop_rep(home: Path, broker: str, n: int, paced: int) -> dict[str, Any]:
    """The floor of a run as Fleet makes one, on a worker with Fleet's task events and sent events on:
    N bare.hop tasks, each sending one bare.run, the rate from the first send to the last run's end; and the
    isolated latency of one bare.run at a time (the one message Fleet's in-process dispatch sends)."""
    os.environ["BENCH_BROKER_URL"] = broker
    from bench import bare_app

    bare_app.app.conf.update(broker_url=broker, result_backend=broker)
    home.mkdir(parents=True)
    worker = start_bare_worker(home, broker, as_fleet=True)
    try:
        bare_app.app.AsyncResult(bare_app.hop.apply_async().get(timeout=60)).get(timeout=60)  # warm
        isolated = []
        for _ in range(paced):
            at = time.time()
            isolated.append(bare_app.run.apply_async().get(timeout=60)["start"] - at)
        first = time.time()
        hops = [bare_app.hop.apply_async() for _ in range(n)]
        runs = [bare_app.app.AsyncResult(result.get(timeout=600)) for result in hops]
        ends = [result.get(timeout=600)["end"] for result in runs]
    finally:
        stop_group(worker)
    return {"task_rate": n / (max(ends) - first),
            "iso_p50": 1000 * pct(isolated, 50), "iso_p95": 1000 * pct(isolated, 95)}


# ---------------------------------------------------------------- in-process trace


@contextlib.contextmanager
def _timed(module: Any, names: list[str], into: dict[str, list[float]]) -> Iterator[None]:
    """Time every call of the named module attributes (patched for the block, then put back)."""
    originals = {name: getattr(module, name) for name in names}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                into.setdefault(name, []).append(time.perf_counter() - started)
        return timed

    for name, fn in originals.items():
        setattr(module, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)


@contextlib.contextmanager
def in_process(kind: str, home: Path, redis_url: str) -> Iterator[Any]:
    """Fleet's services for the no-op agent in this process, on a fresh database of `kind` and a flushed Redis."""
    home.mkdir(parents=True)
    config = home / "fleet.toml"
    config.write_text(NOOP_AGENTS)
    with database(kind, home) as url:
        services = build(Settings(config=config, redis_url=redis_url, database_url=url, log_dir=home / "logs"),
                         load_fleet_config(config))
        try:
            services.redis.flushdb()
            db.upgrade(services.engine)
            yield services
        finally:
            services.close()


def trace_kind(kind: str, home: Path, redis_url: str, runs: int) -> dict[str, Any]:
    """Dispatch and execute runs one at a time in this process (no Celery), counting the database work
    of each side with engine events and timing each step."""
    with in_process(kind, home, redis_url) as services:
        tracer = Tracer(services.engine)
        trips = {"dispatch": RoundTrips(), "execute": RoundTrips()}  # the send itself is not Fleet's: not counted
        try:
            def one_run(key: str, sides: dict[str, Counts] | None = None) -> None:
                sent: list[tuple[str, int]] = []
                request = dispatching.DispatchRequest("noop", key, actor="trace")
                with tracer.counting() as counts, trips["dispatch"].counting():
                    dispatching.dispatch(services, request, lambda run_id, fence: sent.append((run_id, fence)))
                if sides is not None:
                    _add(sides["dispatch"], counts)
                with tracer.counting() as counts, trips["execute"].counting():
                    result = executor.execute(services, sent[0][0], sent[0][1], lambda *_: None)
                if sides is not None:
                    _add(sides["execute"], counts)
                if result.status != "succeeded":
                    raise RuntimeError(f"traced run ended {result.status}: {result.reason}")

            for i in range(3):
                one_run(f"warm-{i}")
            for counter in trips.values():
                counter.total = 0
            sides = {"dispatch": Counts(), "execute": Counts()}
            steps: dict[str, list[float]] = {}
            with _timed(dispatching, ["archive_stale", "create", "dispatch_one"], steps), \
                    _timed(executor, ["_claim", "_run_attempt", "_finish"], steps):
                for i in range(runs):
                    one_run(f"trace-{i}", sides)
        finally:
            tracer.close()
    return {"per_run": {side: {**counts.per(runs), "redis": trips[side].total / runs}
                        for side, counts in sides.items()},
            "steps": {name: 1000 * pct(values, 50) for name, values in steps.items()}}


QUEUED_MARKS = (0, 100, 300, 600)  # runs of the agent already queued when a window of dispatches is timed
QUEUED_WINDOW = 40


def queued_kind(kind: str, home: Path, redis_url: str) -> dict[int, float]:
    """One dispatch's p50 (ms) with 0 to 600 of the agent's runs queued ahead of it, none executed (a burst on an
    agent of concurrency 1,000): what a dispatch reads and sends per live run shows up as growth."""
    took: list[float] = []
    with in_process(kind, home, redis_url) as services:
        for i in range(QUEUED_MARKS[-1] + QUEUED_WINDOW):
            started = time.perf_counter()
            result = dispatching.dispatch(services, DispatchRequest("noop", f"queued-{i}", actor="trace"),
                                          lambda *_: None)
            took.append(time.perf_counter() - started)
            if result.status != "queued":
                raise RuntimeError(f"dispatch {i} was answered {result.status}: {result.reason}")
    return {mark: 1000 * pct(took[mark:mark + QUEUED_WINDOW], 50) for mark in QUEUED_MARKS}


def _add(total: Counts, part: Counts) -> None:
    for name in ("checkouts", "begins", "write_commits", "read_commits", "rollbacks", "statements"):
        setattr(total, name, getattr(total, name) + getattr(part, name))


# ---------------------------------------------------------------- main


def _print(results: dict[str, list[dict[str, Any]]], kinds: list[str]) -> None:
    rows = []
    bare, hops = results["bare"], results["hop"]
    for name, reps in results.items():
        if name == "hop":
            rows.append([_HOP, spread(reps, "task_rate"), "-", *["-"] * 5,
                         f"{med_of(reps, 'iso_p50'):.1f} / {med_of(reps, 'iso_p95'):.1f}", "-", "-"])
            continue
        rows.append(["bare Celery" if name == "bare" else f"Fleet, {name}", spread(reps, "task_rate"),
                     spread(reps, "task_rate" if name == "bare" else "beat_rate"), spread(reps, "throughput"),
                     spread(reps, "dispatch_rate"), spread(reps, "drain_rate"), spread(reps, "call_p50", "{:.2f}"),
                     f"{med_of(reps, 'lat_p50'):.1f} / {med_of(reps, 'lat_p95'):.1f}",
                     f"{med_of(reps, 'iso_p50'):.1f} / {med_of(reps, 'iso_p95'):.1f}",
                     spread(reps, "commits") if name == "postgresql" else "-",
                     spread(reps, "events") if name != "bare" else "-"])
    table("no-op agent: throughput and latency",
          ["system", "through fleet.dispatch tasks runs/s", "beat path: one fleet.ticks over N agents, runs/s",
           "in-process dispatch runs/s",
           "producer: dispatch calls/s", "consumer: drain runs/s", "call p50 ms",
           "burst latency p50 / p95 ms", "isolated latency p50 / p95 ms", "DB commits/run (pg_stat)",
           "events/run"], rows)
    ratios = []
    for kind in kinds:
        fleet = results[kind]
        ratios.append([f"Fleet {kind} / bare Celery"] + [
            f"{med_of(fleet, key) / med_of(bare, 'task_rate' if key == 'beat_rate' else key):.3f}"
            for key in ("task_rate", "beat_rate", "throughput", "drain_rate", "lat_p50", "iso_p50")])
    ratios.append(["bare Celery with Fleet's events / bare Celery",
                   f"{med_of(hops, 'task_rate') / med_of(bare, 'task_rate'):.3f}", *["-"] * 4,
                   f"{med_of(hops, 'iso_p50') / med_of(bare, 'iso_p50'):.3f}"])
    for kind in kinds:
        ratios.append([f"Fleet {kind} / bare Celery with Fleet's events",
                       f"{med_of(results[kind], 'task_rate') / med_of(hops, 'task_rate'):.3f}", *["-"] * 4,
                       f"{med_of(results[kind], 'iso_p50') / med_of(hops, 'iso_p50'):.3f}"])
    table("ratios (Fleet / bare Celery, medians)",
          ["", "throughput via fleet.dispatch tasks", "beat path (fleet.ticks) throughput",
           "in-process dispatch throughput", "consumer drain rate",
           "burst latency p50", "isolated latency p50"], ratios)
    table("isolated latency by part, p50 ms (boundaries timed in the sending process; the end is the claim's start)",
          ["system", "dispatch transaction, to the send", "the send (send_task)", "sent to the claim starting",
           "total"],
          [[f"Fleet, {kind}", *[f"{med_of(results[kind], f'iso_{part}_p50'):.2f}" for part in _PARTS],
            f"{med_of(results[kind], 'iso_p50'):.2f}"] for kind in kinds]
          + [["bare Celery with Fleet's events", "-", f"{med_of(bare, 'call_p50'):.2f} (bare apply_async call)", "-",
              f"{med_of(hops, 'iso_p50'):.2f}"]])


def _print_queued(queued: dict[str, dict[int, float]]) -> None:
    table(f"one dispatch with the agent's runs queued ahead of it, p50 ms over {QUEUED_WINDOW} (in-process, no Celery)",
          ["runs queued", *queued], [[str(mark), *[f"{q[mark]:.2f}" for q in queued.values()]]
                                     for mark in QUEUED_MARKS])


def _print_trace(traces: dict[str, dict[str, Any]]) -> None:
    rows = []
    for kind, trace in traces.items():
        for side, per in trace["per_run"].items():
            rows.append([kind, side, f"{per['write_commits']:.1f}", f"{per['read_commits']:.1f}",
                         f"{per['rollbacks']:.1f}", f"{per['checkouts']:.1f}", f"{per['statements']:.1f}",
                         f"{per['redis']:.1f}"])
    table("database work per run, traced in-process (engine events; one run at a time, no Celery)",
          ["DB", "side", "commits that wrote (durable)", "read-only commits", "rollbacks",
           "connection checkouts", "SQL statements", "Redis round trips (Fleet's; the send not counted)"], rows)
    names = ["archive_stale", "create", "dispatch_one", "_claim", "_run_attempt", "_finish"]
    table("where one run's time goes, p50 ms per step (in-process, one at a time, no Celery)",
          ["step", *traces], [[name, *[f"{t['steps'].get(name, float('nan')):.2f}" for t in traces.values()]]
                              for name in names])


def main() -> None:
    """Run the repetitions interleaved (bare, then Fleet on each database), print the tables."""
    args = parse_args("Fleet vs bare Celery: dispatch-to-finish throughput and latency of a no-op agent")
    n = 50 if args.quick else 300
    paced = 5 if args.quick else 30
    drain = 20 if args.quick else 150
    reps = args.reps or (1 if args.quick else 3)
    results: dict[str, list[dict[str, Any]]] = {"bare": [], "hop": [], **{k: [] for k in args.kinds}}
    traces: dict[str, dict[str, Any]] = {}
    began = time.monotonic()
    with workdir("dispatch") as tmp, private_redis(tmp) as redis:
        for rep in range(reps):
            log(f"rep {rep + 1}/{reps}: bare Celery, N={n}")
            results["bare"].append(bare_rep(tmp / f"bare-{rep}", f"redis://127.0.0.1:{redis.port}/1", n, paced,
                                            drain))
            log(f"rep {rep + 1}/{reps}: bare Celery, 2 messages per run, N={n}")
            results["hop"].append(hop_rep(tmp / f"hop-{rep}", f"redis://127.0.0.1:{redis.port}/1", n, paced))
            for kind in args.kinds:
                log(f"rep {rep + 1}/{reps}: Fleet on {kind}, N={n}")
                results[kind].append(fleet_rep(kind, tmp / f"{kind}-{rep}", redis.url, n, paced, drain))
        print(f"\nbench.dispatch: N={n} burst runs, {paced} isolated runs and {drain} drained runs per "
              f"repetition, {reps} repetition(s), medians (min..max); {machine_note()}; "
              f"took {time.monotonic() - began:.0f} s")
        _print(results, args.kinds)
        for kind in args.kinds:
            log(f"in-process trace on {kind}")
            traces[kind] = trace_kind(kind, tmp / f"trace-{kind}", f"redis://127.0.0.1:{redis.port}/2",
                                      5 if args.quick else 30)
        queued = {}
        for kind in args.kinds:
            log(f"dispatches with runs queued ahead, on {kind}")
            queued[kind] = queued_kind(kind, tmp / f"queued-{kind}", f"redis://127.0.0.1:{redis.port}/3")
    _print_trace(traces)
    _print_queued(queued)


if __name__ == "__main__":
    main()
