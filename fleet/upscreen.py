"""What `fleet up` shows: a short banner, a live status block, events, and what a stop stopped.

The banner names each part, where it listens and the credentials of Flower and the page, once, with
any warning set apart in colour. On a terminal a status block then redraws itself in place (rich
Live) from a snapshot read every STATUS_EVERY_S in a thread of its own, so a slow database never
holds up the supervisor: parts up or down, running / queued / dead, spend against the cap, the kill
and pause switches, beat's last tick, the watchdog's verdict. Piped, or with -v (the children's JSON
logs then stream to the terminal), there is no block: plain lines only.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from rich.console import Console, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from fleet import metrics
from fleet.keys import GLOBAL
from fleet.ledger import money
from fleet.redaction import visible

STATUS_EVERY_S = 2.0
WATCHDOG_STALE_S = 300.0  # beat runs it every minute: older than this, it stopped
_DOT = {"up": ("●", "green"), "starting": ("◐", "yellow"), "down": ("✖", "bold red")}


@dataclass
class Row:
    """One banner line: a part (or a fact) and what to know about it."""

    name: str
    text: Text
    pid: int | None = None


@dataclass
class Stopped:
    """What a stop did, part by part, for the closing lines."""

    began: float = 0.0
    lines: list[tuple[str, str, bool]] = field(default_factory=list)  # (part, how it ended, cleanly)

    def add(self, part: str, how: str, clean: bool = True) -> None:
        """Record one part's end."""
        self.lines.append((part, how, clean))


class StatusFeed:
    """Reads the fleet's snapshot every STATUS_EVERY_S in a daemon thread; keeps the newest (or why not)."""

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        """`read` returns a snapshot (fleet.state.snapshot); it may raise."""
        self.read = read
        self.picture: dict[str, Any] | None = None
        self.problem: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fleet-up-status", daemon=True)

    def start(self) -> None:
        """Begin reading."""
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.picture, self.problem = self.read(), None
            except Exception as exc:  # noqa: BLE001 - shown in the block; the next pass tries again
                self.problem = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            self._stop.wait(STATUS_EVERY_S)

    def stop(self) -> None:
        """Stop reading (a pass in flight finishes on its own: the thread is a daemon)."""
        self._stop.set()

    def close(self, release: Callable[[], None] | None = None) -> None:
        """Stop, wait a moment for a pass in flight, then `release` what the reads used."""
        self.stop()
        if self._thread.is_alive():
            self._thread.join(3.0)
        if release is not None:
            release()


class Screen:
    """The terminal side of `fleet up`."""

    def __init__(self, console: Console, *, live: bool) -> None:
        """`live`: redraw a status block in place (a terminal, not -v)."""
        self.console = console
        self.gone = False  # the terminal went away (closed window, lost ssh): nothing more is said
        self.live_wanted = live
        self.live: Live | None = None
        self.parts: dict[str, str] = {}  # name -> up, starting, down
        self.ready_after: float | None = None
        self.started = time.monotonic()
        self.feed: StatusFeed | None = None
        self.footer = Text()

    # ------------------------------------------------------------ plain lines

    def _print(self, text: Text) -> None:
        """Print, unless the terminal is gone: a closed window must never keep fleet up from stopping
        its parts (the hang-up asks for exactly that, and every write after it fails)."""
        if self.gone:
            return
        try:
            self.console.print(text, soft_wrap=True)
        except (OSError, SystemExit):  # rich answers a broken pipe (`fleet up | tee`, tee ended by the same Ctrl-C)
            self.gone = True  # with SystemExit(1), its stdout pointed at /dev/null: the stop must still go on

    def banner(self, title: str, rows: list[Row], warnings: list[str]) -> None:
        """The banner: a title, one line per part, then the warnings in colour."""
        self._print(Text(title, style="bold"))
        width = max((len(r.name) for r in rows), default=6)
        for row in rows:
            line = Text("  ") + Text(row.name.ljust(width), style="bold cyan") + Text("  ") + row.text
            if row.pid is not None:
                line += Text(f"  [pid {row.pid}]", style="dim")
            self._print(line)
        for warning in warnings:
            self._print(Text("  ! ", style="bold yellow") + Text(warning, style="yellow"))

    def event(self, message: str, style: str = "") -> None:
        """A line above the status block (or a plain line)."""
        self._print(Text(message, style=style))

    # ------------------------------------------------------------ the live block

    def start_live(self, feed: StatusFeed, footer: Text) -> None:
        """Start redrawing the status block (only on a terminal, not -v)."""
        self.feed, self.footer = feed, footer
        if not self.live_wanted:
            return
        self.live = Live(console=self.console, get_renderable=self.render, refresh_per_second=2,
                         redirect_stdout=False, redirect_stderr=False)
        self.live.start()

    def stop_live(self) -> None:
        """Leave the last block on screen and stop redrawing it."""
        if self.feed is not None:
            self.feed.stop()
        live, self.live = self.live, None
        if live is None:
            return
        try:
            if not self.gone:
                live.refresh()
        except (OSError, SystemExit):  # a closed terminal, or a broken pipe as rich reports it (see _print)
            self.gone = True
        finally:
            with contextlib.suppress(OSError, SystemExit):
                live.stop()  # stops its refresh thread; its last write may fail on a closed terminal

    def render(self) -> RenderableType:
        """The status block as it is now."""
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column()
        grid.add_row("parts", self._parts())
        picture = self.feed.picture if self.feed else None
        if picture is None:
            problem = self.feed.problem if self.feed else None
            grid.add_row("fleet", Text(problem or "reading the fleet's state…", style="red" if problem else "dim"))
        else:
            for name, value in status_rows(picture):
                grid.add_row(name, value)
            if self.feed is not None and self.feed.problem:
                grid.add_row("", Text(f"(this is {STATUS_EVERY_S:.0f} s+ old: {self.feed.problem})", style="red"))
        grid.add_row("", self.footer)  # a cell wraps on a narrow terminal where a bare line would be cut
        up_for = time.monotonic() - self.started
        state = f"ready in {self.ready_after:.1f} s" if self.ready_after is not None else "starting"
        title = f"fleet up · {state} · up {_duration(up_for)}"
        return Panel(grid, title=title, title_align="left", border_style=_border(picture), expand=False)

    def _parts(self) -> Text:
        text = Text()
        for name, state in self.parts.items():
            dot, style = _DOT[state]
            text += Text(f"{dot} {name} {state}", style=style) + Text("   ")
        return text


