"""Worker memory over many runs: RSS and open fds of one real worker's processes, Fleet vs bare Celery.

    python -m bench.memory [--quick] [--db sqlite,postgresql] [--runs N] [--max-tasks-per-child N]

Fleet: an agent `noop` (command ["true"]), one real worker (prefork -c 2, -O fair, Fleet's own Celery
settings from workers/app.py, `worker_max_tasks_per_child` included) consuming both queues. Every
run goes through the worker as beat sends it: a `fleet.dispatch` task (distinct work keys) that
enqueues one `fleet.execute`, so the worker does the whole run, dispatch and execute.
Bare Celery: bench/bare_app.py, a task running `subprocess.run(["true"])`, the same worker options
on the same private redis-server (Celery's defaults otherwise: no `worker_max_tasks_per_child`).

A warm-up of ~100 runs first, then N runs (10,000; `--quick` 1,000) in ten batches of N/10. After
each batch has finished (every run row terminal, or every result in) and before the next is sent,
the worker is idle and its processes are sampled: VmRSS from /proc/PID/status and the entries in
/proc/PID/fd of the main process and of each pool child (the main process's children). A child
replaced by `worker_max_tasks_per_child` shows up as a new pid. Growth is last sample minus first.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, text

from bench.common import (
    database,
    log,
    machine_note,
    parse_args,
    private_redis,
    start_bare_worker,
    stop_group,
    table,
    wait_until,
    workdir,
)
from bench.dispatch import NOOP_AGENTS
from tests.harness import PY, Fleet

WARMUP = 100
SAMPLES = 10
TARGET_MB = 10.0


# ---------------------------------------------------------------- /proc


@dataclass(frozen=True)
class Proc:
    """One process at one moment: its pid, resident set (KiB) and open file descriptors."""

    pid: int
    rss_kib: int
    fds: int


@dataclass(frozen=True)
class Sample:
    """The worker's processes after `done` runs of the measured N (0: right after the warm-up)."""

    done: int
    main: Proc
    children: list[Proc]

    @property
    def children_kib(self) -> int:
        """The pool children's RSS added up (shared pages are counted in each, as VmRSS does)."""
        return sum(c.rss_kib for c in self.children)

    @property
    def total_kib(self) -> int:
        """Main process plus pool children."""
        return self.main.rss_kib + self.children_kib


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _proc(pid: int) -> Proc:
    return Proc(pid, _rss_kib(pid), len(os.listdir(f"/proc/{pid}/fd")))


def _children_of(parent: int) -> list[int]:
    """The pids whose parent is `parent` (the pool children: agents are their children, not the main's)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == parent:
            found.append(int(entry))
    return sorted(found)


def sample(main: int, done: int, concurrency: int = 2) -> Sample:
    """The main process and its pool children, once the pool has its `concurrency` children again
    (a child replaced after `worker_max_tasks_per_child` may still be on its way)."""
    def pool() -> list[int] | None:
        pids = _children_of(main)
        return pids if len(pids) == concurrency else None

    pids = wait_until(pool, 30, f"{concurrency} pool children of {main}", 0.05)
    return Sample(done, _proc(main), [_proc(pid) for pid in pids])


# ---------------------------------------------------------------- Fleet


_TERMINAL_SQL = "('succeeded','idle','failed','killed','archived','dead')"


def _terminal(reader: Engine) -> int:
    with reader.connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM runs WHERE status IN {_TERMINAL_SQL}")).scalar_one())


def _statuses(reader: Engine) -> dict[str, int]:
    with reader.connect() as conn:
        return {row[0]: int(row[1]) for row in conn.execute(text("SELECT status, count(*) FROM runs GROUP BY status"))}


def _start_fleet_worker(fleet: Fleet, max_tasks_per_child: int | None) -> subprocess.Popen[bytes]:
    """The harness's worker (prefork -c 2 -O fair), optionally with `--max-tasks-per-child` overridden."""
    if max_tasks_per_child is None:
        return fleet.start_worker(concurrency=2)
    logfile = open(fleet.tmp / "worker-0.log", "ab")  # noqa: SIM115 - lives with the worker
    proc = subprocess.Popen(
        [PY, "-m", "celery", "-A", "workers.app", "worker", "-Q", "dispatch,agents", "-c", "2", "-O", "fair",
         "-n", f"mem-{os.getpid()}@%h", "--without-mingle", "--without-gossip", "-l", "INFO",
         "--max-tasks-per-child", str(max_tasks_per_child)],
        env=fleet.env, cwd=fleet.tmp, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True)
    fleet.workers.append(proc)
    return proc


