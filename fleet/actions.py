"""What an operator's action does and what it says: kill, pause, resume, replay, purge, a dry run.

The web page's buttons and the CLI's `pause`/`resume` call these; each calls the same core the rest
of Fleet uses (fleet/killswitch.py, fleet/pause.py, fleet/dlq.py, fleet/dispatch.py) with the actor
it is given (`web:<who>`, `cli:<user>@<host>`) and returns an Outcome: a tone, one sentence, and any
detail lines. Surprises (a service down, an unknown agent or dead letter, a bad reason) raise from
the FleetError tree, as everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fleet import db, dlq, killswitch, pause, store
from fleet.dispatch import DispatchRequest, Gate, Sender, dispatch
from fleet.keys import GLOBAL
from fleet.refusals import explain
from fleet.services import Services


@dataclass(frozen=True)
class Outcome:
    """What an action did: green done, amber done with a caveat (or nothing to do), red refused."""

    tone: str
    said: str
    lines: list[str] = field(default_factory=list)
    gates: dict[str, Gate] = field(default_factory=dict)
    run_id: str | None = None


def scope_of(services: Services, agent: str | None) -> str:
    """'*' for the fleet, else the agent's name (NotFoundError, 69, for an unknown one)."""
    return GLOBAL if not agent or agent == GLOBAL else services.config.agent(agent).name


def _where(scope: str) -> str:
    return "the whole fleet" if scope == GLOBAL else f"agent {scope}"


def kill(services: Services, *, agent: str | None, reason: str | None, actor: str) -> Outcome:
    """Stop now: the kill switch for the fleet or one agent (Redis first, then the mirror)."""
    scope = scope_of(services, agent)
    engaged = killswitch.engage(services.engine, services.redis, scope=scope, reason=reason, actor=actor, hard=False,
                                now=services.now())
    said = engaged.describe() + (f": {reason}" if reason else "")
    if not engaged.mirrored:
        return Outcome("amber", said, [f"the kill IS in force, but its database mirror could not be written "
                                       f"({engaged.problem}): a Redis restart would lift it; kill again to retry"])
    return Outcome("green", said, ["intake stopped; running agents get SIGTERM within a second, SIGKILL "
                                   f"{services.config.fleet.kill_grace_s:g} s later"])


def pause_intake(services: Services, *, agent: str | None, reason: str | None, actor: str) -> Outcome:
    """Stop intake and let running runs finish; says so when the mirror alone holds the pause (Redis down),
    as a kill does."""
    scope = scope_of(services, agent)
    pause.engage(services.engine, services.redis, scope=scope, reason=reason, actor=actor, now=services.now())
    unreachable = _redis_unreachable(services)
    with db.session(services.engine) as session:
        running = store.count_running(session=session, agent=None if scope == GLOBAL else scope)
    where = _where(scope) if unreachable is None else (
        f"{_where(scope)}, in the database only ({unreachable}; dispatches refuse it from there, and its flag is "
        "put back in Redis once Redis answers)")
    return Outcome("green" if unreachable is None else "amber", f"paused {where}" + (f": {reason}" if reason else "")
                   + f"; {running} running run(s) left to finish (`fleet kill` stops them now)")


def _redis_unreachable(services: Services) -> str | None:
    """Why Redis cannot be reached, None when it answers. pause.engage returns quietly when the mirror took
    the pause and Redis did not, so the operator would read "paused" as "in force everywhere"."""
    import redis

    try:
        services.redis.ping()
    except redis.RedisError as exc:
        return f"Redis unreachable: {exc.__class__.__name__}"
    return None


def resume(services: Services, *, agent: str | None, actor: str) -> Outcome:
    """Lift the kill switch and the pause of the fleet or one agent, and say which were lifted."""
    scope = scope_of(services, agent)
    # Each release says whether it lifted anything (a flag only Redis held counts: it was in force), read in
    # its own transaction, so what is said here is what the audit trail records.
    killed = killswitch.release(services.engine, services.redis, scope=scope, actor=actor, now=services.now())
    paused = pause.release(services.engine, services.redis, scope=scope, actor=actor, now=services.now())
    lifted = [name for name, was in (("kill switch released", killed), ("pause lifted", paused)) if was]
    said = f"resumed {_where(scope)}" + (f" ({', '.join(lifted)})" if lifted else " (it was neither killed nor paused)")
    return Outcome("green" if lifted else "amber", said)


def replay(services: Services, *, dead_id: int, actor: str, send: Sender) -> Outcome:
    """Run a dead letter's work again, once (a second replay returns the first)."""
    agent = dlq.get(services, dead_id).agent
    result = dlq.replay(services, dead_id, send, actor)
    if result.status == "queued":
        return Outcome("green", f"replayed dead letter {dead_id} of {agent} as run {result.run_id}",
                       run_id=result.run_id)
    if result.status == "duplicate":
        return Outcome("amber", f"dead letter {dead_id} was replayed already, as run {result.run_id} "
                                f"({result.reason}); a dead letter is replayed once", run_id=result.run_id)
    return Outcome("red", f"not replayed: {explain(services, agent, result)}", gates=result.gates)


def purge(services: Services, *, dead_ids: list[int] | None, actor: str) -> Outcome:
    """Delete dead letters for good (all of them when `dead_ids` is None)."""
    removed = dlq.purge(services, dead_ids, actor)
    return Outcome("green", f"purged {removed} dead letter(s)")


def dry_run(services: Services, *, agent: str, actor: str) -> Outcome:
    """What a dispatch of `agent` would do now, and every gate's verdict; writes nothing."""
    spec = services.config.agent(agent)
    result = dispatch(services, DispatchRequest(spec.name, None, None, True, actor=actor), _never)
    if result.reason == "would fire":
        return Outcome("green", f"a dispatch of {spec.name} would fire now", gates=result.gates)
    return Outcome("amber", f"a dispatch of {spec.name} would be refused: {explain(services, spec.name, result)}",
                   gates=result.gates)


def _never(_run_id: str, _fence: int) -> None:
    raise AssertionError("a dry run sends nothing")
