"""Count and time what a piece of Fleet code asks of the database, from SQLAlchemy engine events.

Only sees the engine it is attached to (this process): benchmarks run the code in-process to use it.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, event

_WRITE = re.compile(r"^\s*(INSERT|UPDATE|DELETE)\b", re.IGNORECASE)
_SPACE = re.compile(r"\s+")


@dataclass
class Counts:
    """What the database was asked to do."""

    checkouts: int = 0  # connection checkouts (no round trip unless the server closed the connection: fleet/db.py)
    begins: int = 0
    write_commits: int = 0  # commits of transactions that wrote: each one a durable flush (fsync)
    read_commits: int = 0  # commits of transactions that only read
    rollbacks: int = 0
    statements: int = 0
    by_statement: dict[str, list[float]] = field(default_factory=dict)  # SQL -> [calls, seconds, fastest call]
    params: dict[str, Any] = field(default_factory=dict)  # SQL -> the parameters of its first call

    def per(self, n: int) -> dict[str, float]:
        """Each count divided by n (per run)."""
        return {k: getattr(self, k) / n for k in ("checkouts", "begins", "write_commits", "read_commits",
                                                  "rollbacks", "statements")}


class Tracer:
    """Attach to an engine; `counting()` yields a fresh Counts for a block of code."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.counts = Counts()
        self._writes: dict[int, int] = {}
        self._started: dict[int, float] = {}
        self._listeners: list[tuple[Any, str, Callable[..., Any]]] = [
            (engine, "begin", self._begin), (engine, "commit", self._commit), (engine, "rollback", self._rollback),
            (engine, "before_cursor_execute", self._before), (engine, "after_cursor_execute", self._after),
            (engine, "checkout", self._checkout)]
        for target, name, fn in self._listeners:
            event.listen(target, name, fn)

    def close(self) -> None:
        """Detach every listener."""
        for target, name, fn in self._listeners:
            event.remove(target, name, fn)

    @contextlib.contextmanager
    def counting(self) -> Iterator[Counts]:
        """Count what the block does, and only that."""
        counts = self.counts = Counts()
        try:
            yield counts
        finally:
            self.counts = Counts()  # what runs after the block goes to a throw-away tally

    def _checkout(self, *_: Any) -> None:
        self.counts.checkouts += 1

    def _begin(self, conn: Any) -> None:
        self.counts.begins += 1
        self._writes[id(conn)] = 0

    def _commit(self, conn: Any) -> None:
        if self._writes.pop(id(conn), 0):
            self.counts.write_commits += 1
        else:
            self.counts.read_commits += 1

    def _rollback(self, conn: Any) -> None:
        self._writes.pop(id(conn), None)
        self.counts.rollbacks += 1

    def _before(self, conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.startswith("BEGIN"):
            return
        self.counts.params.setdefault(_SPACE.sub(" ", statement).strip(), parameters)
        self.counts.statements += 1
        if _WRITE.match(statement):
            self._writes[id(conn)] = self._writes.get(id(conn), 0) + 1
        self._started[id(conn)] = time.perf_counter()

    def _after(self, conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        started = self._started.pop(id(conn), None)
        if started is None:
            return
        key = _SPACE.sub(" ", statement).strip()
        took = time.perf_counter() - started
        entry = self.counts.by_statement.setdefault(key, [0, 0.0, took])
        entry[0] += 1
        entry[1] += took
        entry[2] = min(entry[2], took)


def explain(engine: Engine, statement: str, params: Any = None) -> list[str]:
    """The query plan of a statement as the driver saw it (EXPLAIN QUERY PLAN on SQLite, EXPLAIN on PostgreSQL)."""
    prefix = "EXPLAIN QUERY PLAN " if engine.dialect.name == "sqlite" else "EXPLAIN "
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(prefix + statement, params if params is not None else ()).all()
        conn.rollback()
    if engine.dialect.name == "sqlite":
        return [str(row[-1]) for row in rows]
    return [str(row[0]) for row in rows]
