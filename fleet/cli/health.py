"""`fleet status`, `watchdog`, `sweep`: how the fleet is, and the chores that keep it so."""

from __future__ import annotations

import time
from datetime import datetime
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fleet.cli.common import (
    JsonOpt,
    another_fleets_redis,
    celery_sender,
    emit_json,
    fail,
    out,
    reading_services,
    services,
    shown,
    start_sentry,
    table,
)
from fleet.errors import ExitCode, PermissionDeniedError, UnavailableError

if TYPE_CHECKING:
    from fleet.services import Services

_COLOUR = {"green": "green", "amber": "yellow", "red": "red"}
# Beat runs the watchdog every minute and cron every few: a verdict older than this was not renewed,
# so it says how the fleet was, not how it is.
STALE_VERDICT_S = 600.0


def status(as_json: JsonOpt = False) -> None:
    """The whole fleet on one screen: kill switch, spend, runs, breakers, DLQ, queues, beat, watchdog.

    Example: fleet status --json
    """
    from fleet.state import snapshot

    svc = reading_services()
    picture = snapshot(svc)
    another_fleets_redis(svc, refuse=False, done="what status shows from Redis is ANOTHER fleet's: ")
    if as_json:
        emit_json(picture)
    else:
        _print_status(picture)
        if picture["redis"] == "ok" and not picture["beat"]["leader"]:
            from fleet.supervisor import mask_redis_url  # fleet up's module, heavy: only for a fleet that is down

            out.print(f"no beat leads on {mask_redis_url(svc.settings.broker_url)}: is the fleet running? `fleet up` "
                      "in its folder starts it; from elsewhere, export FLEET_REDIS_URL_FILE as its banner printed",
                      style="yellow", markup=False, highlight=False)
    if picture["redis"] != "ok":
        # The database's part is printed above; a cron or a script reading only the exit code must still
        # learn that the fleet is half seen (75, as the README's exit-code table says for Redis down; 77 for
        # refused credentials, which no retry fixes).
        error = PermissionDeniedError if picture["redis"].startswith("refused") else UnavailableError
        fail(error(f"Redis {picture['redis']}: queues, breakers, canaries and beat could not be read (the rest "
                   "is the database's)"))


def _print_status(p: dict[str, Any]) -> None:
    from fleet.ledger import amount

    if p["kill"]:
        for k in p["kill"]:
            out.print(f"[bold red]KILLED[/] {shown(k['scope'])} since {k['since'][:19]} by {shown(k['actor'])}: "
                      f"{shown(k['reason'] or '-')} (nothing starts; running agents were stopped)")
    else:
        out.print("[green]kill switch released[/]")
    for pause in p["pauses"]:
        # An agent's own pause gives its reason (`fleet_done`); a flag set by hand can say anything.
        out.print(f"[bold yellow]PAUSED[/] {shown(pause['scope'])} since {(pause['since'] or '?')[:19]} by "
                  f"{shown(pause['actor'] or '?')}: {shown(pause['reason'] or '-')} "
                  "(nothing new starts; running runs finish)")
    verdict = p.get("watchdog")
    if verdict:
        out.print(f"watchdog: [{_COLOUR[verdict['status']]}]{verdict['status']}[/] at {verdict['at'][:19]}"
                  + _staleness(p["at"], verdict["at"]))
        for check in verdict["checks"]:
            if check["status"] != "green":
                colour = _COLOUR[check["status"]]
                out.print(f"  {check['name']}: [{colour}]{check['status']}[/] {shown(check['reason'])}")
    spend = table("scope", "spent $", "reserved $", "cap $", title=f"spend {p['spend']['day']}")
    for s in p["spend"]["scopes"]:
        spend.add_row(s["scope"], f"{s['spent_usd']:.4f}", f"{s['reserved_usd']:.4f}",
                      "-" if s["cap_usd"] is None else amount(s["cap_usd"]))
    out.print(spend)
    out.print("runs (24 h): " + (", ".join(f"{k} {v}" for k, v in sorted(p["runs_24h"].items())) or "none"))
    out.print(f"running: {len(p['running'])}, queued: {p['queued']}")
    for r in p["running"]:
        where = f"pid {r['pid']}" if r["pid"] is not None else "starting"  # claimed; its agent not spawned yet
        out.print(f"  running {r['run_id']} {r['agent']} attempt {r['attempt']} on {r['host']} {where}")
    out.print(f"dead letters: {p['dlq_depth']}")
    if p["redis"] != "ok":
        out.print(f"[red]Redis {p['redis']}[/]")
        return
    out.print(f"queues: {p['queues']}")
    open_ = {a: b.get("state") for a, b in p["breakers"].items() if b.get("state", "closed") != "closed"}
    out.print(f"breakers: {open_ or 'all closed'}")
    for queue, canary in p["canaries"].items():
        out.print(f"worker canary {queue}: last back {canary['seen'] or 'never'}")
    out.print(f"beat: leader {p['beat']['leader'] or 'none'}, last tick {p['beat']['last_tick'] or 'never'}")


