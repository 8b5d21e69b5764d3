"""What every `fleet` command shares, below them all: the consoles, the global options, settings and
services, JSON output, and the mapping of failures to exit codes.

Nothing heavy is imported here. SQLAlchemy, redis, Sentry and rich cost most of a second to import,
so each is imported by the command that needs it, when it runs: `fleet --help` renders without
them, and `fleet kill` loads only what the kill needs before the flag reaches Redis.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import socket
import sys
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any, NoReturn, TextIO, cast

import typer

from fleet.errors import ExitCode, FleetError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.status import Status
    from rich.table import Table

    from fleet.config import FleetConfig, Settings
    from fleet.dispatch import Sender
    from fleet.services import Services

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON (stable keys) instead of a table.")]


class _State:
    config_path: Path | None = None
    soft_fail: bool = False
    settings: Settings | None = None
    command: str = "cli"
    config_refused: bool = False  # went on without a valid fleet.toml, or on another fleet's Redis: 78 at its end


state = _State()


# ---------------------------------------------------------------- output


class LazyConsole:
    """A rich Console built on first use: importing rich is a cost `fleet kill` should not pay up front."""

    def __init__(self, *, stderr: bool) -> None:
        self._stderr = stderr

    @cached_property
    def console(self) -> Console:
        """The real Console. Piped output is for scripts and pagers: never cut it at 80 columns."""
        from rich.console import Console

        if self._stderr:
            return Console(stderr=True, soft_wrap=True)
        return Console(soft_wrap=True, width=None if sys.stdout.isatty() else 1000)

    def print(self, *objects: Any, **options: Any) -> None:
        """Console.print."""
        self.console.print(*objects, **options)

    def print_json(self, text: str, **options: Any) -> None:
        """Console.print_json."""
        self.console.print_json(text, **options)

    def status(self, message: str, **options: Any) -> Status:
        """Console.status: a spinner while something is awaited."""
        return self.console.status(message, **options)


out = LazyConsole(stderr=False)
err = LazyConsole(stderr=True)


def shown(value: object, *, lines: bool = False) -> str:
    """Stored text that an agent, or anyone but Fleet, may have written (a reason, an error, an event's detail,
    an output tail), ready to print or to put in a table: every character that could drive the terminal as a
    visible escape (redaction.visible; `lines` keeps newlines and tabs), and rich markup escaped, so that
    `[bold red]` prints as it was written. --json output needs none of it: json.dumps escapes what it must."""
    from rich.markup import escape

    from fleet.redaction import visible

    return escape(visible("" if value is None else str(value), lines=lines))


def table(*headers: str, title: str | None = None) -> Table:
    """A table that folds long cells instead of cutting them: run ids must stay whole to be copied."""
    from rich.table import Table

    grid = Table(title=title)
    for header in headers:
        grid.add_column(header, overflow="fold")
    return grid


def emit_json(data: Any) -> None:
    """Print machine-readable output."""
    out.print_json(json.dumps(data, default=str), highlight=False)


# ---------------------------------------------------------------- settings, services, who acts


def settings() -> Settings:
    """The process settings, with --config applied (it wins over FLEET_CONFIG); logging set up once."""
    if state.settings is None:
        from fleet.config import load_settings, with_embedded_pointer

        loaded = load_settings()
        if state.config_path is not None:
            loaded = loaded.model_copy(update={"config": state.config_path})
        if state.command != "up":  # `fleet up` chooses its Redis itself and replaces the pointer, whatever it is
            loaded = with_embedded_pointer(loaded)
        _log_to_file(loaded)
        state.settings = loaded
    return state.settings


def fleet_config(s: Settings | None = None) -> FleetConfig:
    """The validated fleet.toml."""
    from fleet.config import load_fleet_config

    return load_fleet_config((s or settings()).config)


def services() -> Services:
    """Settings, config, database and Redis for a command that acts: on this fleet's Redis only."""
    from fleet.services import build

    svc = build(_with_a_database(settings()))
    another_fleets_redis(svc)
    return svc


def _with_a_database(s: Settings) -> Settings:
    """The settings, once their SQLite file is known to exist (78 otherwise): SQLite makes a missing file on
    connect, and an empty fleet.db left by a look in the wrong folder would then say "no tables"."""
    from fleet import db
    from fleet.errors import ConfigError

    missing = db.missing_sqlite_file(s.database_url)
    if missing is None:
        return s
    first = "" if s.config.exists() else f"`fleet init` writes {s.config.name} (there is none either), then "
    raise ConfigError(f"{missing} does not exist yet: no fleet has run here. {first}`fleet up` makes the database and "
                      "starts the fleet (`fleet db upgrade` only makes it); or run this in your fleet's folder, or set "
                      "FLEET_DATABASE_URL to its database")


def reading_services(*, loud: bool = True) -> Services:
    """`services()` for a command that only reads or lifts (status, runs, logs, dead letters, events, spend, a
    fleet-wide resume or pause): a fleet.toml that does not validate is said on stderr and the command goes on without
    its agents, since the running fleet keeps its last good file and at 2am its state must still be seen.
    `loud`: the command still exits 78 once it has shown what it could (a script sees the file is broken)."""
    from fleet.config import FleetConfig, FleetSection
    from fleet.errors import ConfigError
    from fleet.services import build

    s = _with_a_database(settings())
    try:
        config = fleet_config(s)
    except ConfigError as exc:
        err.print(f"fleet: {exc}\nfleet: going on without fleet.toml's agents and caps (a running fleet keeps its "
                  "last good file); fix it, then `fleet doctor`", highlight=False, markup=False)
        config = FleetConfig(path=s.config, fleet=FleetSection(), agents={})
        state.config_refused = state.config_refused or loud
    return build(s, config)


