"""`fleet kill`, `resume`, `spend`, `agents`: the safety rails from the command line."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fleet.cli.common import (
    JsonOpt,
    actor,
    another_fleets_redis,
    emit_json,
    err,
    fleet_config,
    out,
    reading_services,
    services,
    settings,
    shown,
    start_sentry,
    table,
)
from fleet.keys import GLOBAL

if TYPE_CHECKING:
    from datetime import datetime
    from pathlib import Path

    from fleet.config import FleetConfig
    from fleet.services import Services


def kill(
    agent: Annotated[str | None, typer.Argument(help="One agent; the whole fleet when omitted.")] = None,
    reason: Annotated[str | None, typer.Option(help="Why (shown in status and the audit trail).")] = None,
    hard: Annotated[bool, typer.Option("--hard", help="Also revoke and terminate in-flight tasks through "
                                       "Celery, for a wedged worker.")] = False,
) -> None:
    """Stop everything now: intake stops at once, agents get SIGTERM within a second, SIGKILL after kill_grace_s.

    Example: fleet kill --reason "runaway spend"    |    fleet kill digest
    """
    config, scope = _kill_config(agent)
    now, who, raised = _raise_flag_first(scope, reason, hard)
    _refuse_without_a_database(scope, raised)
    from fleet import killswitch  # the database layer, for the mirror: after the flag is in force

    svc = _kill_services(config)
    engaged = killswitch.engage(svc.engine, svc.redis, scope=scope, reason=reason, actor=who, hard=hard, now=now)
    out.print(shown(engaged.describe() + (f": {reason}" if reason else "")))
    if hard:
        _hard_stop(svc, None if agent is None else scope)
    # Checked only now: the flag went up before anything was imported or read, since a kill must never wait.
    # A Redis that did not take the flag holds no kill of ours, and asking it again could wait out its timeout.
    if engaged.in_redis:
        another_fleets_redis(svc, refuse=False, done="the kill flag went up in ANOTHER fleet's Redis, which stops "
                             "that fleet's agents, not this one's (this fleet's database holds the kill): ")
    engaged.confirm()  # in force in Redis, mirror not written: 75, saying so


def _hard_stop(svc: Services, agent: str | None) -> None:
    """Revoke the wedged executes; the running runs come from the database, so one that is away leaves the kill
    in force and nothing revoked: said as such (75), never as a kill that did not happen."""
    from fleet.cli.common import service_error
    from fleet.errors import UnavailableError, first_line
    from workers.control import hard_stop

    try:
        revoked = hard_stop(svc, agent)
    except Exception as exc:
        if service_error(exc) is None:
            raise
        err.print(f"fleet: hard kill: nothing revoked, the running runs could not be read ({first_line(exc)}); "
                  "the kill IS in force in Redis: run `fleet kill --hard` again once the database answers",
                  highlight=False, markup=False)
        raise UnavailableError("the kill IS in force; only its --hard revoke waits for the database") from None
    out.print(f"hard kill: revoked and terminated {revoked} wedged fleet.execute task(s)")


def _kill_config(agent: str | None) -> tuple[FleetConfig, str]:
    """The configuration and the kill's scope. The kill needs only Redis and the mirror, so a bad fleet.toml is
    said on stderr and the kill goes on: fleet-wide, or for an agent the file still names (an emptied key
    file, a revocation in a hurry, must not stop that agent's kill)."""
    from fleet.config import FleetConfig, FleetSection
    from fleet.errors import ConfigError

    s = settings()
    try:
        config = fleet_config(s)
    except ConfigError as exc:
        if agent is not None and agent not in _agents_named_in(s.config):
            # without the file, one agent's name cannot be told from a typo: say what stops it anyway
            raise ConfigError(f"{exc}\nfleet: the file does not show {agent!r} as one of its agents, so it cannot "
                              f"be killed alone; `fleet kill` without an agent stops the whole fleet now, or fix "
                              f"{s.config.name} and run this again") from None
        where = "the whole fleet" if agent is None else f"agent {agent}"
        err.print(f"fleet: {exc}\nfleet: killing {where} anyway", highlight=False, markup=False)
        return FleetConfig(path=s.config, fleet=FleetSection(), agents={}), agent or GLOBAL
    return config, GLOBAL if agent is None else config.agent(agent).name


def _agents_named_in(path: Path) -> set[str]:
    """The agents' names in a fleet.toml that does not validate (none when it is not even TOML)."""
    import tomllib

    from fleet.config import AGENT_NAME

    try:
        tables = tomllib.loads(path.read_text(encoding="utf-8")).get("agents")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return set()
    return {name for name in tables if AGENT_NAME.match(name)} if isinstance(tables, dict) else set()


def _raise_flag_first(scope: str, reason: str | None, hard: bool) -> tuple[datetime, str, bool]:
    """The flag in Redis before anything else is imported or connected, so agents start stopping at once;
    (when, who, whether Redis took it) for the engagement that follows. A Redis that cannot take it is left to
    `engage`, which tries again and reports where the kill landed."""
    import redis

    from fleet.killflag import raise_flag
    from fleet.services import redis_client, utcnow

    now, who = utcnow(), actor()
    client = redis_client(settings().broker_url, timeout_s=1.0)  # a Redis that is away: engage() waits it out
    try:
        raise_flag(client, scope=scope, reason=reason, actor=who, at=now, hard=hard)
        raised = True
    except redis.RedisError:
        raised = False  # engage() says so
    finally:
        client.close()
    return now, who, raised


def _refuse_without_a_database(scope: str, raised: bool) -> None:
    """78 when the SQLite file the settings name does not exist (the wrong folder, at 2am): the mirror would be
    written into an empty fleet.db made in passing, and "the watchdog writes it" is untrue where no fleet runs.
    The flag, already up or not, is said as it is, with where to go instead."""
    from fleet import db
    from fleet.errors import ConfigError

    s = settings()
    missing = db.missing_sqlite_file(s.database_url)
    if missing is None:
        return
    from fleet.supervisor import mask_redis_url  # fleet up's module, heavy: only for a refusal
    where = "the whole fleet" if scope == GLOBAL else f"agent {scope}"
    redis_shown = mask_redis_url(s.broker_url)
    if raised:
        said = (f"the kill flag for {where} IS up in Redis {redis_shown} (a fleet using that Redis stops now), but "
                "it has no database mirror: a Redis restart would lift it, and `fleet resume` cannot from here")
    else:
        said = f"nothing was killed: Redis {redis_shown} did not take the flag"
    raise ConfigError(f"{said}. {missing} does not exist: no fleet has run in this folder. Run `fleet kill` in "
                      "your fleet's folder (or set FLEET_DATABASE_URL to its database); `fleet resume` there "
                      "lifts it")


def _kill_services(config: FleetConfig) -> Services:
    """The rest of what the kill needs: a bad FLEET_SENTRY_DSN is said on stderr and the kill goes on."""
    from fleet.errors import ConfigError
    from fleet.services import build

    s = settings()
    try:
        start_sentry()  # the kill is an alert
    except ConfigError as exc:
        err.print(f"fleet: {exc}; killing without Sentry (the alert goes to the log only)", highlight=False,
                  markup=False)
    return build(s, config)


def pause(
    agent: Annotated[str | None, typer.Argument(help="One agent; the whole fleet when omitted.")] = None,
    reason: Annotated[str | None, typer.Option(help="Why (shown in status and the audit trail).")] = None,
) -> None:
    """Stop intake, let running runs finish: ticks and dispatches are refused `paused` (exit 3).

    For maintenance; `fleet kill` is "stop now". `fleet resume [AGENT]` lifts it.
    Example: fleet pause --reason "db upgrade at 02:00"    |    fleet pause digest
    """
    from fleet import actions

    # Maintenance is when fleet.toml is being edited: the whole fleet's pause needs no agents, one agent's does.
    svc = _scope_services(agent)
    out.print(shown(actions.pause_intake(svc, agent=agent, reason=reason, actor=actor()).said), highlight=False)


def resume(
    agent: Annotated[str | None, typer.Argument(help="One agent; the whole fleet when omitted.")] = None,
) -> None:
    """Lift the kill switch and the pause (the operator's, or the one an agent put on itself).

    Example: fleet resume    |    fleet resume digest
    """
    from fleet import actions

    # One agent's name cannot be told from a typo without the file; the whole fleet's resume needs none.
    svc = _scope_services(agent)
    out.print(shown(actions.resume(svc, agent=agent, actor=actor()).said), highlight=False)


def _scope_services(agent: str | None) -> Services:
    """What a pause or a resume acts with: one agent's needs a valid fleet.toml (its name must not be a typo),
    the whole fleet's goes on without one. Either acts on this fleet's Redis only: pausing or lifting another
    fleet's would stop or start what its operator did not."""
    if agent is not None:
        from fleet.errors import ConfigError

        try:
            fleet_config()
        except ConfigError as exc:  # said with what it means for this agent's kill or pause, and what lifts it
            raise ConfigError(f"{exc}\nfleet: nothing changed for agent {agent}: whatever holds it (a kill, a pause) "
                              "is still in force. One agent's resume or pause needs a fleet.toml that validates "
                              "(it must tell the agent from a typo): fix it (`fleet doctor` names the problem), "
                              "then run this again; the running fleet keeps its last good file") from None
        return services()
    svc = reading_services(loud=False)
    another_fleets_redis(svc)
    return svc


def spend(
    day: Annotated[str | None, typer.Option(help="Budget day YYYY-MM-DD (default: today).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Spend per agent and fleet-wide: reserved and actual, against the caps.

    Example: fleet spend --json
    """
    from fleet.ledger import amount
    from fleet.state import spend_report

    svc = reading_services()
    data = spend_report(svc, day)
    if as_json:
        emit_json(data)
        return
    grid = table("scope", "spent $", "reserved $", "cap $", "left $")
    for row in data["scopes"]:
        grid.add_row(row["scope"], f"{row['spent_usd']:.4f}", f"{row['reserved_usd']:.4f}",
                      "-" if row["cap_usd"] is None else amount(row["cap_usd"]),
                      "-" if row["left_usd"] is None else f"{row['left_usd']:.4f}")
    out.print(f"budget day {data['day']} ({data['timezone']})")
    out.print(grid)


def agents(as_json: JsonOpt = False) -> None:
    """Each agent: schedule and next fire, caps, breaker, concurrency, and its key's fingerprint.

    Example: fleet agents --json
    """
    from zoneinfo import ZoneInfo

    from fleet import db, pause, store
    from fleet.ledger import amount

    svc = services()
    now = svc.now().astimezone(ZoneInfo(svc.config.fleet.timezone))
    rows: list[dict[str, Any]] = []
    with db.session(svc.engine) as session:
        last = {name: store.last_run(session=session, agent=name) for name in svc.config.agents}
        paused = {p.scope: p.reason or "paused" for p in pause.paused(session, svc.redis, [GLOBAL, *svc.config.agents])}
    for name, spec in svc.config.agents.items():
        schedule = spec.parsed_schedule
        previous = last[name]
        rows.append({
            "agent": name, "schedule": spec.schedule,
            "next_fire": schedule.next_after(now).isoformat() if schedule else None,
            "paused": paused.get(name) or paused.get(GLOBAL),
            "last_run": None if previous is None else {
                "run_id": previous.id, "status": str(getattr(previous.status, "value", previous.status)),
                "created_at": previous.created_at.isoformat()},
            "daily_cap_usd": spec.daily_cap_usd, "est_cost_usd": spec.est_cost_usd, "timeout_s": spec.timeout_s,
            "concurrency": spec.concurrency, "max_runs_per_day": spec.max_runs_per_day,
            "breaker": svc.breakers.state(name).get("state", "closed"),
            "key_fingerprint": fingerprint(spec.key_file.read_bytes()) if spec.key_file else None,
        })
    if as_json:
        emit_json(rows)
        return
    grid = table("agent", "schedule", "next fire", "cap $", "est $", "timeout", "slots", "breaker", "last run",
                 "key")
    for r in rows:
        last_run = r["last_run"]
        grid.add_row(str(r["agent"]), str(r["schedule"] or "-") + (" (paused)" if r["paused"] else ""),
                     str(r["next_fire"] or "-")[:19],
                     "-" if r["daily_cap_usd"] is None else amount(r["daily_cap_usd"]), amount(r["est_cost_usd"]),
                     f"{r['timeout_s']:.0f}s", str(r["concurrency"]), str(r["breaker"]),
                     f"{last_run['status']} {last_run['created_at'][:19]}" if last_run else "-",
                     str(r["key_fingerprint"] or "-"))
    out.print(grid)


def fingerprint(secret: bytes) -> str:
    """A short, non-reversible fingerprint of a key (never the key)."""
    return "sha256:" + hashlib.sha256(secret.strip()).hexdigest()[:12]