def _staleness(now: str, at: str) -> str:
    """Nothing for a fresh verdict; for an old one, that it is stale, how old, and what to check."""
    age = (datetime.fromisoformat(now) - datetime.fromisoformat(at)).total_seconds()
    if age < STALE_VERDICT_S:
        return ""
    return (f" [bold red]STALE: {_duration(age)} old[/] (nothing renewed it: is beat running? "
            "`fleet watchdog` checks now)")


def _duration(seconds: float) -> str:
    """`2 h 5 min`, `3 d 4 h`: the two largest units that are not zero."""
    minutes = int(seconds // 60)
    units = [(minutes // 1440, "d"), (minutes // 60 % 24, "h"), (minutes % 60, "min")]
    return " ".join([f"{n} {unit}" for n, unit in units if n][:2]) or "0 min"


def watchdog_command(
    wait: Annotated[float, typer.Option(help="Seconds to wait for the canaries to come back.")] = 20.0,
    as_json: JsonOpt = False,
) -> None:
    """Check the fleet from anywhere (cron on another host): exit 0 green/amber, 1 red, 75 down, 77 auth, 78 config.

    Example: */5 * * * * fleet watchdog --json || page-me
    """
    from fleet import db, watchdog
    from fleet.services import check_redis

    svc = services()
    start_sentry()  # a red verdict is an alert
    check_redis(svc.redis)
    db.check(svc.engine)
    _push_canaries(svc, wait)
    verdict = watchdog.run_watchdog(svc, None, deadline_s=wait)
    if as_json:
        emit_json(verdict.to_json())
    else:
        out.print(f"watchdog: [{_COLOUR[verdict.status]}]{verdict.status}[/]")
        for check in verdict.checks:
            out.print(f"  [{_COLOUR[check.status]}]{check.status:<5}[/] {check.name}: {shown(check.reason)}",
                      highlight=False)
        for line in verdict.healed:
            out.print(f"  healed: {shown(line)}")
    raise typer.Exit(ExitCode.FAILURE if verdict.status == "red" else ExitCode.OK)


def _push_canaries(svc: Services, wait: float) -> None:
    """Send a canary through each queue now and give the workers `wait` seconds to return it."""
    from fleet import keys, watchdog
    from workers.tasks import send_canary

    sent = svc.now()
    stamp = sent.isoformat()
    for queue in watchdog.QUEUES:
        svc.redis.set(keys.canary_sent(queue), stamp)
        send_canary(queue, stamp)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if all(svc.redis.get(keys.canary(q)) == stamp for q in watchdog.QUEUES):
            return
        time.sleep(0.1)
    # A canary still out keeps its real send time (status and /health show its age later): run_watchdog
    # calls it overdue once it is older than `wait` by the wall clock, which the monotonic wait above
    # need not have reached exactly, so wait out any remainder.
    _sleep_past(sent, wait, svc)


def _sleep_past(start: datetime, seconds: float, svc: Services) -> None:
    """Return once more than `seconds` have passed since `start` by the services' clock."""
    remaining = seconds - (svc.now() - start).total_seconds()
    if remaining >= 0:
        time.sleep(remaining + 0.01)


class SweepName(str, Enum):
    """The sweeps."""

    reaper = "reaper"
    idempotency = "idempotency"
    retention = "retention"


def sweep(name: SweepName, as_json: JsonOpt = False) -> None:
    """Run one sweep now (beat runs them on schedule).

    Example: fleet sweep reaper
    """
    from fleet import sweeps

    svc = services()
    start_sentry()  # the reaper's dead letters and crash loops are alerts
    try:
        if name is SweepName.reaper:
            from workers.tasks import waiting_in_agents_queue

            report = sweeps.reap(svc, celery_sender(), waiting_in_agents_queue)
        elif name is SweepName.idempotency:
            report = sweeps.release_keys(svc)
        else:
            report = sweeps.prune(svc)
    except ConnectionError as exc:
        raise UnavailableError(str(exc)) from None
    if as_json:
        emit_json(report.to_json())
    else:
        out.print(f"sweep {name.value}: {report.counts or 'nothing to do'}")
