"""Pictures for the operator's page, drawn here as inline SVG: no script, no CDN, readable offline.

Pure functions of what `fleet.state.history` gathers, returning SVG markup with every label escaped.
Each picture's viewBox is about a phone's width (WIDTH units), so on a phone it is drawn near 1:1 and
its text stays readable, and on a desktop the page caps its width. Every mark carries a <title>: a
hover (or a long press) names the run, the amount or the hour.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from html import escape
from statistics import median

from fleet.ledger import money

WIDTH = 380
FONT = 'font-family="system-ui, -apple-system, Segoe UI, Roboto, DejaVu Sans, sans-serif"'
INK, MUTED, GRID, RED, BLUE = "#111827", "#6b7280", "#e5e7eb", "#c62828", "#1565c0"
# Stacked from the bottom in this order; the colours match the page's status pills.
OUTCOMES = ("succeeded", "idle", "failed", "killed", "abandoned", "dead")
COLOURS = {"succeeded": "#2e7d32", "idle": "#9ca3af", "failed": "#e39a1c", "killed": "#8e24aa",
           "abandoned": "#6d4c41", "dead": RED, "archived": "#d1d5db", "running": BLUE, "queued": "#64b5f6"}


@dataclass(frozen=True)
class SpendSeries:
    """One scope's spend through the budget day: (when, dollars so far) steps, and its cap."""

    name: str
    points: list[tuple[datetime, float]]
    cap: float | None
    spent: float  # the ledger's figure for the day (the last step ends there)


def _svg(height: int, body: Iterable[str], label: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" role="img" '
            f'aria-label="{escape(label)}" class="chart" {FONT} font-size="11">'
            f"<title>{escape(label)}</title>{''.join(body)}</svg>")


def _text(x: float, y: float, words: str, *, anchor: str = "start", fill: str = MUTED, size: int = 11,
          weight: str = "400") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" fill="{fill}" font-size="{size}" '
            f'font-weight="{weight}">{escape(words)}</text>')


def _short_money(usd: float) -> str:
    """An axis label that fits in a few characters: $1.2k, $125, $6.25, $0.19, $0.0012."""
    if usd >= 1000:
        return f"${usd / 1000:.3g}k"
    if usd >= 100:
        return f"${usd:.0f}"
    return f"${usd:.2f}" if usd >= 0.01 else f"${usd:.2g}"


# ---------------------------------------------------------------- spend through the day


