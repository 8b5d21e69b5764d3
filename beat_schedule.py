"""The beat schedule, as data: one tick per scheduled agent in fleet.toml, plus the sweeps and the watchdog.

Agent ticks use Fleet's own schedule (fleet/schedule.py) in the fleet's timezone, so beat and the
tick agree on every slot. Sweeps and the watchdog run on whole minutes: Sentry Crons ignores
anything shorter or not a whole minute.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from celery.schedules import BaseSchedule, crontab, schedstate

from fleet.config import FleetConfig
from fleet.schedule import Schedule

DISPATCH_QUEUE = "dispatch"


class FleetSchedule(BaseSchedule):
    """A Celery schedule that asks fleet/schedule.py when the next slot is due."""

    def __init__(self, schedule: Schedule, timezone: str, text: str) -> None:
        super().__init__()
        self.fleet_schedule, self.zone, self.text = schedule, ZoneInfo(timezone), text

    def is_due(self, last_run_at: datetime) -> schedstate:
        """Due once when a slot passed since the last run (missed slots collapse into one)."""
        now = datetime.now(UTC)
        last = last_run_at if last_run_at.tzinfo else last_run_at.replace(tzinfo=UTC)
        upcoming = self.fleet_schedule.next_after(last.astimezone(self.zone))
        if upcoming <= now:
            following = self.fleet_schedule.next_after(now.astimezone(self.zone))
            return schedstate(True, max(0.5, (following - now).total_seconds()))
        return schedstate(False, max(0.5, (upcoming - now).total_seconds()))

    def remaining_estimate(self, last_run_at: datetime) -> timedelta:
        """Time until the next slot."""
        return timedelta(seconds=self.is_due(last_run_at).next)

    def __repr__(self) -> str:
        return f"<FleetSchedule {self.text!r} {self.zone}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FleetSchedule) and (other.text, other.zone) == (self.text, self.zone)

    def __hash__(self) -> int:
        return hash((self.text, str(self.zone)))

    def __reduce__(self) -> Any:
        return (self.__class__, (self.fleet_schedule, str(self.zone), self.text))


SWEEPS: dict[str, dict[str, Any]] = {
    "fleet.sweep.reaper": {"task": "fleet.sweep.reaper", "schedule": crontab(minute="*")},
    "fleet.watchdog": {"task": "fleet.watchdog", "schedule": crontab(minute="*")},
    "fleet.sweep.orphans": {"task": "fleet.sweep.orphans", "schedule": crontab(minute="*")},
    "fleet.sweep.idempotency": {"task": "fleet.sweep.idempotency", "schedule": crontab(minute="7")},
    "fleet.sweep.retention": {"task": "fleet.sweep.retention", "schedule": crontab(minute="17", hour="3")},
}


def build(config: FleetConfig) -> dict[str, dict[str, Any]]:
    """Every beat entry for this fleet.toml."""
    entries = {name: {**entry, "options": {"queue": DISPATCH_QUEUE, "expires": 300}} for name, entry in SWEEPS.items()}
    # Agents on the same schedule are due at the same instants: one message ticks them all, in one batch
    # (a thousand agents every minute is one dispatch transaction, not a thousand).
    groups: dict[str, list[str]] = {}
    for name, spec in config.agents.items():
        if spec.parsed_schedule is not None and spec.schedule is not None:
            groups.setdefault(spec.schedule, []).append(name)
    for text, names in groups.items():
        schedule = config.agent(names[0]).parsed_schedule
        assert schedule is not None
        entries[f"fleet.ticks:{text}"] = {
            "task": "fleet.ticks", "args": (names,),
            "schedule": FleetSchedule(schedule, config.fleet.timezone, text),
            # A tick that waited past its slot is worthless; the next slot will come.
            "options": {"queue": DISPATCH_QUEUE, "expires": 300},
        }
    return entries
