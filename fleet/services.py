"""The clients a process needs, built once at its entry point (after any fork) and passed down."""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import TYPE_CHECKING

import redis
from redis import Redis

from fleet import logs
from fleet.admission import Admissions
from fleet.breaker import Breakers
from fleet.config import FleetConfig, Settings, Settling, load_fleet_config, mtime_of, still_settling
from fleet.errors import (
    ConfigError,
    FleetError,
    PermissionDeniedError,
    SchemaError,
    UnavailableError,
    missing_database,
    refused_credentials,
)
from fleet.locks import Leases

if TYPE_CHECKING:  # the database layer is imported when an engine is built: `fleet kill` needs Redis first
    from sqlalchemy import Engine


# A configuration read while its file was still settling: no mtime equals it, so the file counts as changed (a
# change pending) and is read again once it has settled.
NOT_SETTLED = float("-inf")


def utcnow() -> datetime:
    """The wall clock, timezone-aware UTC."""
    return datetime.now(UTC)


def redis_client(url: str, *, blocking: bool = False, timeout_s: float = 5.0) -> redis.Redis:
    """A Redis client with short timeouts, so a dead server is noticed in seconds, not minutes."""
    return redis.Redis.from_url(url, socket_connect_timeout=min(2.0, timeout_s),
                                socket_timeout=None if blocking else timeout_s,
                                health_check_interval=30, decode_responses=True)


# PostgreSQL's SQLSTATEs for a schema that is missing or behind: undefined_table, undefined_column.
_SCHEMA_SQLSTATES = frozenset({"42P01", "42703"})
# SQLite has no SQLSTATE, only words: a table, or a column read or written, that is not there.
_SQLITE_SCHEMA_WORDS = ("no such table", "no such column", "has no column named")


def _schema_missing(exc: Exception) -> bool:
    """Did the database refuse a statement because its tables are missing or older than this Fleet?"""
    orig = getattr(exc, "orig", None)
    if orig is None:
        return False
    if getattr(orig, "sqlstate", None) in _SCHEMA_SQLSTATES or getattr(orig, "pgcode", None) in _SCHEMA_SQLSTATES:
        return True
    return type(orig).__module__ == "sqlite3" and any(words in str(orig) for words in _SQLITE_SCHEMA_WORDS)


def as_fleet_error(exc: Exception) -> FleetError:
    """A Redis or database failure as the error the CLI maps to its exit code: refused credentials
    are 77 (loud: retrying will not help), a missing or older schema 78 (`fleet db upgrade` fixes it,
    retrying never does), anything else is 75 (down; safe to retry)."""
    text = str(getattr(exc, "orig", exc) or exc.__class__.__name__).strip().splitlines()
    detail = text[0] if text else exc.__class__.__name__
    if _schema_missing(exc):
        return SchemaError(detail)
    if isinstance(exc, redis.AuthenticationError | redis.AuthenticationWrongNumberOfArgsError) or (
            isinstance(exc, redis.ResponseError) and "NOAUTH" in str(exc)):
        return PermissionDeniedError(f"Redis refused the credentials: {detail}")
    if isinstance(exc, redis.RedisError):
        return UnavailableError(f"Redis unreachable: {detail} (nothing was written; safe to retry)")
    if refused_credentials(detail):
        return PermissionDeniedError(f"the database refused the credentials: {detail}")
    return missing_database(detail) or UnavailableError(
        f"database unreachable: {detail} (nothing was written; safe to retry)")


def check_redis(client: redis.Redis) -> None:
    """Raise UnavailableError (or PermissionDeniedError) when Redis does not answer."""
    try:
        client.ping()
    except redis.RedisError as exc:
        raise as_fleet_error(exc) from None


@dataclass
class Services:
    """Settings, the validated fleet.toml, a database engine, a Redis client and the clock."""

    settings: Settings
    config: FleetConfig
    engine: Engine
    redis: redis.Redis
    now: Callable[[], datetime] = utcnow
    host: str = field(default_factory=socket.gethostname)
    config_mtime: float | None = None  # the file's mtime when `config` was read; NOT_SETTLED: read mid-save
    settling: Settling = field(default_factory=Settling)  # how long a changed file has been waited for

    @cached_property
    def leases(self) -> Leases:
        """Slot leases on this Redis."""
        return Leases(self.redis)

    @cached_property
    def fast_redis(self) -> Redis:
        """A client with a one-second timeout for the watch loop: a hung Redis must not hold up a stop."""
        return redis_client(self.settings.broker_url, timeout_s=1.0)

    @cached_property
    def instant_redis(self) -> Redis:
        """A client with a quarter-second timeout for the look just before an agent's spawn: the claim read
        Redis a moment ago, and a Redis that stopped answering since must not start an agent a second later."""
        return redis_client(self.settings.broker_url, timeout_s=0.25)

    @cached_property
    def leases_fast(self) -> Leases:
        """Slot leases through the fast client (the watch loop's renewals)."""
        return Leases(self.fast_redis)

    @cached_property
    def admissions(self) -> Admissions:
        """A run's Redis work in one round trip at admission, claim and finish."""
        return Admissions(self.redis)

    @cached_property
    def fleet_id(self) -> str:
        """This fleet's id (fleet/tenancy.py), read once from its database."""
        from fleet import tenancy

        return tenancy.fleet_id(self.engine)

    @cached_property
    def breakers(self) -> Breakers:
        """Circuit breakers on this Redis."""
        return Breakers(self.redis)

    def refresh_config(self) -> bool:
        """Pick up a changed fleet.toml (checked by mtime); a bad file is reported and the last good kept."""
        path = self.settings.config
        mtime = mtime_of(path)
        if mtime is None:
            return False
        if self.config_mtime is None:
            self.config_mtime = mtime
        if mtime == self.config_mtime or self.settling.wait(mtime):
            return False  # a file still being saved is looked at again by a later task
        self.config_mtime = mtime
        try:
            self.config = load_fleet_config(path)
        except ConfigError as exc:
            logs.get(__name__).error("config.invalid", error=str(exc), keeping="last good configuration")
            return False
        logs.get(__name__).info("config.reloaded", agents=sorted(self.config.agents))
        return True

    def config_change_pending(self) -> bool:
        """Whether fleet.toml changed since it was last taken (it is settling): an agent missing from the
        configuration in hand may be in the new file, so nothing is buried for its absence until it is taken."""
        if self.config_mtime is None:  # never refreshed: this process runs on the configuration it was given
            return False
        mtime = mtime_of(self.settings.config)
        return mtime is not None and mtime != self.config_mtime

    def close(self) -> None:
        """Release sockets and pooled connections."""
        self.redis.close()
        for name in ("fast_redis", "instant_redis"):
            if name in self.__dict__:
                self.__dict__[name].close()
        self.engine.dispose()


def build(settings: Settings, config: FleetConfig | None = None) -> Services:
    """Connect lazily (no I/O here): engines and pools open their first connection on first use."""
    from fleet import db

    mtime = None  # the first refresh_config takes the file's mtime as the one of what was read
    if config is None:
        # A file read while it may be in the middle of an in-place save (a pool child's first task) is read
        # again once it settles: the finished file may keep the mtime of the empty one (both writes in one
        # timestamp tick), and would never be seen as a change.
        settling = mtime_of(settings.config)
        config = load_fleet_config(settings.config)
        if settling is not None and still_settling(settling):
            mtime = NOT_SETTLED
    return Services(
        settings=settings,
        config=config,
        engine=db.make_engine(settings.database_url, settings.db_timeout_s),
        redis=redis_client(settings.broker_url),
        config_mtime=mtime,
    )
