"""A refused dispatch in one line an operator can act on: why nothing was done, and what to do.

`fleet dispatch` and `fleet dlq replay` print it instead of the run id of a row that no longer
exists. The dispatch result says which gate refused; the details (who holds the slots, who threw
the kill switch) are read here, after the refusal, since they are for a person, not a decision.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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
    spec = svc.config.agent(agent)
    holders = [lease.run_id for slot in range(spec.concurrency)
               if (lease := svc.leases.holder(spec.name, slot)) is not None]
    if not holders:
        return f"all {spec.concurrency} slots were taken a moment ago and are free now; try again"
    named = ", ".join(holders[:SHOWN_HOLDERS]) + (
        f" and {len(holders) - SHOWN_HOLDERS} more" if len(holders) > SHOWN_HOLDERS else "")
    runs, when = ("run", "it ends") if len(holders) == 1 else ("runs", "one ends")
    return f"{len(holders)} of {spec.concurrency} slots taken by {runs} {named}; try again when {when}"


def _killed(svc: Services, agent: str, result: DispatchResult) -> str:
    from fleet import db, killswitch
    from fleet.errors import FleetError
    from fleet.keys import GLOBAL

    try:
        with db.session(svc.engine) as session:
            state = killswitch.check(session, svc.redis, agent)
    except FleetError:
        return f"{_gate(result, 'kill')}; `fleet status` says who and why"
    if not state.killed:
        return "the kill switch was engaged and has been lifted since; try again"
    where, command = ("the whole fleet", "fleet resume") if state.scope == GLOBAL else (
        f"agent {state.scope}", f"fleet resume {state.scope}")
    return (f"the kill switch is engaged for {where} by {state.actor or 'someone'}: "
            f"{state.reason or 'no reason given'}; `{command}` lifts it when it is safe")


def _breaker(svc: Services, agent: str, result: DispatchResult) -> str:
    spec = svc.config.agent(agent)
    threshold, cooldown = spec.breaker_settings(svc.config.fleet)
    return (f"the breaker of {agent} is {_gate(result, 'breaker')}: its runs kept failing ({threshold} in a row, "
            f"or a refused key); one trial run is let through {cooldown:.0f} s after it opened. "
            f"Why they failed: `fleet runs --agent {agent} --status dead`")


def _over_cap(_svc: Services, _agent: str, result: DispatchResult) -> str:
    return (f"{_gate(result, 'caps')}; `fleet spend` shows the day's spend against the caps "
            "(raise daily_cap_usd in fleet.toml only if that is intended)")


_WHY: dict[str, Callable[[Services, str, DispatchResult], str]] = {
    "busy": _busy, "killed": _killed, "breaker_open": _breaker, "over_cap": _over_cap}
