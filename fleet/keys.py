"""Every Redis key Fleet uses, in one place. All live under the `fleet:` prefix."""

from __future__ import annotations

PREFIX = "fleet:"
GLOBAL = "*"  # the scope name of fleet-wide switches and budgets


def kill(scope: str = GLOBAL) -> str:
    """The kill flag of the fleet ('*') or of one agent; its value is a JSON record of who and why."""
    return f"{PREFIX}kill:{scope}"


def slot_lease(agent: str, slot: int) -> str:
    """One of an agent's concurrency slots; its value is `run_id:fence`."""
    return f"{PREFIX}lease:{agent}:{slot}"


def fence_counter(agent: str) -> str:
    """The monotonically increasing fencing-token counter of an agent's leases."""
    return f"{PREFIX}fence:{agent}"


def breaker(agent: str) -> str:
    """The circuit breaker hash of an agent."""
    return f"{PREFIX}breaker:{agent}"


def counted(run_id: str, attempt: int) -> str:
    """Set when an attempt's outcome was counted by its breaker (`old new`): a count asked again is not counted
    twice."""
    return f"{PREFIX}counted:{run_id}:{attempt}"


def alerted(kind: str, scope: str, day: str) -> str:
    """Set by the first process that raised an alert of this kind for a scope on a budget day: one alert per
    transition fleet-wide, where each process's own dedupe would repeat it from every worker."""
    return f"{PREFIX}alerted:{kind}:{scope}:{day}"


def beat_leader() -> str:
    """The beat leader lease."""
    return f"{PREFIX}beat:leader"


def last_tick() -> str:
    """When beat last sent anything (ISO timestamp)."""
    return f"{PREFIX}beat:last_tick"


def paused(agent: str) -> str:
    """Set when an agent said it is done for good (`fleet_done`) or exited 78: its schedule pauses."""
    return f"{PREFIX}paused:{agent}"


def canary(queue: str) -> str:
    """The send time of the last canary that came back through a queue (ISO timestamp)."""
    return f"{PREFIX}canary:{queue}:back"


def canary_sent(queue: str) -> str:
    """The send time of the last canary sent through a queue (ISO timestamp)."""
    return f"{PREFIX}canary:{queue}:sent"


def canary_seen(queue: str) -> str:
    """When the last canary came back through a queue (ISO timestamp)."""
    return f"{PREFIX}canary:{queue}:seen"


def suspect(run_id: str) -> str:
    """When the reaper first saw a running run's lease lapsed (`fence:redis_seconds`): it takes the run
    over only a whole lease TTL later."""
    return f"{PREFIX}suspect:{run_id}"


def orphans(host: str) -> str:
    """One worker host's latest orphan scan (JSON, expires): agent processes alive whose run is over."""
    return f"{PREFIX}orphans:{host}"


def redis_epoch() -> str:
    """A marker set once per Redis lifetime: when it is missing, Redis restarted and lost its data."""
    return f"{PREFIX}epoch"


def owner() -> str:
    """The id of the fleet that uses this Redis database (fleet/tenancy.py), expiring unless renewed."""
    return f"{PREFIX}owner"