def status_rows(p: dict[str, Any]) -> list[tuple[str, Text]]:
    """The status block's lines for one snapshot: runs, spend, switches, beat, watchdog."""
    now = datetime.fromisoformat(p["at"])
    dead = p["dlq_depth"]
    runs = Text(f"{len(p['running'])} running · {p.get('queued', 0)} queued · ")
    runs += Text(f"{dead} dead letter(s)", style="bold red" if dead else "")
    runs += Text(f" · {sum(p['runs_24h'].values())} run(s) in 24 h", style="dim")
    return [("runs", runs), ("spend", _spend(p)), ("switches", _switches(p)),
            ("beat", _beat(p, now)), ("watchdog", _watchdog(p, now))]


def _spend(p: dict[str, Any]) -> Text:
    scopes = p["spend"]["scopes"]
    fleet = next((s for s in scopes if s["scope"] == GLOBAL), None)
    if fleet is None or fleet["cap_usd"] is None:
        total = sum(s["spent_usd"] for s in scopes if s["scope"] != GLOBAL)
        return Text(f"{money(total)} today, no fleet-wide cap", style="yellow")
    used = fleet["spent_usd"] + fleet["reserved_usd"]
    share = 100.0 if fleet["cap_usd"] <= 0 else 100 * used / fleet["cap_usd"]
    style = "bold red" if share >= 90 else "yellow" if share >= 75 else "green"
    text = Text(f"{money(fleet['spent_usd'])} of {money(fleet['cap_usd'])} today ({share:.0f}%)", style=style)
    capped = [(100 * (s["spent_usd"] + s["reserved_usd"]) / s["cap_usd"], s["scope"]) for s in scopes
              if s["scope"] != GLOBAL and s["cap_usd"]]
    if capped:
        share, agent = max(capped)
        text += Text(f" · nearest its own cap: {agent} {share:.0f}%", style="dim")
    return text


def _switches(p: dict[str, Any]) -> Text:
    text = Text()
    for kill in p["kill"]:
        where = "the whole fleet" if kill["scope"] == GLOBAL else kill["scope"]
        text += Text(f"KILLED {where}", style="bold white on red") + Text(
            f" by {visible(kill['actor'] or '?')}: {visible(kill['reason'] or 'no reason')}; ", style="red")
    for pause in p.get("pauses", []):  # an agent's own pause gives its reason: shown inert, as `fleet status` does
        where = "the whole fleet" if pause["scope"] == GLOBAL else pause["scope"]
        text += Text(f"PAUSED {where}", style="bold black on yellow") + Text(
            f" by {visible(pause['actor'] or '?')}: {visible(pause['reason'] or 'no reason')}; ", style="yellow")
    if not text:
        return Text("no kill, no pause", style="green")
    return text + Text("`fleet resume [AGENT]` lifts", style="dim")


def _beat(p: dict[str, Any], now: datetime) -> Text:
    if p["redis"] != "ok":
        return Text(f"Redis {p['redis']}", style="bold red")
    tick = p["beat"]["last_tick"]
    if not tick:
        return Text("no tick yet", style="dim")
    return Text(f"last tick {_duration(metrics.age_seconds(now, tick))} ago")


def _watchdog(p: dict[str, Any], now: datetime) -> Text:
    verdict = p.get("watchdog")
    if verdict is None:
        return Text("no verdict yet (beat runs it every minute)", style="dim")
    age = metrics.age_seconds(now, verdict["at"])
    style = {"green": "green", "amber": "yellow", "red": "bold red"}.get(verdict["status"], "")
    text = Text(verdict["status"], style=style) + Text(f" {_duration(age)} ago")
    if age > WATCHDOG_STALE_S:
        text += Text(" STALE: is beat running?", style="bold red")
    bad = [c for c in verdict["checks"] if c["status"] != "green" and c["name"] != "kill_switch"]
    if bad:
        text += Text(f" · {bad[0]['name']}: {bad[0]['reason']}", style=style)
    return text


def _border(p: dict[str, Any] | None) -> str:
    if p is None:
        return "dim"
    if any(k["scope"] == GLOBAL for k in p["kill"]):
        return "red"
    verdict = p.get("watchdog") or {}
    if verdict.get("status") == "red" or p["redis"] != "ok":
        return "red"
    return "yellow" if p.get("pauses") or p["kill"] or verdict.get("status") == "amber" else "green"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:.0f} s"
    return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:.0f} min"