def fleet_series(kind: str, home: Path, redis_url: str, n: int, max_tasks_per_child: int | None) -> list[Sample]:
    """Warm-up, then N runs in ten batches through `fleet.dispatch` tasks, sampling after each."""
    home.mkdir(parents=True)
    with database(kind, home) as url:
        fleet = Fleet(home, redis_url, url, agents=NOOP_AGENTS)
        reader = create_engine(url)  # plain engine: no BEGIN IMMEDIATE, never SQLite's write lock
        sent = 0

        def batch(count: int) -> None:
            nonlocal sent
            for i in range(sent, sent + count):
                fleet.celery.send_task("fleet.dispatch", kwargs={"agent": "noop", "work_key": f"mem-{i}"},
                                       queue="dispatch")
            sent += count
            wait_until(lambda: _terminal(reader) >= sent, 1800, f"{sent} runs to finish", 0.25)

        try:
            fleet.redis.flushdb()
            fleet.cli("db", "upgrade", check=True)
            worker = _start_fleet_worker(fleet, max_tasks_per_child)
            fleet.wait_consuming()
            batch(WARMUP)
            samples = [sample(worker.pid, 0)]
            for step in range(1, SAMPLES + 1):
                batch(n // SAMPLES)
                samples.append(sample(worker.pid, step * n // SAMPLES))
                log(f"  {kind}: {samples[-1].done}/{n} runs, main {samples[-1].main.rss_kib / 1024:.1f} MB")
            statuses = _statuses(reader)
            if statuses != {"succeeded": sent}:
                raise RuntimeError(f"not every run succeeded: {statuses}")
        finally:
            fleet.stop()
            reader.dispose()
    return samples


# ---------------------------------------------------------------- bare Celery


def bare_series(home: Path, broker: str, n: int) -> list[Sample]:
    """The same warm-up and batches through the bare task, every result waited for."""
    os.environ["BENCH_BROKER_URL"] = broker
    from bench import bare_app

    bare_app.app.conf.update(broker_url=broker, result_backend=broker)
    home.mkdir(parents=True)

    def batch(count: int) -> None:
        results = [bare_app.run.apply_async() for _ in range(count)]
        for result in results:
            result.get(timeout=600)
            result.forget()  # keep the results out of Redis: only the worker's memory is measured

    worker = start_bare_worker(home, broker)
    try:
        batch(WARMUP)
        samples = [sample(worker.pid, 0)]
        for step in range(1, SAMPLES + 1):
            batch(n // SAMPLES)
            samples.append(sample(worker.pid, step * n // SAMPLES))
    finally:
        stop_group(worker)
    return samples


# ---------------------------------------------------------------- output


def _mb(kib: float) -> str:
    return f"{kib / 1024:.1f}"


def _growth(kib: int) -> str:
    return f"{kib / 1024:+.1f}"


def _print_series(name: str, samples: list[Sample]) -> None:
    rows = []
    for s in samples:
        rows.append([f"{s.done:,}" if s.done else "start (after warm-up)", _mb(s.main.rss_kib), s.main.fds,
                     " / ".join(f"{_mb(c.rss_kib)} [{c.pid}]" for c in s.children),
                     " / ".join(str(c.fds) for c in s.children), _mb(s.total_kib)])
    table(f"{name}: RSS (MB) and open fds of the worker's processes",
          ["runs done", "main RSS", "main fds", "children RSS [pid]", "children fds", "total RSS"], rows)


def _summary_row(name: str, samples: list[Sample]) -> list[Any]:
    first, last = samples[0], samples[-1]
    pids = {c.pid for s in samples for c in s.children}
    main_growth = last.main.rss_kib - first.main.rss_kib
    child_growth = max(c.rss_kib for c in last.children) - max(c.rss_kib for c in first.children)
    total_growth = last.total_kib - first.total_kib
    flat = max(main_growth, child_growth, total_growth) <= TARGET_MB * 1024
    return [name, f"{last.done:,}", f"{_mb(first.main.rss_kib)} -> {_mb(last.main.rss_kib)}",
            _growth(main_growth),
            f"{_mb(max(c.rss_kib for c in first.children))} -> {_mb(max(c.rss_kib for c in last.children))}",
            _growth(child_growth), _growth(total_growth),
            f"{first.main.fds} -> {last.main.fds}",
            f"{'/'.join(str(c.fds) for c in first.children)} -> {'/'.join(str(c.fds) for c in last.children)}",
            len(pids), "yes" if flat else "NO"]


def main() -> None:
    """Bare Celery first, then Fleet on each database; print one table per series and a summary."""
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--runs", type=int, default=None, help="runs measured after the warm-up "
                                                                   "(default 10,000; --quick 1,000)")
        parser.add_argument("--max-tasks-per-child", type=int, default=None,
                            help="override Fleet's worker_max_tasks_per_child (default: workers/app.py's)")

    args = parse_args("Worker memory over many no-op runs: Fleet vs bare Celery", extra=options)
    n = args.runs or (1_000 if args.quick else 10_000)
    if n % SAMPLES:
        raise SystemExit(f"--runs must be a multiple of {SAMPLES}")
    from workers.app import app as fleet_app

    recycle = args.max_tasks_per_child or fleet_app.conf.worker_max_tasks_per_child
    series: dict[str, list[Sample]] = {}
    began = time.monotonic()
    load_before = os.getloadavg()
    with workdir("memory") as tmp, private_redis(tmp) as redis:
        log(f"bare Celery, {WARMUP} + {n} runs")
        series["bare Celery"] = bare_series(tmp / "bare", f"redis://127.0.0.1:{redis.port}/1", n)
        for kind in args.kinds:
            log(f"Fleet on {kind}, {WARMUP} + {n} runs")
            series[f"Fleet, {kind}"] = fleet_series(kind, tmp / kind, redis.url, n, args.max_tasks_per_child)
    load_after = os.getloadavg()
    print(f"\nbench.memory: {WARMUP} warm-up + N={n:,} no-op runs per series through one worker (prefork -c 2), "
          f"sampled every {n // SAMPLES:,} runs; Fleet's worker_max_tasks_per_child = {recycle}, "
          f"worker_max_memory_per_child = {fleet_app.conf.worker_max_memory_per_child} KiB; bare Celery: "
          f"Celery's defaults (no recycling); load average at start {load_before[0]:.2f}, at end "
          f"{load_after[0]:.2f}; {machine_note()}; took {time.monotonic() - began:.0f} s")
    for name, samples in series.items():
        _print_series(name, samples)
    table(f"growth over N={n:,} runs, last sample minus first (MB); flat = every growth <= {TARGET_MB:.0f} MB",
          ["system", "runs", "main RSS MB", "main growth", "largest child RSS MB", "largest child growth",
           "total growth", "main fds", "children fds", "pool pids seen", "flat"],
          [_summary_row(name, samples) for name, samples in series.items()])
    sys.stdout.flush()


if __name__ == "__main__":
    main()
