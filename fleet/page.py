"""The operator's page as HTML: the snapshot's view (banners, spend rows, agent rows, the overall
state) and the pictures, rendered by templates/index.html. Pure functions of the snapshot
(`fleet.state.snapshot`) and the history (`fleet.state.history`); no request, no I/O."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tornado.template

from fleet import __version__, charts, keys, ledger, metrics, watchdog

REFRESH_S = 10
WATCHDOG_STALE_S = 300.0  # the watchdog runs every minute; a verdict older than this means it stopped
TEMPLATES = tornado.template.Loader(str(Path(__file__).parent / "templates"), autoescape="xhtml_escape")


def render_page(picture: dict[str, Any] | None, *, error: str | None, flower_url: str, token_query: str,
                host: str, past: dict[str, Any] | None = None, csrf: str = "",
                agents: list[dict[str, Any]] | None = None) -> bytes:
    """The page's HTML (every value escaped by the template; the pictures are SVG drawn by fleet.charts,
    whose labels it escapes itself)."""
    now = datetime.fromisoformat(picture["at"]) if picture else datetime.now(UTC)
    return TEMPLATES.load("index.html").generate(
        p=picture, flower_url=flower_url, tq=token_query, host=host, refresh_s=REFRESH_S, version=__version__,
        now=now, banners=banners(picture, error, now), spend=spend_rows(picture), ago=lambda iso: _ago(now, iso),
        money=_money, tone=_tone, overall=_overall, pictures=pictures(past), csrf=csrf, agents=agents or [],
        fleet_state=fleet_state(picture))


def pictures(past: dict[str, Any] | None) -> dict[str, Any]:
    """The page's SVG pictures: spend per scope (by the scope's name), runs per hour, durations."""
    if past is None:
        return {"spend": {}, "hours": "", "durations": ""}
    return {"spend": {s.name: charts.spend_chart(s, past["start"], past["end"], past["now"]) for s in past["spend"]},
            "hours": charts.runs_per_hour(past["hours"]), "durations": charts.durations(past["durations"])}


def fleet_state(p: dict[str, Any] | None) -> str:
    """`killed`, `paused` or `running`: what the fleet-wide switches say."""
    if p is None:
        return "unknown"
    if any(k["scope"] == keys.GLOBAL for k in p["kill"]):
        return "killed"
    return "paused" if any(x["scope"] == keys.GLOBAL for x in p.get("pauses", [])) else "running"


def agent_rows(p: dict[str, Any] | None, specs: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per agent for the page's actions: its state (killed, paused, breaker, ok) and today's runs."""
    if p is None:
        return []
    killed = {k["scope"]: k for k in p["kill"]}
    paused = {x["scope"]: x for x in p.get("pauses", [])}
    runs = {s["scope"]: s.get("runs", 0) for s in p["spend"]["scopes"]}
    rows = []
    for name, spec in sorted(specs.items()):
        breaker = p.get("breakers", {}).get(name, {}).get("state", "closed")
        state, tone = ("killed", "red") if name in killed else ("paused", "amber") if name in paused else (
            (f"breaker {breaker}", "red" if breaker == "open" else "amber") if breaker != "closed" else ("ok", "green"))
        bound = spec.max_runs_per_day
        rows.append({"name": name, "state": state, "tone": tone, "schedule": spec.schedule or "by hand",
                     "runs": f"{runs.get(name, 0)} of {bound}" if bound else str(runs.get(name, 0)),
                     "killed": name in killed, "paused": name in paused})
    return rows


