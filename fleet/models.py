"""The tables: runs, their append-only events, dead letters, the spend ledger, the kill and pause
mirrors, watchdog verdicts. Models only: no I/O here (queries live in fleet/store.py).

Money is integer micro-dollars everywhere; timestamps are timezone-aware, stored as UTC.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlmodel import Field, SQLModel

MICROS_PER_USD = 1_000_000


class RunStatus(str, Enum):
    """Where a run is in its life. The terminal ones never change again."""

    CREATED = "created"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    IDLE = "idle"
    FAILED = "failed"
    KILLED = "killed"
    ARCHIVED = "archived"
    ABANDONED = "abandoned"
    DEAD = "dead"  # dead-lettered after its last attempt

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)  # f"{status}" is "idle", never "RunStatus.IDLE"


TERMINAL = frozenset({RunStatus.SUCCEEDED, RunStatus.IDLE, RunStatus.FAILED, RunStatus.KILLED,
                      RunStatus.ARCHIVED, RunStatus.DEAD})
NOT_STARTED = frozenset({RunStatus.CREATED, RunStatus.QUEUED})


class StatusColumn(TypeDecorator[RunStatus]):
    """A run's status, stored as its plain string value and read back as a RunStatus."""

    impl = String(16)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> str | None:
        return None if value is None else RunStatus(value).value

    def process_result_value(self, value: Any, dialect: Any) -> RunStatus | None:
        return None if value is None else RunStatus(value)


class Run(SQLModel, table=True):
    """One unit of work `(agent, work_key)` under one idempotency key; retries reuse this row."""

    __tablename__ = "runs"
    __table_args__ = (
        Index("ix_runs_agent_status", "agent", "status"),
        Index("ix_runs_status_heartbeat", "status", "heartbeat_at"),
        Index("ix_runs_created_at", "created_at"),
    )

    id: str = Field(primary_key=True, max_length=32)
    idem_key: str = Field(max_length=600, unique=True)
    agent: str = Field(max_length=64)
    work_key: str = Field(max_length=512)
    status: RunStatus = Field(default=RunStatus.CREATED, sa_column=Column(StatusColumn(), nullable=False))
    attempt: int = 0
    max_attempts: int = 2
    fence: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    slot: int | None = None
    payload: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    budget_day: str | None = Field(default=None, max_length=10)
    reserved_micros: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))
    cost_micros: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))
    exit_code: int | None = None
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    host: str | None = Field(default=None, max_length=255)
    pid: int | None = None
    pgid: int | None = None
    dispatched_by: str | None = Field(default=None, max_length=255)
    prev_run_id: str | None = Field(default=None, max_length=32)
    replay_of: int | None = None
    created_at: datetime
    updated_at: datetime
    queued_at: datetime | None = None
    started_at: datetime | None = None
    heartbeat_at: datetime | None = None
    finished_at: datetime | None = None
    retry_at: datetime | None = None
    settled_at: datetime | None = None  # set once the reservation was replaced by the actual cost
    # What the current attempt has booked so far: an owner books its cumulative figure, never a step twice.
    attempt_cost_micros: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))
    # A retry that started on a later budget day than its first attempt: the day before, and what the run
    # had booked on it (the ledger of that day holds it; budget_day holds the rest).
    prior_day: str | None = Field(default=None, max_length=10)
    prior_cost_micros: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))
    # How many execute messages this attempt has been sent (the reaper re-sends a lost one once).
    sends: int = Field(default=0, sa_column=Column(Integer, nullable=False, server_default="0"))


