"""Agent schedules: `every Ns` intervals and five-field cron expressions, as pure functions of time.

Beat floors each fire time to its schedule slot, so a tick's idempotency key is a function of the
schedule alone and two beats (or a restarted one) name the same slot identically.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta

_EVERY = re.compile(r"^every\s+(\d+)\s*(s|m|h)$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}
# (name, lowest, highest) for minute, hour, day of month, month, day of week (0 = Sunday; 7 too).
_CRON_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12),
                ("day of week", 0, 7))
_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # the most each month can have
_SEARCH_DAYS = 8 * 366 + 1
_LONGEST_EVERY_S = 366 * 86400  # longer ones overflow the calendar's next fire time; cron says "yearly" anyway


@dataclass(frozen=True)
class Every:
    """A fixed interval, aligned to the Unix epoch so every process computes the same slots."""

    seconds: int

    def slot(self, now: datetime) -> datetime:
        """The latest fire time at or before `now`."""
        epoch = int(now.timestamp())
        return datetime.fromtimestamp(epoch - epoch % self.seconds, tz=now.tzinfo)

    def next_after(self, now: datetime) -> datetime:
        """The first fire time strictly after `now`."""
        return self.slot(now) + timedelta(seconds=self.seconds)


@dataclass(frozen=True)
class Cron:
    """A five-field cron expression, evaluated in the timezone of the datetimes it is given."""

    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    day_restricted: bool
    weekday_restricted: bool

    def matches(self, at: datetime) -> bool:
        """Whether `at` (to the minute) is a fire time."""
        return at.minute in self.minutes and at.hour in self.hours and self._day_matches(at.date())

    def _day_matches(self, day: date) -> bool:
        if day.month not in self.months:
            return False
        day_ok = day.day in self.days
        weekday_ok = (day.isoweekday() % 7) in self.weekdays
        if self.day_restricted and self.weekday_restricted:
            return day_ok or weekday_ok  # cron's rule: either field may match when both are set
        return day_ok and weekday_ok

    def slot(self, now: datetime) -> datetime:
        """The latest fire time at or before `now`."""
        return self._search(now.replace(second=0, microsecond=0), backward=True)

    def next_after(self, now: datetime) -> datetime:
        """The first fire time strictly after `now`."""
        return self._search(now.replace(second=0, microsecond=0) + timedelta(minutes=1), backward=False)

    def _search(self, start: datetime, *, backward: bool) -> datetime:
        """The nearest fire time from `start` (inclusive): day by day, then through that day's times.

        Skipping whole days keeps a yearly schedule cheap; the window covers the longest gap any
        valid expression has (a 29 February can be eight years from the next).
        """
        times = sorted(((h, m) for h in self.hours for m in self.minutes), reverse=backward)
        step = timedelta(days=-1 if backward else 1)
        day = start.date()
        for _ in range(_SEARCH_DAYS):
            if self._day_matches(day):
                for hour, minute in times:
                    at = start.replace(year=day.year, month=day.month, day=day.day, hour=hour, minute=minute)
                    if (at <= start) if backward else (at >= start):
                        return at
            day += step
        raise ValueError("cron expression never fires")


Schedule = Every | Cron


def parse_schedule(text: str) -> Schedule:
    """Parse `every 30s` / `every 5m` / `every 1h` or a five-field cron expression; ValueError says why."""
    text = text.strip()
    every = _EVERY.match(text)
    if every:
        seconds = int(every.group(1)) * _UNIT_SECONDS[every.group(2)]
        if seconds < 1:
            raise ValueError("an interval must be at least 1 second")
        if seconds > _LONGEST_EVERY_S:
            raise ValueError("an interval may be at most 366 days (8784h); use a cron expression for rarer runs")
        return Every(seconds)
    parts = text.split()
    if len(parts) != 5:
        raise ValueError(f"expected 'every Ns' or five cron fields, got {len(parts)} field(s)")
    sets = [_parse_field(part, *spec) for part, spec in zip(parts, _CRON_FIELDS, strict=True)]
    weekdays = frozenset(0 if d == 7 else d for d in sets[4])
    if parts[4] == "*" and not any(day <= _MONTH_DAYS[month - 1] for month in sets[3] for day in sets[2]):
        raise ValueError("cron day of month never occurs in the months given: it would never fire")
    return Cron(sets[0], sets[1], sets[2], sets[3], weekdays,
                day_restricted=parts[2] != "*", weekday_restricted=parts[4] != "*")


def _parse_field(field: str, name: str, low: int, high: int) -> frozenset[int]:
    values: set[int] = set()
    for item in field.split(","):
        values |= _parse_item(item, name, low, high)
    return frozenset(values)


def _parse_item(item: str, name: str, low: int, high: int) -> set[int]:
    match = re.fullmatch(r"(\*|\d+(?:-\d+)?)(?:/(\d+))?", item)
    if not match:
        raise ValueError(f"cron {name} field {item!r} is not a number, range, list or step")
    base, step_text = match.groups()
    step = int(step_text) if step_text else 1
    if step < 1:
        raise ValueError(f"cron {name} step must be at least 1")
    if base == "*":
        start, end = low, high
    elif "-" in base:
        start, end = (int(x) for x in base.split("-"))
    else:
        start = end = int(base)
        if step_text:
            end = high
    if not (low <= start <= high and low <= end <= high and start <= end):
        raise ValueError(f"cron {name} field {item!r} is outside {low}-{high}")
    return set(range(start, end + 1, step))
