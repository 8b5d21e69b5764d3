"""Schedules are pure functions of time: parsing, slots and next fire times, with fixed clocks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from fleet.schedule import Cron, Every, parse_schedule

# 2024-01-01 is a Monday; 2024-01-05 a Friday, 2024-01-06 a Saturday, 2024-01-07 a Sunday.


def at(*parts: int, tz: ZoneInfo | None = None) -> datetime:
    return datetime(*parts, tzinfo=tz or UTC)  # type: ignore[arg-type, misc]


def cron(text: str) -> Cron:
    parsed = parse_schedule(text)
    assert isinstance(parsed, Cron)
    return parsed


# ---------------------------------------------------------------- every Ns


@pytest.mark.parametrize(("text", "seconds"), [("every 30s", 30), ("every 5m", 300), ("every 1h", 3600),
                                               ("every 90 s", 90), ("  every 2h  ", 7200)])
def test_every_parses_to_seconds(text: str, seconds: int) -> None:
    assert parse_schedule(text) == Every(seconds)


@pytest.mark.parametrize(("text", "now", "slot", "following"), [
    ("every 30s", at(2024, 1, 1, 12, 0, 47, 123456), at(2024, 1, 1, 12, 0, 30), at(2024, 1, 1, 12, 1)),
    ("every 5m", at(2024, 1, 1, 12, 3, 10), at(2024, 1, 1, 12, 0), at(2024, 1, 1, 12, 5)),
    ("every 1h", at(2024, 1, 1, 12, 59, 59, 999999), at(2024, 1, 1, 12), at(2024, 1, 1, 13)),
    ("every 1h", at(2024, 1, 1, 13), at(2024, 1, 1, 13), at(2024, 1, 1, 14)),  # on the boundary: its own slot
])
def test_every_floors_to_epoch_aligned_slots(text: str, now: datetime, slot: datetime, following: datetime) -> None:
    schedule = parse_schedule(text)
    assert schedule.slot(now) == slot
    assert schedule.next_after(now) == following


def test_every_slot_is_the_same_for_every_instant_in_it_and_on_every_call() -> None:
    start = at(2024, 3, 10, 8, 0, 30)
    slots = {parse_schedule("every 30s").slot(start + timedelta(milliseconds=250 * i)) for i in range(120)}
    assert slots == {start}  # 30 s of instants, 120 calls, each on a fresh parse: one slot
    assert parse_schedule("every 30s").slot(start + timedelta(seconds=30)) == start + timedelta(seconds=30)


def test_every_slot_names_the_same_instant_in_any_timezone() -> None:
    now_utc = at(2024, 6, 1, 10, 7, 13)
    now_berlin = now_utc.astimezone(ZoneInfo("Europe/Berlin"))
    now_kolkata = now_utc.astimezone(ZoneInfo("Asia/Kolkata"))  # a +05:30 offset: floors must still agree
    schedule = parse_schedule("every 1h")
    assert schedule.slot(now_utc) == schedule.slot(now_berlin) == schedule.slot(now_kolkata) == at(2024, 6, 1, 10)


# ---------------------------------------------------------------- cron fields


@pytest.mark.parametrize(("text", "field", "values"), [
    ("*/15 * * * *", "minutes", {0, 15, 30, 45}),
    ("0,30 * * * *", "minutes", {0, 30}),
    ("5/20 * * * *", "minutes", {5, 25, 45}),
    ("1-10/3 * * * *", "minutes", {1, 4, 7, 10}),
    ("0 9-17 * * *", "hours", set(range(9, 18))),
    ("0 0,12 1-3,15 * *", "days", {1, 2, 3, 15}),
    ("0 0 * 1-3,12 *", "months", {1, 2, 3, 12}),
    ("0 0 * * 1-5", "weekdays", {1, 2, 3, 4, 5}),
    ("0 0 * * 7", "weekdays", {0}),  # 7 is Sunday too
    ("0 0 * * 0,7", "weekdays", {0}),
    ("* * * * *", "minutes", set(range(60))),
])
def test_cron_fields_parse(text: str, field: str, values: set[int]) -> None:
    assert getattr(cron(text), field) == values


def test_every_fifteen_minutes_slot_and_next() -> None:
    schedule = parse_schedule("*/15 * * * *")
    assert schedule.slot(at(2024, 1, 1, 10, 7, 30)) == at(2024, 1, 1, 10, 0)
    assert schedule.next_after(at(2024, 1, 1, 10, 7, 30)) == at(2024, 1, 1, 10, 15)
    assert schedule.slot(at(2024, 1, 1, 10, 15)) == at(2024, 1, 1, 10, 15)
    assert schedule.next_after(at(2024, 1, 1, 10, 15)) == at(2024, 1, 1, 10, 30)  # strictly after
    assert schedule.next_after(at(2024, 1, 1, 10, 14, 59, 999999)) == at(2024, 1, 1, 10, 15)
    assert schedule.next_after(at(2024, 12, 31, 23, 59)) == at(2025, 1, 1, 0, 0)  # across the year


def test_cron_slot_is_the_same_for_every_instant_in_it() -> None:
    schedule = parse_schedule("*/15 * * * *")
    start = at(2024, 1, 1, 10, 15)
    slots = {schedule.slot(start + timedelta(seconds=7 * i)) for i in range(int(15 * 60 / 7) + 1)}
    assert slots == {start}
    assert parse_schedule("*/15 * * * *") == schedule  # two parses are the same value


def test_weekday_hours_range_skips_the_weekend() -> None:
    schedule = parse_schedule("0 9-17 * * 1-5")
    assert schedule.next_after(at(2024, 1, 5, 17, 30)) == at(2024, 1, 8, 9, 0)  # Friday evening → Monday 9:00
    assert schedule.slot(at(2024, 1, 7, 12, 0)) == at(2024, 1, 5, 17, 0)  # Sunday → Friday's last
    assert schedule.next_after(at(2024, 1, 8, 9, 0)) == at(2024, 1, 8, 10, 0)


def test_day_of_month_and_day_of_week_both_restricted_means_either() -> None:
    schedule = cron("0 0 13 * 5")  # the 13th, and every Friday
    assert schedule.matches(at(2024, 1, 13))  # a Saturday, but the 13th
    assert schedule.matches(at(2024, 1, 5))  # a Friday, not the 13th
    assert not schedule.matches(at(2024, 1, 6))  # neither
    assert schedule.next_after(at(2024, 1, 1)) == at(2024, 1, 5)
    assert schedule.next_after(at(2024, 1, 12)) == at(2024, 1, 13)
    assert schedule.slot(at(2024, 1, 14, 12)) == at(2024, 1, 13)


def test_only_one_day_field_restricted_means_that_field_alone() -> None:
    fridays, thirteenths = cron("0 0 * * 5"), cron("0 0 13 * *")
    assert fridays.matches(at(2024, 1, 5)) and not fridays.matches(at(2024, 1, 13))
    assert thirteenths.matches(at(2024, 1, 13)) and not thirteenths.matches(at(2024, 1, 5))
    assert cron("0 0 * * 0").matches(at(2024, 1, 7)) and cron("0 0 * * 7").matches(at(2024, 1, 7))


def test_cron_is_evaluated_in_the_timezone_it_is_given() -> None:
    new_york = ZoneInfo("America/New_York")
    schedule = parse_schedule("0 9 * * *")
    fire = schedule.next_after(at(2024, 1, 2, 8, 0, tz=new_york))
    assert fire == at(2024, 1, 2, 9, 0, tz=new_york)
    assert fire.astimezone(UTC) == at(2024, 1, 2, 14, 0)


def test_rare_schedules_are_found_years_away() -> None:
    leap_day = parse_schedule("0 0 29 2 *")
    assert leap_day.slot(at(2025, 6, 1)) == at(2024, 2, 29)
    assert leap_day.next_after(at(2025, 6, 1)) == at(2028, 2, 29)
    assert leap_day.next_after(at(2097, 1, 1)) == at(2104, 2, 29)  # 2100 is not a leap year
    yearly = parse_schedule("30 6 1 1 *")
    assert yearly.next_after(at(2024, 1, 2)) == at(2025, 1, 1, 6, 30)
    assert yearly.slot(at(2024, 12, 31, 23, 59)) == at(2024, 1, 1, 6, 30)


@pytest.mark.parametrize(("text", "why"), [
    ("60 * * * *", "minute"),
    ("-1 * * * *", "minute"),
    ("a * * * *", "minute"),
    ("*/0 * * * *", "minute"),
    ("5-1 * * * *", "minute"),
    ("1,,2 * * * *", "minute"),
    ("* 24 * * *", "hour"),
    ("* * 0 * *", "day of month"),
    ("* * 32 * *", "day of month"),
    ("* * * 13 *", "month"),
    ("* * * 0 *", "month"),
    ("* * * * 8", "day of week"),
    ("* * * *", "five cron fields"),
    ("* * * * * *", "five cron fields"),
    ("", "five cron fields"),
    ("every 0s", "at least 1 second"),
    ("every 5d", "five cron fields"),
    ("every -5s", "five cron fields"),
    ("every s", "five cron fields"),
    # Accepted, then every next fire time overflowed the calendar (OverflowError): `fleet agents` crashed, doctor
    # said ok, and beat logged a traceback for that entry every second for as long as it ran.
    ("every 1000000000000s", "at most 366 days"),
    ("every 8785h", "at most 366 days"),
    ("0 0 31 2 *", "never"),  # February has no 31st: it would never fire
    ("0 0 30 2 *", "never"),
    ("0 0 31 4,6,9,11 *", "never"),
])
def test_bad_schedules_say_why(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_schedule(text)


def test_the_longest_interval_has_a_next_fire_time() -> None:
    longest = parse_schedule("every 8784h")
    assert longest == Every(366 * 86400)
    assert longest.next_after(datetime(2099, 12, 31, tzinfo=UTC)) > datetime(2099, 12, 31, tzinfo=UTC)


def test_a_day_that_exists_in_one_listed_month_is_accepted() -> None:
    schedule = parse_schedule("0 0 31 2,3 *")
    assert schedule.next_after(at(2024, 2, 1)) == at(2024, 3, 31)
    assert parse_schedule("0 0 31 2 5").next_after(at(2024, 1, 1)) == at(2024, 2, 2)  # Fridays still fire