def spend_chart(series: SpendSeries, start: datetime, end: datetime, now: datetime) -> str:
    """The day's spend of one scope as a rising step line, its cap as a dashed red line."""
    left, right, top, bottom = 34.0, WIDTH - 8.0, 8.0, 78.0
    span = (end - start).total_seconds() or 1.0
    peak = max([series.spent, *(usd for _, usd in series.points), series.cap or 0.0, 1e-9])
    ceiling = peak * 1.25  # room above the cap line for its label

    def x(at: datetime) -> float:
        return left + (right - left) * min(1.0, max(0.0, (at - start).total_seconds() / span))

    def y(usd: float) -> float:
        return bottom - (bottom - top) * usd / ceiling

    used = f"{money(series.spent)} " + (f"of {money(series.cap)}" if series.cap is not None else "(no cap)")
    tone = _tone(series.spent, series.cap)
    body = []  # the page names the scope and its figures above the picture
    for hour in range(0, 25, 6):
        gx = x(start + timedelta(hours=hour))
        body.append(f'<line x1="{gx:.1f}" y1="{top}" x2="{gx:.1f}" y2="{bottom}" stroke="{GRID}"/>')
        body.append(_text(gx, bottom + 13, f"{hour:02d}", anchor="middle"))
    body.append(f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="{MUTED}"/>')
    body.append(_text(left - 4, top + 8, _short_money(ceiling), anchor="end"))
    body.append(_text(left - 4, bottom, "$0", anchor="end"))
    steps = [(start, 0.0), *sorted(series.points), (min(now, end), series.spent)]
    path, level = [f"M{x(start):.1f},{y(0):.1f}"], 0.0
    for at, usd in steps[1:]:
        path.append(f"L{x(at):.1f},{y(level):.1f}L{x(at):.1f},{y(usd):.1f}")
        level = usd
    line = "".join(path)
    body.append(f'<path d="{line}L{x(min(now, end)):.1f},{y(0):.1f}Z" fill="{tone}" fill-opacity="0.12"/>')
    body.append(f'<path d="{line}" fill="none" stroke="{tone}" stroke-width="2"/>')
    if series.cap is not None:
        cy = y(series.cap)
        body.append(f'<line x1="{left}" y1="{cy:.1f}" x2="{right}" y2="{cy:.1f}" stroke="{RED}" '
                    f'stroke-dasharray="5 3" stroke-width="1.5"><title>cap {escape(money(series.cap))}</title></line>')
        body.append(_text(right, cy - 4, f"cap {money(series.cap)}", anchor="end", fill=RED, size=10))
    nx = x(min(now, end))
    body.append(f'<line x1="{nx:.1f}" y1="{top - 4}" x2="{nx:.1f}" y2="{bottom}" stroke="{BLUE}" '
                f'stroke-dasharray="2 2"><title>now</title></line>')
    return _svg(int(bottom + 18), body, f"spend today of {series.name}: {used}")


def _tone(spent: float, cap: float | None) -> str:
    if cap is None:
        return BLUE
    used = 1.0 if cap <= 0 else spent / cap
    return RED if used >= 0.9 else "#b26a00" if used >= 0.75 else "#2e7d32"


# ---------------------------------------------------------------- runs per hour


def runs_per_hour(hours: Sequence[tuple[datetime, dict[str, int]]]) -> str:
    """Finished runs per hour (local time), stacked by outcome, oldest hour on the left."""
    left, right, top, bottom = 26.0, WIDTH - 4.0, 8.0, 112.0
    tallest = max([sum(counts.values()) for _, counts in hours] + [1])
    scale = _nice(tallest)
    slot = (right - left) / max(1, len(hours))
    body = []
    for tick in (0, scale // 2, scale):
        ty = bottom - (bottom - top) * tick / scale
        body.append(f'<line x1="{left}" y1="{ty:.1f}" x2="{right}" y2="{ty:.1f}" stroke="{GRID}"/>')
        body.append(_text(left - 4, ty + 4, str(tick), anchor="end"))
    totals: dict[str, int] = {}
    for index, (hour, counts) in enumerate(hours):
        base = bottom
        bx = left + index * slot + 1
        for outcome in [*OUTCOMES, *sorted(set(counts) - set(OUTCOMES))]:
            n = counts.get(outcome, 0)
            if not n:
                continue
            totals[outcome] = totals.get(outcome, 0) + n
            h = (bottom - top) * n / scale
            base -= h
            body.append(f'<rect x="{bx:.1f}" y="{base:.1f}" width="{max(1.0, slot - 2):.1f}" height="{h:.1f}" '
                        f'fill="{_colour(outcome)}"><title>{hour:%H}:00 {escape(outcome)} {n}</title></rect>')
        if hour.hour % 6 == 0:
            body.append(_text(bx + slot / 2, bottom + 13, f"{hour:%H}", anchor="middle"))
    body.append(f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="{MUTED}"/>')
    body += _legend(bottom + 30, [(o, totals[o]) for o in [*OUTCOMES, *sorted(set(totals) - set(OUTCOMES))]
                                  if totals.get(o)])
    summary = ", ".join(f"{o} {n}" for o, n in sorted(totals.items())) or "no runs"
    return _svg(int(bottom + 38 + 14 * (len(totals) > 3)), body, f"runs per hour over the last 24 h: {summary}")


def _nice(n: int) -> int:
    """The smallest of 2, 4, 10, 20, 40, 100, ... at or above n: even, so half of it is a whole tick."""
    scale = 2
    while scale < n:
        scale = scale * 5 // 2 if str(scale)[0] == "4" else scale * 2
    return scale


def _legend(y: float, items: list[tuple[str, int]]) -> list[str]:
    body, x = [], 4.0
    for outcome, n in items:
        words = f"{outcome} {n}"
        width = 16 + 6.2 * len(words)
        if x + width > WIDTH:
            x, y = 4.0, y + 14
        body.append(f'<rect x="{x:.1f}" y="{y - 8:.1f}" width="9" height="9" rx="2" fill="{_colour(outcome)}"/>')
        body.append(_text(x + 12, y, words, fill=INK))
        x += width
    return body


# ---------------------------------------------------------------- durations per agent


_TICKS = ((1, "1s"), (10, "10s"), (60, "1m"), (600, "10m"), (3600, "1h"), (36000, "10h"))


def durations(per_agent: dict[str, list[tuple[float, str]]]) -> str:
    """Each finished run's duration as a dot on a log scale, one row per agent, its median as a bar."""
    left, right, top, row = 96.0, WIDTH - 8.0, 16.0, 24.0
    longest = max([s for runs in per_agent.values() for s, _ in runs] + [10.0])
    lo, hi = math.log10(0.1), math.log10(longest * 1.5)

    def x(seconds: float) -> float:
        return left + (right - left) * (math.log10(max(seconds, 0.1)) - lo) / (hi - lo)

    bottom = top + row * max(1, len(per_agent))
    body = []
    for tick, label in _TICKS:
        if tick <= longest * 1.5:
            gx = x(tick)
            body.append(f'<line x1="{gx:.1f}" y1="{top - 4}" x2="{gx:.1f}" y2="{bottom}" stroke="{GRID}"/>')
            body.append(_text(gx, bottom + 13, label, anchor="middle"))
    for index, (agent, runs) in enumerate(sorted(per_agent.items())):
        cy = top + row * index + row / 2
        body.append(_text(0, cy + 4, agent if len(agent) <= 15 else agent[:14] + "…", fill=INK))
        for k, (seconds, status) in enumerate(runs):
            jitter = ((k * 7) % 9 - 4) * 1.2  # fixed, so a refresh does not make the dots dance
            body.append(f'<circle cx="{x(seconds):.1f}" cy="{cy + jitter:.1f}" r="3" fill="{_colour(status)}" '
                        f'fill-opacity="0.75"><title>{escape(agent)} {escape(status)} {_seconds(seconds)}'
                        "</title></circle>")
        if runs:
            mid = median(s for s, _ in runs)
            mx = x(mid)
            body.append(f'<line x1="{mx:.1f}" y1="{cy - 8:.1f}" x2="{mx:.1f}" y2="{cy + 8:.1f}" stroke="{INK}" '
                        f'stroke-width="2"><title>{escape(agent)}: median {_seconds(mid)} of {len(runs)} run(s)'
                        "</title></line>")
    if not per_agent:
        body.append(_text(WIDTH / 2, top + row / 2 + 4, "no finished runs in the last 24 h", anchor="middle"))
    body.append(f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="{MUTED}"/>')
    return _svg(int(bottom + 18), body, f"run durations per agent over the last 24 h ({len(per_agent)} agents)")


def _colour(outcome: str) -> str:
    return COLOURS.get(outcome, MUTED)


def _seconds(value: float) -> str:
    if value < 60:
        return f"{value:.1f} s"
    if value < 3600:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"
