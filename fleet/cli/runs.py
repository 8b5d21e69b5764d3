"""`fleet dispatch`, `runs`, `logs`, `dlq`, `events`: starting work and reading what it did."""

from __future__ import annotations

import codecs
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from fleet.cli.common import (
    JsonOpt,
    actor,
    celery_sender,
    emit_json,
    err,
    out,
    reading_services,
    services,
    shown,
    start_sentry,
    table,
)
from fleet.errors import ExitCode

if TYPE_CHECKING:
    from fleet.dispatch import DispatchResult
    from fleet.models import DeadLetter, Run
    from fleet.services import Services

runs_app = typer.Typer(invoke_without_command=True)  # its help is runs_list's docstring, with the example
dlq_app = typer.Typer(help="The dead-letter queue: list, show, replay, purge.", no_args_is_help=True)

REFUSED_EXIT = ExitCode.IDLE  # refused by cap, busy, killed, breaker: nothing done


def run_exit_code(run: Run) -> int:
    """A finished run's exit code for the shell: the agent's own where it failed."""
    from fleet.models import RunStatus

    if run.status == RunStatus.SUCCEEDED:
        return ExitCode.OK
    if run.status in (RunStatus.IDLE, RunStatus.KILLED, RunStatus.ARCHIVED):
        return ExitCode.IDLE
    return run.exit_code if run.exit_code not in (None, 0) else ExitCode.FAILURE