def banners(p: dict[str, Any] | None, error: str | None, now: datetime) -> list[tuple[str, str, str]]:
    """(tone, title, detail) lines for the top of the page, most severe first."""
    if p is None:
        return [("red", "Cannot read the fleet's state", error or "unknown error")]
    out = []
    for k in sorted(p["kill"], key=lambda k: k["scope"] != keys.GLOBAL):
        who = "FLEET KILLED: nothing starts, running agents were stopped" if k["scope"] == keys.GLOBAL \
            else f"Agent {k['scope']} killed"
        who += " (hard)" if k.get("hard") else ""
        out.append(("red", who, f"{k['reason'] or 'no reason given'} (by {k['actor'] or '?'}, "
                                f"{_ago(now, k['since'])}). Lift with: fleet resume"
                                + ("" if k["scope"] == keys.GLOBAL else f" {k['scope']}")))
    for x in sorted(p.get("pauses", []), key=lambda x: x["scope"] != keys.GLOBAL):
        what = "FLEET PAUSED: nothing new starts, running runs finish" if x["scope"] == keys.GLOBAL \
            else f"Agent {x['scope']} paused: nothing new starts"
        out.append(("amber", what, f"{x['reason'] or 'no reason given'} (by {x['actor'] or '?'}, "
                                   f"{_ago(now, x['since'])}). Lift with: fleet resume"
                                   + ("" if x["scope"] == keys.GLOBAL else f" {x['scope']}")))
    if p["redis"] != "ok":
        out.append(("red", "Redis unreachable", f"{p['redis']}: every dispatch is refused, and running agents "
                                                "stop once it has been down longer than the grace"))
    verdict = p.get("watchdog")
    if verdict is None:
        out.append(("amber", "No watchdog verdict yet", "is beat running? `fleet watchdog` checks by hand"))
    else:
        bad = [c for c in verdict["checks"] if c["status"] != "green" and c["name"] != "kill_switch"]
        if verdict["status"] != "green" and bad:
            worst = watchdog.worst([c["status"] for c in bad])
            out.append((worst, f"Watchdog {verdict['status'].upper()}",
                        "; ".join(f"{c['name']}: {c['reason']}" for c in bad)))
        age = metrics.age_seconds(now, verdict["at"])
        if age > WATCHDOG_STALE_S:
            out.append(("amber", "Watchdog verdict is stale", f"last one {_ago(now, verdict['at'])}: is beat running?"))
    opened = [a for a, b in p.get("breakers", {}).items() if b.get("state", "closed") != "closed"]
    if opened:
        out.append(("amber", "Circuit breaker not closed", ", ".join(f"{a} ({p['breakers'][a]['state']})"
                                                                      for a in sorted(opened))))
    return sorted(out, key=lambda b: b[0] != "red")


def spend_rows(p: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Each scope's spend as bar widths (percent of its cap) and a tone."""
    rows = []
    for s in (p or {}).get("spend", {}).get("scopes", []):
        cap, spent, reserved = s["cap_usd"], s["spent_usd"], s["reserved_usd"]
        row = {"name": "whole fleet" if s["scope"] == keys.GLOBAL else s["scope"], "spent": spent,
               "reserved": reserved, "cap": cap, "spent_pct": 0.0, "reserved_pct": 0.0, "used_pct": None,
               "tone": "muted"}
        if cap is not None:
            used = 100.0 if cap <= 0 else 100 * (spent + reserved) / cap
            row["spent_pct"] = 100.0 if cap <= 0 else min(100.0, 100 * spent / cap)
            row["reserved_pct"] = 0.0 if cap <= 0 else min(100.0 - row["spent_pct"], 100 * reserved / cap)
            row["used_pct"] = used
            row["tone"] = "red" if used >= 90 else "amber" if used >= 75 else "green"
        rows.append(row)
    return rows


_TONES = {"succeeded": "green", "green": "green", "closed": "green", "ok": "green",
          "running": "blue", "queued": "blue", "created": "blue", "half_open": "amber", "amber": "amber",
          "killed": "amber", "abandoned": "amber", "idle": "muted", "archived": "muted",
          "failed": "red", "dead": "red", "open": "red", "red": "red"}


def _tone(word: str | None) -> str:
    return _TONES.get(word or "", "muted")


def _overall(items: list[tuple[str, str, str]]) -> tuple[str, str]:
    tones = {tone for tone, _, _ in items}
    if any(title.startswith("FLEET KILLED") for _, title, _ in items):
        return "red", "KILLED"
    if any(title.startswith("FLEET PAUSED") for _, title, _ in items) and "red" not in tones:
        return "amber", "PAUSED"
    return ("red", "ATTENTION") if "red" in tones else ("amber", "WARNING") if "amber" in tones else ("green", "OK")


def _money(value: float | None) -> str:
    return "no cap" if value is None else ledger.money(value)


def _ago(now: datetime, iso: str | None) -> str:
    if not iso:
        return "never"
    seconds = metrics.age_seconds(now, iso)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"
