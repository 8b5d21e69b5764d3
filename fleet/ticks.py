"""Scheduled ticks: beat names a slot, the dispatch makes it happen at most once.

A tick's work key is `schedule:<slot>`, the database's time floored to the agent's schedule, so
two beats, a restarted beat, a retried message or workers whose clocks disagree all name the same
slot, and the run row's unique key keeps it to one run. Missed slots are not replayed: a tick
dispatches the current slot only, and archive-stale retires an older slot that never started.
"""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

from fleet import bulk, db, keys, ledger, pause
from fleet.dispatch import DispatchRequest, DispatchResult, Gate, Sender, dispatch
from fleet.services import Services


def slot_key(services: Services, agent: str, now: datetime) -> str | None:
    """The work key of the slot due at `now` (None for an agent without a schedule)."""
    spec = services.config.agent(agent)
    schedule = spec.parsed_schedule
    if schedule is None:
        return None
    local = now.astimezone(ZoneInfo(services.config.fleet.timezone))
    return "schedule:" + schedule.slot(local).isoformat(timespec="seconds")


def tick(services: Services, agent: str, send: Sender, actor: str = "beat", *,
         at: datetime | None = None) -> DispatchResult:
    """Dispatch the agent's current slot, unless the agent (or the fleet) is paused: refused `paused`.
    `at`: the time whose slot is named; by default the database's (a test or a benchmark fixes it)."""
    if services.config.agent(agent).parsed_schedule is None:
        return DispatchResult(None, "skipped", reason="agent has no schedule")
    # Before the pause check: a paused agent's tick still shows beat alive (the watchdog's beat check).
    services.redis.set(keys.last_tick(), services.now().isoformat())
    with db.session(services.engine) as session:
        # The slot by the database's clock, the one every host shares: a worker whose own clock is
        # ahead or behind would name another slot (one that ran already, or one not due yet).
        work_key = slot_key(services, agent, at or ledger.database_now(session))
        paused = pause.check(session, services.redis, agent)
    if paused.paused:
        # Refused before a run row is made: a paused agent's every tick would otherwise write and delete one.
        gates = {"pause": Gate(False, paused.describe())}
        return DispatchResult(None, "refused", gates=gates, reason="paused")
    assert work_key is not None  # the agent has a schedule
    return dispatch(services, DispatchRequest(agent, work_key, actor=actor), send)


def tick_many(services: Services, agents: list[str], send: Sender, actor: str = "beat", *,
              at: datetime | None = None) -> dict[str, DispatchResult]:
    """`tick` for every agent that shares a schedule, in one batch (fleet/bulk.py): the agents' answers.
    Agents no longer configured or without a schedule are skipped (a beat entry older than fleet.toml).
    `at`: the time whose slots are named; by default the database's, as `tick` does (a test fixes it)."""
    if at is None:
        with db.session(services.engine) as session:
            at = ledger.database_now(session)
    wanted = []
    for agent in dict.fromkeys(agents):
        work_key = slot_key(services, agent, at) if agent in services.config.agents else None
        if work_key is not None:
            wanted.append((services.config.agent(agent), work_key))
    services.redis.set(keys.last_tick(), services.now().isoformat())  # before any gate: a paused beat is alive
    results = bulk.dispatch_many(services, wanted, send, actor)
    return {spec.name: result for (spec, _), result in zip(wanted, results, strict=True)}
