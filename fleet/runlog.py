"""Run logs in the database: the worker ships its run's log file in chunks, any host reads them.

The file on the worker's disk stays what the agent's output is written to (masked and capped by
fleet/process.py); a `Shipper` sends what was added to it since the last time, as rows of at most
CHUNK_BYTES, from the executor's bookkeeper thread (never the watch loop: a slow database must not
delay a kill) and once more when the attempt ends. So `fleet logs` and the page on any host show a
run that ran anywhere, without a shared disk; a host whose database is away keeps its file, and
the next ship sends the rest. A chunk is unique on (run, attempt, offset): a commit whose answer
was lost and is sent again is not stored twice. Retention deletes a run's chunks with its row.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

from sqlalchemy import Engine, delete, func
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlmodel import Session, col, select

from fleet import db, logs
from fleet.errors import first_line
from fleet.models import RunLogChunk

log = logs.get(__name__)
CHUNK_BYTES = 64 * 1024
SHIP_MAX_BYTES = 1024 * 1024  # at most this much per ship, so one call stays short


class Shipper:
    """Ships one attempt's part of a run's log file: what it added from `start` on."""

    def __init__(self, engine: Engine, run_id: str, attempt: int, path: Path, start: int) -> None:
        self.engine, self.run_id, self.attempt, self.path = engine, run_id, attempt, path
        self.offset = start

    @classmethod
    def for_attempt(cls, engine: Engine, run_id: str, attempt: int, path: Path) -> Shipper:
        """A first attempt's file starts afresh; a retry's appends to what this host already holds."""
        start = 0
        if attempt > 1:
            try:
                start = path.stat().st_size
            except OSError:
                start = 0
        return cls(engine, run_id, attempt, path, start)

    def ship(self, now: datetime, *, everything: bool = False) -> bool:
        """Send what is new in the file; False when the database did not take it (the next call retries)."""
        while True:
            data = self._read(SHIP_MAX_BYTES)
            if not data:
                return True
            try:
                self._store(data, now)
            except SQLAlchemyError as exc:
                first = first_line(exc)
                log.warning("runlog.ship_failed", run_id=self.run_id, offset=self.offset, error=first)
                return False
            self.offset += len(data)
            if not everything or len(data) < SHIP_MAX_BYTES:
                return True

    def _read(self, size: int) -> bytes:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self.offset)
                return handle.read(size)
        except OSError:
            return b""

    def _store(self, data: bytes, now: datetime) -> None:
        with db.session(self.engine) as session:
            for start in range(0, len(data), CHUNK_BYTES):
                session.add(RunLogChunk(run_id=self.run_id, attempt=self.attempt, offset=self.offset + start,
                                        at=now, data=data[start:start + CHUNK_BYTES]))
            try:
                session.commit()
            except IntegrityError:
                session.rollback()  # an earlier commit of these chunks landed, its answer did not
                self._store_missing(data, now)

    def _store_missing(self, data: bytes, now: datetime) -> None:
        with db.session(self.engine) as session:
            have = set(session.exec(select(RunLogChunk.offset).where(
                col(RunLogChunk.run_id) == self.run_id, col(RunLogChunk.attempt) == self.attempt)))
            for start in range(0, len(data), CHUNK_BYTES):
                if self.offset + start not in have:
                    session.add(RunLogChunk(run_id=self.run_id, attempt=self.attempt, offset=self.offset + start,
                                            at=now, data=data[start:start + CHUNK_BYTES]))
            session.commit()


def chunks(session: Session, run_id: str, after_id: int = 0, limit: int = 64) -> list[tuple[int, bytes]]:
    """A run's chunks after `after_id`, in order: (id, bytes)."""
    query = (select(RunLogChunk.id, RunLogChunk.data).where(col(RunLogChunk.run_id) == run_id,
                                                            col(RunLogChunk.id) > after_id)
             .order_by(col(RunLogChunk.id)).limit(limit))
    return [(int(i or 0), bytes(d)) for i, d in session.exec(query)]


def has_log(session: Session, run_id: str) -> bool:
    """Whether any chunk of the run was shipped."""
    return session.exec(select(RunLogChunk.id).where(col(RunLogChunk.run_id) == run_id).limit(1)).first() is not None


def tail(session: Session, run_id: str, size: int = 8192) -> str | None:
    """The end of a run's shipped log (None: nothing shipped)."""
    rows = session.exec(select(RunLogChunk.data).where(col(RunLogChunk.run_id) == run_id)
                        .order_by(col(RunLogChunk.id).desc()).limit(size // CHUNK_BYTES + 2)).all()
    if not rows:
        return None
    data = b"".join(bytes(r) for r in reversed(rows))
    return data[-size:].decode("utf-8", errors="replace")


def delete_runs(session: Session, run_ids: Iterable[str]) -> int:
    """Delete the chunks of these runs; how many."""
    ids = list(run_ids)
    if not ids:
        return 0
    return db.rowcount(session.execute(delete(RunLogChunk).where(col(RunLogChunk.run_id).in_(ids))))


def keep_newest(session: Session, runs: int) -> int:
    """Delete the chunks of every run but the `runs` whose logs were shipped last; how many runs lost theirs."""
    newest = (select(RunLogChunk.run_id).group_by(col(RunLogChunk.run_id))
              .order_by(func.max(RunLogChunk.id).desc()).offset(runs).limit(500))
    old = list(session.exec(newest))
    delete_runs(session, old)
    return len(old)