def dispatch_command(
    agent: Annotated[str, typer.Argument(help="The agent's name in fleet.toml.")],
    key: Annotated[str | None, typer.Option("--key", "-k", help="Work key: the same key never runs twice.")] = None,
    payload: Annotated[str | None, typer.Option(help="JSON given to the agent as FLEET_PAYLOAD; @FILE reads it "
                                                "from a file, - from stdin (neither shows in `ps`).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would fire and every gate; write "
                                          "nothing.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the run to its end; exit with its code.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Dispatch one run of an agent (exit 3 when refused: busy, over cap, killed, breaker open).

    Example: fleet dispatch digest --key 2026-11-21 --payload '{"topic": "news"}' --wait
    """
    from fleet.dispatch import DispatchRequest, dispatch, payload_argument

    svc = services()
    start_sentry()  # a refusal over the cap is an alert
    request = DispatchRequest(agent, key, payload_argument(payload, sys.stdin), dry_run, actor=actor())
    result = dispatch(svc, request, (lambda *_: None) if dry_run else celery_sender())
    report_dispatch(svc, agent, result, as_json)
    if wait and result.run_id and not dry_run:
        final = follow_run(svc, result.run_id, quiet=as_json)
        raise typer.Exit(run_exit_code(final))


def report_dispatch(svc: Services, agent: str, result: DispatchResult, as_json: bool) -> None:
    """Print a dispatch's answer; exit 3 when nothing was done (refused or misdispatch)."""
    nothing_done = result.status in ("refused", "misdispatch")
    if as_json:
        emit_json(result.to_json())
    elif nothing_done:
        from fleet.refusals import explain

        # Why and what to do; the run id of a refusal names a row that was rolled back, so it is not shown.
        out.print(shown(explain(svc, agent, result)), highlight=False)  # a pause's reason may be an agent's
        _print_gates(result.to_json())
    else:
        _print_dispatch(result.to_json())
    if nothing_done:
        raise typer.Exit(REFUSED_EXIT)


def _print_dispatch(result: dict[str, Any]) -> None:
    status, reason = result["status"], result.get("reason")
    out.print(f"[bold]{status}[/bold] run {result.get('run_id') or '-'}" + (f" ({shown(reason)})" if reason else ""))
    if result.get("would_fire") and status == "dry_run":
        out.print(f"would fire: {shown(', '.join(result['would_fire']))}")
    if status == "duplicate" and reason in _ENDED_UNDONE:
        # The same key never runs twice, by design: say what runs that work again.
        out.print(f"  that key's run ended {reason.removeprefix('already ')}: a new --key runs it again"
                  + (" (or `fleet dlq replay ID`, ID from `fleet dlq list`)" if reason == "already dead" else ""),
                  highlight=False, markup=False)
    _print_gates(result)


# A duplicate of these ran and did not do its work: the same key will not run it again.
_ENDED_UNDONE = {f"already {s}" for s in ("failed", "killed", "dead", "abandoned", "archived")}


def _print_gates(result: dict[str, Any]) -> None:
    for name, gate in result.get("gates", {}).items():
        mark = "[green]open[/green]" if gate["ok"] else "[red]closed[/red]"
        out.print(f"  gate {name:<8} {mark}  {shown(gate['detail'])}")


def follow_run(svc: Services, run_id: str, quiet: bool = False, timeout: float | None = None) -> Run:
    """Wait for a run to end, showing its status as it changes."""
    from fleet.models import TERMINAL

    deadline = None if timeout is None else time.monotonic() + timeout
    last = None
    seen = "queued"  # a dispatch that returned a run id queued it
    try:
        with err.status(f"run {run_id}: waiting", spinner="dots") as spinner:
            while True:
                run = load_run(svc, run_id)
                seen = str(getattr(run.status, "value", run.status))
                if run.status != last and not quiet:
                    spinner.update(f"run {run_id}: {run.status} (attempt {run.attempt})")
                    last = run.status
                if run.status in TERMINAL:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    break
                time.sleep(0.2)
    except KeyboardInterrupt:
        _stopped_waiting(run_id, seen)
    if not quiet:
        out.print(f"run {run_id} ended [bold]{run.status}[/bold]"
                  + (f", exit {run.exit_code}" if run.exit_code is not None else "")
                  + (f": {shown(run.error)}" if run.error else ""))
    return run


def _stopped_waiting(run_id: str, status: str) -> NoReturn:
    """Ctrl-C stops the waiting, not the run: say so (a bare 130 read as "cancelled"), and how to follow it."""
    err.print(f"stopped waiting: run {run_id} is still {status} and goes on (Ctrl-C stops only the waiting); "
              f"follow it with `fleet logs -f {run_id}` or `fleet runs show {run_id}`", highlight=False, markup=False)
    raise typer.Exit(130)  # 128 + SIGINT, as the shell's own


def load_run(svc: Services, run_id: str) -> Run:
    """A run by id (69 when unknown)."""
    from fleet import db, store
    from fleet.errors import NotFoundError

    if not run_id.isascii():  # run ids are hex; argv bytes that are not UTF-8 (lone surrogates) no database encodes
        raise NotFoundError(f"no run {run_id!r}")
    with db.session(svc.engine) as session:
        run = store.get_run(session=session, run_id=run_id)
    if run is None:
        raise NotFoundError(f"no run {run_id!r}")
    return run


def _cell(value: int | None) -> str:
    """A table cell: blank for no value, and 0 shown as 0 (an exit code of 0 is an answer)."""
    return "" if value is None else str(value)


def run_json(run: Run) -> dict[str, Any]:
    """A run as stable JSON."""
    from fleet.models import RunStatus

    data = run.model_dump(mode="json")
    data["status"] = str(run.status.value if isinstance(run.status, RunStatus) else run.status)
    data["cost_usd"] = run.cost_micros / 1_000_000
    return data


@runs_app.callback()
def runs_list(
    ctx: typer.Context,
    agent: Annotated[str | None, typer.Option(help="Only this agent's runs.")] = None,
    status: Annotated[str | None, typer.Option(help="Only runs with this status.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10000)] = 50,
    as_json: JsonOpt = False,
) -> None:
    """List the newest runs.

    Example: fleet runs --agent digest --status dead --json
    """
    if ctx.invoked_subcommand is not None:
        return
    from fleet import db, store
    from fleet.config import AGENT_NAME
    from fleet.errors import BadInputError
    from fleet.models import RunStatus

    if status is not None and status not in {s.value for s in RunStatus}:
        raise BadInputError(f"unknown status {status!r}; one of {', '.join(s.value for s in RunStatus)}")
    if agent is not None and not AGENT_NAME.match(agent):  # a removed agent's runs are still listed by its name
        raise BadInputError(f"--agent {agent!r} cannot name an agent (lowercase letters, digits, - and _)")
    svc = reading_services()
    with db.session(svc.engine) as session:
        rows = store.list_runs(session=session, agent=agent, status=status, limit=limit)
        if agent is not None and not rows and svc.config.agents and agent not in svc.config.agents \
                and not store.list_runs(session=session, agent=agent, status=None, limit=1):
            svc.config.agent(agent)  # named nowhere, by the file or a run: a typo, 69 with the known names
    if as_json:
        emit_json([run_json(r) for r in rows])
        return
    grid = table("run", "agent", "work key", "status", "attempt", "exit", "cost $", "created")
    for r in rows:
        grid.add_row(r.id, r.agent, shown(r.work_key[:40]), str(r.status), str(r.attempt), _cell(r.exit_code),
                      f"{r.cost_micros / 1e6:.4f}", r.created_at.isoformat(timespec="seconds"))
    out.print(grid)


@runs_app.command("show")
def runs_show(run_id: str, as_json: JsonOpt = False) -> None:
    """Show one run and its audit trail.

    Example: fleet runs show 3f2a...
    """
    from fleet import db, store
    from fleet.executor import run_log_path

    svc = reading_services()
    run = load_run(svc, run_id)
    with db.session(svc.engine) as session:
        events = store.run_events(session=session, run_id=run_id)
    data = run_json(run) | {"events": [e.model_dump(mode="json") for e in events],
                            "log": str(run_log_path(svc.settings.log_dir, run_id))}
    if as_json:
        emit_json(data)
        return
    for key, value in data.items():
        if key != "events" and value not in (None, ""):
            out.print(f"{key:>15}: {shown(value)}", highlight=False)  # the error, the payload, the work key
    for e in events:
        out.print(f"  {e.at.isoformat(timespec='seconds')} {e.kind} {shown(e.detail or '')}", highlight=False)


def logs(
    run_id: str,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the run ends.")] = False,
    raw: Annotated[bool, typer.Option("--raw", help="The bytes as the agent printed them, escape sequences "
                                      "included (for a file, or a pager that shows them itself).")] = False,
) -> None:
    """Print a run's output (merged stdout and stderr), wherever it ran: control characters and bidi controls
    shown as escapes (\\x1b), its lines kept; --raw prints the bytes as they are.

    Example: fleet logs 3f2a... -f
    """
    from fleet import db, runlog
    from fleet.executor import run_log_path
    from fleet.models import TERMINAL

    svc = reading_services()
    run = load_run(svc, run_id)
    with db.session(svc.engine) as session:
        shipped = runlog.has_log(session, run_id)
    path = run_log_path(svc.settings.log_dir, run_id)
    output = LogOutput(raw)
    if not shipped and path.exists() and run.status in TERMINAL:
        _print_from(path, 0, output)  # a run from before logs were shipped: this host's file
        output.close()
        return
    last = _print_chunks(svc, run_id, 0, output)
    while follow and run.status not in TERMINAL:
        time.sleep(0.2)
        last = _print_chunks(svc, run_id, last, output)
        run = load_run(svc, run_id)
    last = _print_chunks(svc, run_id, last, output)
    output.close()
    if last == 0:
        err.print(f"(no output recorded for run {run_id})")
    if follow:  # the output is the agent's own; how it ended goes beside it, so a kill is not taken for the end
        how = f", exit code {run.exit_code}" if run.exit_code is not None else ""
        err.print(f"fleet: run {run_id} ended {run.status}{how}" + (f": {shown(run.error)}" if run.error else ""),
                  highlight=False, markup=False)


class LogOutput:
    """Where `fleet logs` prints a run's output: its bytes as they are (`raw`), or decoded as they come and made
    inert (redaction.visible, lines kept). A character may straddle two chunks, and so may a CRLF: both wait."""

    def __init__(self, raw: bool) -> None:
        self.raw = raw
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._cr = ""  # a CR that ended the last piece: the start of a CRLF, or a bare CR

    def write(self, data: bytes) -> None:
        """Print one piece of the output."""
        if self.raw:
            typer.echo(data, nl=False)
            return
        text = self._cr + self._decoder.decode(data)
        text, self._cr = (text[:-1], "\r") if text.endswith("\r") else (text, "")
        self._echo(text)

    def close(self) -> None:
        """Print what was held back (the output has ended)."""
        if not self.raw:
            self._echo(self._cr + self._decoder.decode(b"", final=True))

    @staticmethod
    def _echo(text: str) -> None:
        from fleet.redaction import visible

        if text:
            typer.echo(visible(text, lines=True), nl=False)


def _print_chunks(svc: Any, run_id: str, after: int, output: LogOutput) -> int:
    """Print the run's shipped chunks after id `after`; the last id printed."""
    from fleet import db, runlog

    while True:
        with db.session(svc.engine) as session:
            rows = runlog.chunks(session, run_id, after)
        for _, data in rows:
            output.write(data)
        if rows:
            after = rows[-1][0]
        if len(rows) < 64:
            return after


def _print_from(path: Path, position: int, output: LogOutput) -> int:
    if not path.exists():
        return position
    with path.open("rb") as handle:
        handle.seek(position)
        chunk = handle.read()
    output.write(chunk)
    return position + len(chunk)


# ---------------------------------------------------------------- dead letters


def dead_json(dead: DeadLetter) -> dict[str, Any]:
    """A dead letter as stable JSON."""
    return dead.model_dump(mode="json")


@dlq_app.command("list")
def dlq_list(as_json: JsonOpt = False) -> None:
    """List dead letters, newest first.

    Example: fleet dlq list --json
    """
    from fleet import db, store

    svc = reading_services()
    with db.session(svc.engine) as session:
        rows = store.list_dead_letters(session=session)
    if as_json:
        emit_json([dead_json(d) for d in rows])
        return
    grid = table("id", "agent", "run", "reason", "attempts", "exit", "error", "replayed as")
    for d in rows:
        grid.add_row(str(d.id), d.agent, d.run_id, d.reason, str(d.attempts), _cell(d.exit_code),
                      shown((d.last_error or "")[:60]), d.replayed_run_id or "")
    out.print(grid)


@dlq_app.command("show")
def dlq_show(dead_id: int, as_json: JsonOpt = False) -> None:
    """Show one dead letter with the tail of its output.

    Example: fleet dlq show 7
    """
    from fleet import dlq
    from fleet.redaction import visible

    dead = dlq.get(reading_services(), dead_id)
    if as_json:
        emit_json(dead_json(dead))
        return
    for key, value in dead_json(dead).items():
        if key != "output_tail":
            out.print(f"{key:>15}: {shown(value)}", highlight=False)
    out.print("--- output tail ---")
    typer.echo(visible(dead.output_tail or "", lines=True))  # what the agent printed, inert


@dlq_app.command("replay")
def dlq_replay(dead_id: int, as_json: JsonOpt = False) -> None:
    """Run a dead letter's work again (once: a second replay returns the first).

    Example: fleet dlq replay 7
    """
    from fleet import dlq

    svc = services()
    start_sentry()  # the replay is a dispatch: a refusal over the cap is an alert
    agent = dlq.get(svc, dead_id).agent
    report_dispatch(svc, agent, dlq.replay(svc, dead_id, celery_sender(), actor()), as_json)


@dlq_app.command("purge")
def dlq_purge(
    dead_ids: Annotated[list[int] | None, typer.Argument(help="Dead letter ids; none with --all.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Purge every dead letter.")] = False,
) -> None:
    """Delete dead letters for good.

    Example: fleet dlq purge 7 8   |   fleet dlq purge --all
    """
    if bool(dead_ids) == all_:  # neither, or both: `purge 7 --all` must not purge what 7 did not name
        from fleet.errors import BadInputError

        raise BadInputError("name dead letter ids, or pass --all (not both)" if all_
                            else "name dead letter ids, or pass --all")
    from fleet import dlq

    removed = dlq.purge(services(), None if all_ else list(dead_ids or []), actor())
    out.print(f"purged {removed} dead letter(s)")


# ---------------------------------------------------------------- audit trail


def events(
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events.")] = False,
    limit: Annotated[int, typer.Option(min=1, max=100000, help="How many recent events.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """Print the audit trail: who dispatched what, every status change, every switch thrown.

    Example: fleet events -f --json
    """
    from fleet import db, store

    svc = reading_services()
    with db.session(svc.engine) as session:
        newest = store.recent_events(session=session, limit=limit)
    last = _print_events(newest, as_json, 0)
    while follow:
        time.sleep(0.5)
        with db.session(svc.engine) as session:
            last = _print_events(store.events_after(session=session, after_id=last), as_json, last)


def _print_events(rows: list[Any], as_json: bool, last: int) -> int:
    for e in rows:
        if as_json:
            typer.echo(json.dumps(e.model_dump(mode="json"), sort_keys=True))
        else:
            out.print(f"{e.at.isoformat(timespec='seconds')} {e.kind:<18} {e.agent or '-':<12} "
                      f"{e.run_id or '-'} {shown(e.actor or '')} {shown(e.detail or '')}", highlight=False)
        last = e.id or last
    return last
