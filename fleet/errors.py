"""One rooted error tree; each error carries the CLI exit code it maps to (DESIGN.md)."""

from __future__ import annotations

import re
from enum import IntEnum


def first_line(exc: BaseException) -> str:
    """An exception's first line for a log or a message: the driver's own error under a SQLAlchemy one
    (`orig`), else the exception itself; its class name when it says nothing."""
    lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class ExitCode(IntEnum):
    """The exit codes of the `fleet` command, also used by agents (sysexits.h where one fits)."""

    OK = 0
    FAILURE = 1
    IDLE = 3  # nothing done: idle, refused by cap, busy, killed
    USAGE = 65  # bad arguments or payload (EX_DATAERR)
    NOT_FOUND = 69  # unknown agent, run or dead letter (EX_UNAVAILABLE)
    TRANSIENT = 75  # a service is down; safe to retry (EX_TEMPFAIL)
    AUTH = 77  # permission or a revoked key (EX_NOPERM)
    CONFIG = 78  # configuration is invalid (EX_CONFIG)


class FleetError(Exception):
    """Root of every error Fleet raises on purpose."""

    exit_code: ExitCode = ExitCode.FAILURE


class ConfigError(FleetError):
    """The configuration (fleet.toml or FLEET_* settings) is invalid."""

    exit_code = ExitCode.CONFIG


SCHEMA_FIX = "the database has no Fleet tables (or is behind): run `fleet db upgrade`"


class SchemaError(ConfigError):
    """The database has no Fleet tables, or an older schema than this Fleet: `fleet db upgrade` fixes it,
    retrying does not (so 78, not 75)."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(SCHEMA_FIX + (f" ({detail})" if detail else ""))


class BadInputError(FleetError):
    """An argument, work key or payload is malformed."""

    exit_code = ExitCode.USAGE


class NotFoundError(FleetError):
    """An agent, run or dead letter does not exist."""

    exit_code = ExitCode.NOT_FOUND


class UnavailableError(FleetError):
    """Redis or the database cannot be reached; nothing was written."""

    exit_code = ExitCode.TRANSIENT


class PermissionDeniedError(FleetError):
    """Credentials are missing or refused."""

    exit_code = ExitCode.AUTH


class KillNotMirroredError(FleetError):
    """A kill is in force in Redis, but its database mirror could not be written yet (the watchdog will)."""

    exit_code = ExitCode.TRANSIENT  # `fleet kill` again is safe and writes the mirror


# PostgreSQL's refusals of who connects (SQLSTATE 28000 and 28P01), as libpq words them: no retry lets them in.
_REFUSED = re.compile(r'authentication failed|FATAL:\s+role "[^"]*" does not exist|no pg_hba\.conf entry')


def refused_credentials(detail: str) -> bool:
    """Whether a database's refusal says who connects is not let in (a wrong password or user): 77, not 75."""
    return _REFUSED.search(detail) is not None


_NO_DATABASE = re.compile(r'database "(?P<name>[^"]+)" does not exist')


def missing_database(detail: str) -> ConfigError | None:
    """PostgreSQL's refusal of a database never created (or misspelt), as configuration (78): no retry creates it,
    and the server that said so is up. None for any other failure."""
    found = _NO_DATABASE.search(detail)
    if found is None:
        return None
    return ConfigError(f"{detail}: create it (`createdb {found['name']}` on the server, or fix the name in "
                       "FLEET_DATABASE_URL), then run `fleet db upgrade`")