class RunEvent(SQLModel, table=True):
    """The audit trail, append-only: who dispatched what, every status change, every switch thrown."""

    __tablename__ = "run_events"
    __table_args__ = (Index("ix_run_events_run_id", "run_id"), Index("ix_run_events_at", "at"))

    id: int | None = Field(default=None, primary_key=True)
    at: datetime
    kind: str = Field(max_length=64)
    run_id: str | None = Field(default=None, max_length=32)
    agent: str | None = Field(default=None, max_length=64)
    actor: str | None = Field(default=None, max_length=255)
    detail: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class DeadLetter(SQLModel, table=True):
    """A run that used its last attempt: what failed, and the tail of what it printed."""

    __tablename__ = "dead_letters"
    __table_args__ = (UniqueConstraint("run_id", name="uq_dead_letters_run_id"),
                      Index("ix_dead_letters_created_at", "created_at"),
                      {"sqlite_autoincrement": True})  # ids are never reused: the page and `fleet dlq` act by id

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(max_length=32)
    agent: str = Field(max_length=64)
    reason: str = Field(max_length=32)  # failed, crash_loop, timeout, ...
    attempts: int
    exit_code: int | None = None
    last_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    output_tail: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime
    replayed_run_id: str | None = Field(default=None, max_length=32)
    replayed_at: datetime | None = None


class SpendDay(SQLModel, table=True):
    """The ledger: one row per budget day and scope ('*' fleet-wide, or an agent's name)."""

    __tablename__ = "spend_days"

    day: str = Field(primary_key=True, max_length=10)
    scope: str = Field(primary_key=True, max_length=64)
    reserved_micros: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))
    spent_micros: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))
    # Runs queued that day (on an agent's row; the fleet's row keeps 0): a bounded agent's
    # max_runs_per_day is checked by the conditional UPDATE that adds one, never by a count read first.
    runs: int = Field(default=0, sa_column=Column(Integer, nullable=False, server_default="0"))
    updated_at: datetime


class KillSwitch(SQLModel, table=True):
    """The database mirror of the kill flags, so a Redis restart cannot silently lift a kill."""

    __tablename__ = "kill_switches"

    scope: str = Field(primary_key=True, max_length=64)  # '*' for the whole fleet
    engaged: bool = False
    reason: str | None = Field(default=None, max_length=1000)
    actor: str | None = Field(default=None, max_length=255)
    hard: bool = False
    changed_at: datetime


class Pause(SQLModel, table=True):
    """The database mirror of the pause flags (intake stopped, running runs left to finish), so a
    Redis restart cannot silently lift a pause; the same shape as the kill mirror."""

    __tablename__ = "pauses"

    scope: str = Field(primary_key=True, max_length=64)  # '*' for the whole fleet
    engaged: bool = False
    reason: str | None = Field(default=None, max_length=1000)
    actor: str | None = Field(default=None, max_length=255)
    changed_at: datetime


class WatchdogVerdict(SQLModel, table=True):
    """One watchdog pass: the overall colour and every check's colour and reason (JSON)."""

    __tablename__ = "watchdog_verdicts"
    __table_args__ = (Index("ix_watchdog_verdicts_at", "at"),)

    id: int | None = Field(default=None, primary_key=True)
    at: datetime
    status: str = Field(max_length=8)
    checks: str = Field(sa_column=Column(Text, nullable=False))
    host: str | None = Field(default=None, max_length=255)


class RunLogChunk(SQLModel, table=True):
    """A piece of a run's merged output, shipped by the worker that ran it (already masked and capped
    like the file on its disk), so any host can show it: read in `id` order, a run's log is the file."""

    __tablename__ = "run_log_chunks"
    __table_args__ = (UniqueConstraint("run_id", "attempt", "offset", name="uq_run_log_chunks_piece"),
                      Index("ix_run_log_chunks_run_id", "run_id", "id"))

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(max_length=32)
    attempt: int
    offset: int = Field(sa_column=Column(BigInteger, nullable=False))  # where it starts in that host's file
    at: datetime
    data: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


def table_of(model: type[SQLModel]) -> Table:
    """A model's Core table, for statements built once at import: the hot paths run those, since building
    a statement per call costs more in SQLAlchemy than its round trip costs in the database."""
    return cast(Table, model.__table__)  # type: ignore[attr-defined]  # SQLModel does not declare it


class FleetIdentity(SQLModel, table=True):
    """This fleet's id, made once with its database (one row): the mark it leaves on the Redis database it
    uses, so that a second fleet pointed at the same Redis database is told so instead of taking its messages."""

    __tablename__ = "fleet_identity"

    id: int = Field(default=1, primary_key=True)
    fleet_id: str = Field(max_length=32)
    created_at: datetime
