"""A refused dispatch in one line an operator can act on: why nothing was done, and what to do.

`fleet dispatch`, `fleet dlq replay` and the web page's actions say it instead of the run id of a
row that no longer exists. The dispatch result says which gate refused; the details (who holds the slots, who threw
the kill switch) are read here, after the refusal, since they are for a person, not a decision.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlmodel import Session

    from fleet.dispatch import DispatchResult
    from fleet.services import Services

SHOWN_HOLDERS = 3  # a 20-slot agent's refusal names a few runs, not a screenful


def explain(svc: Services, agent: str, result: DispatchResult) -> str:
    """`refused: busy — 1 of 1 slots taken by run X; try again when it ends`, and the like."""
    if result.status == "misdispatch":
        return f"misdispatch — {result.reason}; nothing was reserved or sent"
    reason = result.reason or "refused"
    why = _WHY.get(reason)
    # The reason as the JSON says it (over_cap, breaker_open): the same word in the table and in scripts.
    return f"refused: {reason} — " + (why(svc, agent, result) if why else "no details")


def _gate(result: DispatchResult, name: str) -> str:
    gate = result.gates.get(name)
    return gate.detail if gate is not None else "no details"


def _busy(svc: Services, agent: str, _result: DispatchResult) -> str:
    from sqlmodel import col, select

    from fleet import db
    from fleet.models import Run, RunStatus

    spec = svc.config.agent(agent)
    holders = [lease.run_id for slot in range(spec.concurrency)
               if (lease := svc.leases.holder(spec.name, slot)) is not None]
    # And the live runs by the database, which the admission counts too: Redis may have lost their leases, or
    # they hold slots above a concurrency lowered under them.
    with db.session(svc.engine) as session:
        live = session.exec(select(Run.id).where(col(Run.agent) == spec.name, col(Run.slot).is_not(None),
                                                 col(Run.status).in_([RunStatus.QUEUED, RunStatus.RUNNING]))
                            .order_by(col(Run.slot))).all()
    holders += [run_id for run_id in live if run_id not in holders]
    if not holders:
        return f"all {spec.concurrency} slots were taken a moment ago and are free now; try again"
    named = ", ".join(holders[:SHOWN_HOLDERS]) + (
        f" and {len(holders) - SHOWN_HOLDERS} more" if len(holders) > SHOWN_HOLDERS else "")
    runs, when = ("run", "it ends") if len(holders) == 1 else ("runs", "one ends")
    if len(holders) > spec.concurrency:  # fleet.toml lowered it while they ran
        return (f"{len(holders)} runs live, more than its concurrency of {spec.concurrency} (lowered while they ran): "
                f"{named}; try again when {len(holders) - spec.concurrency + 1} of them have ended")
    return f"{len(holders)} of {spec.concurrency} slots taken by {runs} {named}; try again when {when}"


def _killed(svc: Services, agent: str, result: DispatchResult) -> str:
    from fleet import killswitch

    def said(killed: bool, scope: str | None, actor: str | None, reason: str | None) -> str:
        if not killed:
            return "the kill switch was engaged and has been lifted since; try again"
        where, command = _scope_words(scope)
        return (f"the kill switch is engaged for {where} by {actor or 'someone'}: {reason or 'no reason given'}; "
                f"`{command}` lifts it when it is safe")

    return _switch(svc, result, "kill", lambda session: said(
        *_fields(killswitch.check(session, svc.redis, agent), "killed")))


def _paused(svc: Services, agent: str, result: DispatchResult) -> str:
    from fleet import pause

    def said(paused: bool, scope: str | None, actor: str | None, reason: str | None) -> str:
        if not paused:
            return "intake was paused and has been resumed since; try again"
        where, command = _scope_words(scope)
        return (f"intake is paused for {where} by {actor or 'someone'}: {reason or 'no reason given'} "
                f"(running runs finish); `{command}` lifts it")

    return _switch(svc, result, "pause", lambda session: said(
        *_fields(pause.check(session, svc.redis, agent), "paused")))


def _switch(svc: Services, result: DispatchResult, gate: str, read: Callable[[Session], str]) -> str:
    """Who threw a switch and why, read now; the gate's own words when the stores cannot be read."""
    from fleet import db
    from fleet.errors import FleetError

    try:
        with db.session(svc.engine) as session:
            return read(session)
    except FleetError:
        return f"{_gate(result, gate)}; `fleet status` says who and why"


def _fields(state: Any, engaged: str) -> tuple[bool, str | None, str | None, str | None]:
    return getattr(state, engaged), state.scope, state.actor, state.reason


def _scope_words(scope: str | None) -> tuple[str, str]:
    from fleet.keys import GLOBAL

    return ("the whole fleet", "fleet resume") if scope == GLOBAL else (f"agent {scope}", f"fleet resume {scope}")


def _breaker(svc: Services, agent: str, result: DispatchResult) -> str:
    spec = svc.config.agent(agent)
    threshold, cooldown = spec.breaker_settings(svc.config.fleet)
    return (f"the breaker of {agent} is {_gate(result, 'breaker')}: its runs kept failing ({threshold} in a row, "
            f"or a refused key); one trial run is let through {cooldown:.0f} s after it opened. "
            f"Why they failed: `fleet runs --agent {agent} --status dead`")


def _bounded(svc: Services, agent: str, result: DispatchResult) -> str:
    spec = svc.config.agent(agent)
    return (f"{_gate(result, 'bounded')}: max_runs_per_day = {spec.max_runs_per_day} is reached; "
            "the count starts again tomorrow (budget day), or raise it in fleet.toml")


def _over_cap(_svc: Services, _agent: str, result: DispatchResult) -> str:
    return (f"{_gate(result, 'caps')}; `fleet spend` shows the day's spend against the caps "
            "(raise daily_cap_usd in fleet.toml only if that is intended)")


_WHY: dict[str, Callable[[Services, str, DispatchResult], str]] = {
    "busy": _busy, "killed": _killed, "paused": _paused, "breaker_open": _breaker, "bounded": _bounded,
    "over_cap": _over_cap}