def another_fleets_redis(svc: Services, *, refuse: bool = True, done: str = "") -> None:
    """Refuse (78) to act on a Redis database another fleet's mark holds (fleet/tenancy.py): a terminal that
    kept another fleet's FLEET_REDIS_URL, or lost this one's, would pause, resume or dispatch in that fleet.
    `refuse=False`: said on stderr, and the command ends with 78 after its output (`done` says what it did
    there). A mark that cannot be read, or a database that cannot say this fleet's id, is left to the command."""
    import redis
    from sqlalchemy.exc import SQLAlchemyError

    from fleet import tenancy
    from fleet.errors import ConfigError

    try:
        other = tenancy.marked_by(svc.fast_redis)  # a quick look: a mark that cannot be read is the command's
        if other is None or other.fleet_id == svc.fleet_id:
            return
    except (redis.RedisError, SQLAlchemyError, LookupError):
        return
    from fleet.supervisor import mask_redis_url  # fleet up's module, heavy: only for a refusal

    problem = (f"{other.describe()}. This command's Redis is {mask_redis_url(svc.settings.broker_url)}: set "
               "FLEET_REDIS_URL, or FLEET_REDIS_URL_FILE as this fleet's `fleet up` printed it")
    if refuse:
        raise ConfigError(f"nothing was done: {problem}")
    err.print(f"fleet: {done}{problem}", highlight=False, markup=False)
    state.config_refused = True


def start_sentry() -> None:
    """Sentry for a command that raises alerts (or crashed), tagged with its name; nothing without a DSN."""
    from fleet import alerts

    alerts.init_sentry(settings(), state.command)


def actor() -> str:
    """Who is acting, for the audit trail."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"cli:{user}@{socket.gethostname()}"


def celery_sender() -> Sender:
    """The Celery sender, imported only by the commands that send (the core never imports Celery)."""
    from workers.tasks import send_execute

    return send_execute


# ---------------------------------------------------------------- logs


class LogFile:
    """Where a command's log lines go: appended as JSON to a file opened on the first line, so a
    command that logs nothing creates nothing; the real stderr when the file cannot be opened."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: IO[str] | None = None

    def _target(self) -> IO[str]:
        if self._handle is None:
            from fleet import hardening

            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # 0600: alerts name runs and agents; a run_as agent must not read them.
                self._handle = os.fdopen(hardening.append_private(self.path), "a", encoding="utf-8")
            except OSError:
                self._handle = sys.__stderr__ or sys.stderr
        return self._handle

    def write(self, text: str) -> int:
        """Append (and open the file first, the first time)."""
        return self._target().write(text)

    def flush(self) -> None:
        """Flush what was written, if anything was."""
        if self._handle is not None:
            self._handle.flush()


def _log_to_file(s: Settings) -> None:
    # A command prints its one clean answer; what the core logs on the way (an alert, a warning)
    # goes to <log_dir>/cli.jsonl, never between the command's own lines.
    from fleet import logs

    logs.configure("cli", stream=cast(TextIO, LogFile(s.log_dir / "cli.jsonl")))  # it has write and flush


# ---------------------------------------------------------------- exit codes


def service_error(exc: Exception) -> FleetError | None:
    """A Redis or database exception as the FleetError it means (75 down, 77 refused), else None.

    A library that was never imported cannot have raised: its module is looked up, not imported.
    """
    redis = sys.modules.get("redis")
    sa_exc = sys.modules.get("sqlalchemy.exc")
    if (redis is not None and isinstance(exc, redis.RedisError)) or (
            sa_exc is not None and isinstance(exc, sa_exc.SQLAlchemyError)):
        from fleet.services import as_fleet_error

        return as_fleet_error(exc)
    return None


def fail(exc: FleetError) -> NoReturn:
    """Say what went wrong on stderr and exit with the error's code."""
    err.print(f"fleet: {exc}{_pointer_hint(exc)}", highlight=False, markup=False)
    leave(exc.exit_code, str(exc))


def _pointer_hint(exc: FleetError) -> str:
    """When the Redis that is away was found through the folder's embedded-server pointer (config.py), where
    that URL came from: a `fleet up` killed outright leaves its pointer behind."""
    from fleet.config import embedded_pointer
    from fleet.errors import UnavailableError

    s = state.settings
    if not isinstance(exc, UnavailableError) or "Redis" not in str(exc) or s is None:
        return ""
    pointer = embedded_pointer(s.config)
    if s.redis_url_file != pointer:
        return ""
    return (f"\nfleet: this Redis URL is the one a `fleet up` of this folder left in {pointer}; if that fleet up "
            "is no longer running, delete it (or set FLEET_REDIS_URL)")


def leave(code: int, reason: str = "") -> NoReturn:
    """Exit with `code`; under --soft-fail a retryable failure (75) is recorded and exits 0 (for cron).
    Auth (77) and configuration (78) stay loud."""
    if state.soft_fail and code == ExitCode.TRANSIENT:
        with contextlib.suppress(FleetError, OSError):
            _soft_fail_record(reason or "exit 75")
        sys.exit(ExitCode.OK)
    sys.exit(code)


def _soft_fail_record(reason: str) -> None:
    from fleet import hardening
    from fleet.config import load_settings

    path = load_settings().log_dir / "soft-fail.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(hardening.append_private(path), "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"at": datetime.now(UTC).isoformat(), "argv": sys.argv[1:],
                                 "exit_code": int(ExitCode.TRANSIENT), "error": reason}) + "\n")
