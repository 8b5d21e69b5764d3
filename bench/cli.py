"""How fast the `fleet` command starts, beside `celery --help`, and how soon `fleet kill` reaches Redis.

Every command runs as a user runs it, a fresh process each time, interleaved round by round so that
the machine's load falls on every row alike:

- `python -c pass`: the interpreter alone, the floor of any Python command;
- `celery --help` and `fleet --help`;
- `fleet kill --reason bench`: to exit, and to the moment the flag is in Redis (a keyspace
  notification seen by this process; a process started at t0 that sets the key, t = Redis's news);
- `fleet resume`, so that every kill is a real transition;
- the floor of the kill: a Python process that imports redis-py and sets the same key.

`--also REV` measures the `fleet` of another commit too (its tree from `git archive`, run with
`python -m fleet` from there), in the same rounds: before and after in one table.

    .venv/bin/python -m bench.cli [--quick] [--db sqlite,postgresql] [--reps N] [--also REV]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import redis

from bench.common import KINDS, ROOT, database, log, machine_note, median, pg_answers, private_redis, table, workdir
from fleet import keys

PY = sys.executable
FLEET_TOML = '[agents.echo]\ncommand = ["true"]\n'


@dataclass
class Command:
    """One row: a name and the argv that runs it from `cwd`."""

    name: str
    argv: list[str]
    cwd: Path = ROOT
    times: list[float] = field(default_factory=list)
    to_redis: list[float] = field(default_factory=list)


class KillWatch:
    """Tells when the kill flag is set in Redis, from the server's keyspace notifications."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.client.config_set("notify-keyspace-events", "K$g")
        self.pubsub = self.client.pubsub()
        self.pubsub.subscribe(f"__keyspace@0__:{keys.kill()}")
        self.pubsub.get_message(timeout=5)  # the subscription's confirmation
        self.seen = threading.Event()
        self.at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            # A blocking read with a timeout: it returns as soon as a message arrives.
            message = self.pubsub.get_message(timeout=0.5)
            if message and message["type"] == "message" and message["data"] == b"set" and not self.seen.is_set():
                self.at = time.perf_counter()  # the first SET: `fleet kill` sets the flag again with its mirror
                self.seen.set()

    def arm(self) -> None:
        """Forget the last sighting."""
        self.seen.clear()

    def wait(self, timeout: float = 30) -> float:
        """When the flag was set (perf_counter)."""
        if not self.seen.wait(timeout):
            raise RuntimeError("the kill flag never reached Redis")
        return self.at

    def close(self) -> None:
        """Stop listening."""
        self._stop.set()
        self._thread.join(5)
        self.pubsub.close()
        self.client.close()


def run(command: Command, env: dict[str, str], watch: KillWatch | None = None) -> None:
    """Run once; record the wall time (and, for a kill, the time to the flag in Redis)."""
    if watch is not None:
        watch.arm()
    start = time.perf_counter()
    proc = subprocess.run(command.argv, cwd=command.cwd, env=env, capture_output=True, text=True, check=False,
                          stdin=subprocess.DEVNULL, timeout=120)
    command.times.append(time.perf_counter() - start)
    if proc.returncode != 0:
        raise RuntimeError(f"{command.name} exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    if watch is not None:
        command.to_redis.append(watch.wait() - start)


@contextlib.contextmanager
def tree_of(rev: str, folder: Path) -> Iterator[Path]:
    """The tree of a commit, unpacked into a folder (read-only use: nothing is installed)."""
    data = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
    target = folder / f"tree-{rev}"
    target.mkdir()
    with tarfile.open(fileobj=BytesIO(data)) as archive:
        archive.extractall(target, filter="data")
    yield target


def measure(kind: str, reps: int, also: str | None) -> list[Command]:
    """Every row of one database kind, `reps` interleaved rounds."""
    with workdir(f"cli-{kind}") as folder, private_redis(folder) as server, database(kind, folder) as url:
        (folder / "fleet.toml").write_text(FLEET_TOML)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "SENTRY_"))}
        env.update(FLEET_CONFIG=str(folder / "fleet.toml"), FLEET_REDIS_URL=server.url, FLEET_DATABASE_URL=url,
                   FLEET_LOG_DIR=str(folder / "logs"), COLUMNS="80")
        subprocess.run([PY, "-m", "fleet", "db", "upgrade"], cwd=ROOT, env=env, check=True, capture_output=True)
        flag = keys.kill()
        help_rows = [Command("python -c pass", [PY, "-c", "pass"]),
                     Command("celery --help", [PY, "-m", "celery", "--help"]),
                     Command("fleet --help", [PY, "-m", "fleet", "--help"])]
        kill = Command("fleet kill", [PY, "-m", "fleet", "kill", "--reason", "bench"])
        resume = Command("fleet resume", [PY, "-m", "fleet", "resume"])
        setter = f"import redis; r = redis.Redis.from_url({server.url!r}); r.set({flag!r}, '1'); r.delete({flag!r})"
        floor = Command("floor: python + redis-py SET", [PY, "-c", setter])
        with contextlib.ExitStack() as stack:
            old: list[Command] = []
            if also:
                tree = stack.enter_context(tree_of(also, folder))
                old = [Command(f"fleet --help @{also}", [PY, "-m", "fleet", "--help"], cwd=tree),
                       Command(f"fleet kill @{also}", kill.argv, cwd=tree),
                       Command(f"fleet resume @{also}", resume.argv, cwd=tree)]
            watch = KillWatch(server.url)
            stack.callback(watch.close)
            for n in range(reps):
                log(f"{kind}: round {n + 1} of {reps}")
                for command in help_rows:
                    run(command, env)
                run(kill, env, watch)
                run(resume, env)
                run(floor, env, watch)
                if old:
                    run(old[0], env)
                    run(old[1], env, watch)
                    run(old[2], env)
        return [*help_rows, kill, resume, floor, *old]


def report(kind: str, rows: list[Command]) -> None:
    """One table per database kind, and the ratio the issue asks about."""
    def cell(values: list[float]) -> str:
        if not values:
            return "-"
        return f"{median(values) * 1000:.0f} ({min(values) * 1000:.0f}..{max(values) * 1000:.0f})"

    table(f"`fleet` start, {kind} (ms, median (min..max) of {len(rows[0].times)} rounds; {machine_note()})",
          ["command", "to exit", "to the kill flag in Redis"],
          [[f"`{r.name}`", cell(r.times), cell(r.to_redis)] for r in rows])
    by_name = {r.name: median(r.times) for r in rows}
    print(f"\n`fleet --help` / `celery --help` = {by_name['fleet --help'] / by_name['celery --help']:.2f}")


def main(argv: list[str] | None = None) -> None:
    """Measure and print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds, SQLite only")
    parser.add_argument("--db", default="sqlite", help=f"comma-separated, of: {', '.join(KINDS)}")
    parser.add_argument("--reps", type=int, default=None, help="rounds (default 15)")
    parser.add_argument("--also", metavar="REV", help="measure the fleet of this commit too, interleaved")
    args = parser.parse_args(argv)
    kinds = ["sqlite"] if args.quick else [k.strip() for k in args.db.split(",") if k.strip()]
    if "postgresql" in kinds and not pg_answers():
        log("PostgreSQL does not answer: its figures are skipped")
        kinds.remove("postgresql")
    reps = args.reps or (5 if args.quick else 15)
    for kind in kinds:
        report(kind, measure(kind, reps, args.also))


if __name__ == "__main__":
    main()
