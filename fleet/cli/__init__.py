"""The `fleet` command: every operator action, with the exit codes of DESIGN.md.

This module is the top of the package and the only one that knows every command: it builds the typer
`app` from the command modules (`host`, `health`, `rails`, `runs`), which import only `common`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from typer import _click as click  # typer bundles its own click: catch its exceptions

from fleet.cli import health, host, rails, runs
from fleet.cli.common import err, fail, leave, service_error, start_sentry, state
from fleet.errors import ExitCode, FleetError

app = typer.Typer(help="Fleet: run unattended agents on a Celery worker fleet, with safety rails.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


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
    state.settings = None
    state.command = ctx.invoked_subcommand or "cli"
    state.config_refused = False


# The order here is the order of `fleet --help`.
for command in (host.init, host.up, host.doctor, host.web):
    app.command()(command)
app.command("dispatch")(runs.dispatch_command)
app.command()(runs.logs)
app.command()(runs.events)
app.command()(health.status)
app.command("watchdog")(health.watchdog_command)
app.command()(health.sweep)
for command in (rails.kill, rails.pause, rails.resume, rails.spend, rails.agents):
    app.command()(command)
app.add_typer(host.db_app, name="db")
app.add_typer(runs.runs_app, name="runs")
app.add_typer(runs.dlq_app, name="dlq")


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


def main() -> None:
    """Console-script entry point: every failure maps to its exit code, never a traceback."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        # Without standalone mode click returns a typer.Exit's code instead of exiting with it.
        code = app(args=hoist_global_options(sys.argv[1:]), standalone_mode=False)
        code = code if isinstance(code, int) else ExitCode.OK
        leave(ExitCode.CONFIG if code == ExitCode.OK and state.config_refused else code)
    except FleetError as exc:
        fail(exc)
    except typer.Exit as exc:
        leave(exc.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except click.exceptions.UsageError as exc:
        exc.show()
        sys.exit(ExitCode.USAGE)
    except click.exceptions.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except Exception as exc:
        known = service_error(exc)
        if known is not None:
            fail(known)
        # A crash: Sentry (when a DSN is set) starts now, and its excepthook reports it on the way out.
        with contextlib.suppress(Exception):
            start_sentry()
        raise
    finally:
        alerts = sys.modules.get("fleet.alerts")
        if alerts is not None:
            alerts.flush()  # a short-lived command must not exit before its alerts are sent


if __name__ == "__main__":
    main()
