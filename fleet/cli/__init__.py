"""The `fleet` command: every operator action, with the exit codes of DESIGN.md."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import redis
import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError
from typer import _click as click  # typer bundles its own click: catch its exceptions

from fleet import alerts, db, logs
from fleet.config import FleetConfig, Settings, load_fleet_config, load_settings
from fleet.errors import ExitCode, FleetError
from fleet.services import Services, as_fleet_error, build

app = typer.Typer(help="Fleet: run unattended agents on a Celery worker fleet, with safety rails.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")

# Piped output is for scripts and pagers: never cut it at 80 columns.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 1000)
err = Console(stderr=True, soft_wrap=True)


class _State:
    config_path: Path | None = None
    soft_fail: bool = False


state = _State()

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON (stable keys) instead of a table.")]


@app.callback()
def _global(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Path to fleet.toml "
                                                "(default: $FLEET_CONFIG or ./fleet.toml).")] = None,
    soft_fail: Annotated[bool, typer.Option("--soft-fail", help="Exit 0 on a retryable failure (75) and "
                                            "append it to logs/soft-fail.jsonl; for cron.")] = False,
) -> None:
    """Fleet: run unattended agents on a Celery worker fleet, with safety rails."""
    state.config_path = config
    state.soft_fail = soft_fail
    # Sentry for this command, tagged with its name (`fleet web` is the web process). Off without a DSN.
    alerts.init_sentry(load_settings(), ctx.invoked_subcommand or "cli")


def settings() -> Settings:
    """The process settings, with --config applied (it wins over FLEET_CONFIG)."""
    loaded = load_settings()
    if state.config_path is not None:
        loaded = loaded.model_copy(update={"config": state.config_path})
    return loaded


def fleet_config(s: Settings | None = None) -> FleetConfig:
    """The validated fleet.toml."""
    return load_fleet_config((s or settings()).config)


def services() -> Services:
    """Settings, config, database and Redis for one command."""
    return build(settings())


def table(*headers: str, title: str | None = None) -> Table:
    """A table that folds long cells instead of cutting them: run ids must stay whole to be copied."""
    grid = Table(title=title)
    for header in headers:
        grid.add_column(header, overflow="fold")
    return grid


def emit_json(data: Any) -> None:
    """Print machine-readable output."""
    out.print_json(json.dumps(data, default=str), highlight=False)


# ---------------------------------------------------------------- set-up


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="Where to write fleet.toml and keys/.")] = Path("."),
    force: Annotated[bool, typer.Option(help="Overwrite an existing fleet.toml.")] = False,
) -> None:
    """Write a starter fleet.toml and a private keys/ folder.

    Example: fleet init ./myfleet
    """
    from fleet.starter import write_starter

    for line in write_starter(directory, force=force):
        out.print(line)


@app.command()
def up(
    workers: Annotated[int, typer.Option("--workers", "-w", min=1, max=64,
                                         help="Worker processes per queue.")] = 2,
    embedded: Annotated[bool, typer.Option(help="Start a private Redis-compatible server even if one "
                                           "answers on 6379.")] = False,
    no_beat: Annotated[bool, typer.Option("--no-beat", help="Do not start beat.")] = False,
    no_flower: Annotated[bool, typer.Option("--no-flower", help="Do not start Flower.")] = False,
    no_web: Annotated[bool, typer.Option("--no-web", help="Do not start the web page.")] = False,
) -> None:
    """Run a whole single-host fleet in the foreground: migrations, worker, beat, Flower, web.

    Example: fleet up --workers 2
    """
    from fleet.supervisor import UpOptions, run_up

    code = run_up(settings(), UpOptions(workers=workers, embedded=embedded, beat=not no_beat,
                                        flower=not no_flower, web=not no_web))
    raise typer.Exit(code)


@app.command()
def doctor() -> None:
    """Check the configuration, Redis and the database; say what is wrong and how to fix it.

    Example: fleet doctor    (exit 78: bad config, 75: a service is down)
    """
    from fleet.doctor import run_doctor

    raise typer.Exit(run_doctor(settings(), out))


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Migrate the database to the latest schema, under a lock (safe from two hosts at once).

    Example: FLEET_DATABASE_URL=postgresql://fleet@db/fleet fleet db upgrade
    """
    s = settings()
    engine = db.make_engine(s.database_url)
    try:
        db.check(engine)
        db.upgrade(engine, revision)
        out.print(f"database at revision {db.current_revision(engine)}")
    finally:
        engine.dispose()


@app.command()
def web() -> None:
    """Serve the operator page, probes, /metrics and /api/state.

    Example: FLEET_WEB_TOKEN=secret fleet web
    """
    from fleet.web import serve

    s = settings()
    logs.configure("web")
    serve(build(s))


# ---------------------------------------------------------------- entry point


def _soft_fail_record(s: Settings, reason: str) -> None:
    path = s.log_dir / "soft-fail.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"at": datetime.now(UTC).isoformat(), "argv": sys.argv[1:],
                                 "exit_code": int(ExitCode.TRANSIENT), "error": reason}) + "\n")


def hoist_global_options(argv: list[str]) -> list[str]:
    """`--config` and `--soft-fail` may follow the command name too (`fleet dispatch x --config f`)."""
    front: list[str] = []
    rest: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--":
            rest += [arg, *args]
        elif arg in ("--config", "-c"):
            front += [arg, next(args, "")]
        elif arg.startswith("--config=") or arg == "--soft-fail":
            front.append(arg)
        else:
            rest.append(arg)
    return front + rest


def _exit_for(exc: FleetError) -> NoReturn:
    err.print(f"fleet: {exc}", highlight=False, markup=False)
    _exit(exc.exit_code, str(exc))


def _exit(code: int, reason: str = "") -> NoReturn:
    # --soft-fail: for cron, a retryable failure (75) is recorded and exits 0; 77 and 78 stay loud.
    if state.soft_fail and code == ExitCode.TRANSIENT:
        with contextlib.suppress(FleetError, OSError):
            _soft_fail_record(load_settings(), reason or "exit 75")
        sys.exit(ExitCode.OK)
    sys.exit(code)


def main() -> None:
    """Console-script entry point: every failure maps to its exit code, never a traceback."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        # Without standalone mode click returns a typer.Exit's code instead of exiting with it.
        code = app(args=hoist_global_options(sys.argv[1:]), standalone_mode=False)
        _exit(code if isinstance(code, int) else ExitCode.OK)
    except FleetError as exc:
        _exit_for(exc)
    except (redis.RedisError, SQLAlchemyError) as exc:
        _exit_for(as_fleet_error(exc))
    except typer.Exit as exc:
        _exit(exc.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except click.exceptions.UsageError as exc:
        exc.show()
        sys.exit(ExitCode.USAGE)
    except click.exceptions.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    finally:
        alerts.flush()  # a short-lived command must not exit before its alerts are sent


if __name__ == "__main__":
    main()


# The other command groups register themselves on `app` when imported.
from fleet import cli_health, cli_rails, cli_runs  # noqa: E402, F401
