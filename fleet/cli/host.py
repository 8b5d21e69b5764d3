"""`fleet init`, `up`, `doctor`, `db upgrade`, `web`: setting up a host and running its parts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fleet.cli.common import celery_sender, out, settings

db_app = typer.Typer(help="Database schema.", no_args_is_help=True)


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


def up(
    workers: Annotated[int, typer.Option("--workers", "-w", min=1, max=64,
                                         help="Worker processes per queue.")] = 2,
    embedded: Annotated[bool, typer.Option(help="Start a private Redis-compatible server even if one "
                                           "answers on 6379.")] = False,
    no_beat: Annotated[bool, typer.Option("--no-beat", help="Do not start beat.")] = False,
    no_flower: Annotated[bool, typer.Option("--no-flower", help="Do not start Flower.")] = False,
    no_web: Annotated[bool, typer.Option("--no-web", help="Do not start the web page.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Stream every part's JSON log lines here "
                                          "instead of the status block (they go to LOG_DIR/PART.log otherwise).")
                       ] = False,
) -> None:
    """Run a whole single-host fleet in the foreground: migrations, worker, beat, Flower, web.

    Prints where each part listens and its credentials once, then a live status block; Ctrl-C stops it all.
    Example: fleet up --workers 2    |    fleet up -v
    """
    from fleet.supervisor import UpOptions, run_up

    code = run_up(settings(), UpOptions(workers=workers, embedded=embedded, beat=not no_beat,
                                        flower=not no_flower, web=not no_web, verbose=verbose), out.console)
    raise typer.Exit(code)


def doctor() -> None:
    """Check the configuration, Redis and the database; say what is wrong and how to fix it.

    Example: fleet doctor    (exit 78: bad config, 75: a service is down)
    """
    from fleet.doctor import run_doctor

    raise typer.Exit(run_doctor(settings(), out.console))


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Migrate the database to the latest schema, under a lock (safe from two hosts at once).

    Example: FLEET_DATABASE_URL=postgresql://fleet@db/fleet fleet db upgrade
    """
    from fleet import db

    s = settings()
    engine = db.make_engine(s.database_url)
    try:
        db.check(engine)
        db.upgrade(engine, revision)
        out.print(f"database at revision {db.current_revision(engine)}")
    finally:
        engine.dispose()


def web() -> None:
    """Serve the operator page, probes, /metrics and /api/state.

    Example: FLEET_WEB_TOKEN=$(openssl rand -hex 32) fleet web
    """
    from fleet import logs
    from fleet.services import build
    from fleet.web import serve

    s = settings()
    logs.configure("web")
    serve(build(s), celery_sender())  # the page's replays enqueue fleet.execute as `fleet dlq replay` does
