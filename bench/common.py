"""What every benchmark shares: arguments, statistics, tables, throw-away databases and Redis servers."""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, text

ROOT = Path(__file__).resolve().parent.parent
PG_BASE = os.environ.get("FLEET_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432")
KINDS = ("sqlite", "postgresql")


# ---------------------------------------------------------------- arguments


def parse_args(description: str, argv: Sequence[str] | None = None,
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """`--quick` for a smoke run; `--db` to pick the databases; `--reps` to override repetitions;
    `extra` adds a benchmark's own options."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a short run (under ~60 s) for smoke-checking")
    parser.add_argument("--db", default=",".join(KINDS), help="comma-separated: sqlite,postgresql")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per measurement (default 3)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    quiet_logs()
    revision()  # the code measured is the code at start: other people edit the tree meanwhile
    args.kinds = [k.strip() for k in args.db.split(",") if k.strip()]
    unknown = set(args.kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown database kind(s): {', '.join(sorted(unknown))}")
    if "postgresql" in args.kinds and not pg_answers():
        print(f"note: PostgreSQL at {PG_BASE} does not answer; PostgreSQL figures are skipped", file=sys.stderr)
        args.kinds.remove("postgresql")
    return args


# ---------------------------------------------------------------- statistics


def median(values: Sequence[float]) -> float:
    """The median; NaN for no values."""
    return statistics.median(values) if values else float("nan")


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between closest ranks."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def med_of(reps: list[dict[str, Any]], key: str) -> float:
    """The median over repetitions of one figure."""
    return median([r[key] for r in reps if r.get(key) is not None])


def spread(reps: list[dict[str, Any]], key: str, fmt: str = "{:.1f}") -> str:
    """The median with the min..max of the repetitions, for the table."""
    values = [r[key] for r in reps if r.get(key) is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(median(values))} ({fmt.format(min(values))}..{fmt.format(max(values))})"


def epoch(at: datetime) -> float:
    """A stored timestamp (aware, or naive UTC as SQLite may hand it back) as Unix seconds."""
    return (at if at.tzinfo is not None else at.replace(tzinfo=UTC)).timestamp()


# ---------------------------------------------------------------- output


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a small Markdown table (pastes straight into bench/README.md)."""
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    print(f"\n### {title}\n")
    for n, row in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    sys.stdout.flush()


def machine_note() -> str:
    """CPU count, load and the code measured, printed with the figures."""
    load = os.getloadavg()
    return (f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
            f"code at start: {revision()}")


@functools.cache
def revision() -> str:
    """The git commit measured, and whether the tree had changes on top of it (taken once, at start)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fleet", "workers"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head or 'unknown'}{' + uncommitted changes in fleet/ or workers/' if dirty else ''}"


def quiet_logs() -> None:
    """Fleet's in-process code logs at INFO through structlog: keep only warnings, on stderr."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
                        logger_factory=structlog.PrintLoggerFactory(sys.stderr))


def log(message: str) -> None:
    """Progress on stderr, so stdout holds only the figures."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- places to run in


@contextlib.contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    """A temporary folder, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=f"fleet-bench-{prefix}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def pg_answers() -> bool:
    """Whether the PostgreSQL server answers."""
    try:
        engine = create_engine(f"{PG_BASE}/postgres", connect_args={"connect_timeout": 2})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not available"
        return False


def _admin() -> Engine:
    return create_engine(f"{PG_BASE}/postgres", isolation_level="AUTOCOMMIT")


@contextlib.contextmanager
def database(kind: str, folder: Path, name: str = "fleet") -> Iterator[str]:
    """A fresh, empty database URL of a kind: a SQLite file, or `fleet_bench_<uuid>` dropped afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{folder / f'{name}.db'}"
        return
    db_name = f"fleet_bench_{uuid.uuid4().hex[:12]}"
    admin = _admin()
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{db_name}"'))
    try:
        yield f"{PG_BASE}/{db_name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
        admin.dispose()


def pg_commits(url: str) -> tuple[int, int]:
    """(xact_commit, xact_rollback) of a PostgreSQL database, from a fresh connection.

    PostgreSQL flushes a backend's counters when it exits, or up to 10 s after it goes idle:
    callers close every connection to the database first (stop the workers, dispose engines).
    """
    name = url.rsplit("/", 1)[1]
    admin = _admin()
    try:
        with admin.connect() as conn:
            row = conn.execute(text("SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = :n"),
                               {"n": name}).one()
    finally:
        admin.dispose()
    return int(row[0]), int(row[1])


def pg_backends(url: str) -> int:
    """How many sessions other than ours are connected to a PostgreSQL database."""
    name = url.rsplit("/", 1)[1]
    admin = _admin()
    try:
        with admin.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE datname = :n "
                                         "AND pid <> pg_backend_pid()"), {"n": name}).scalar_one())
    finally:
        admin.dispose()


@contextlib.contextmanager
def private_redis(folder: Path) -> Iterator[Any]:
    """A redis-server of our own on a free port (tests.harness.PrivateRedis), stopped afterwards."""
    from tests.harness import PrivateRedis

    server = PrivateRedis(folder)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll until truthy (tests.harness.wait_for with a finer default interval)."""
    from tests.harness import wait_for

    return wait_for(condition, timeout, what, interval=interval)


def start_bare_worker(home: Path, broker: str, as_fleet: bool = False) -> subprocess.Popen[bytes]:
    """The bare Celery baseline's worker (bench/bare_app.py), prefork -c 2 -O fair, in a session of its own;
    `as_fleet`: with the task events and sent events Fleet's workers have on."""
    env = {**os.environ, "BENCH_BROKER_URL": broker, "PYTHONPATH": str(ROOT),
           "BENCH_AS_FLEET": "1" if as_fleet else "0"}
    logfile = open(home / "bare-worker.log", "ab")  # noqa: SIM115 - lives as long as the worker
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "bench.bare_app", "worker", "-Q", "bare", "-P", "prefork", "-c", "2",
         "-O", "fair", "-n", f"bare-{os.getpid()}@%h", "--without-mingle", "--without-gossip", "-l", "INFO"],
        env=env, cwd=home, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True)


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop a worker started in its own session: SIGTERM to its group (a warm shutdown), SIGKILL after 20 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
