"""The fleet at a glance: one JSON picture for `fleet status --json`, `/api/state` and the web page."""

from __future__ import annotations

import datetime as dt
import json
from datetime import timedelta
from typing import Any

import redis
from sqlalchemy import func
from sqlmodel import Session, select

from fleet import db, keys, killswitch, ledger, pause, store, watchdog
from fleet.errors import BadInputError
from fleet.keys import GLOBAL
from fleet.models import DeadLetter, Run, RunStatus
from fleet.services import Services


def spend_report(services: Services, day: str | None = None) -> dict[str, Any]:
    """Per-scope spend for a day (today by default), reserved and actual, against the caps."""
    with db.session(services.engine) as session:
        if day is None:
            day = ledger.budget_day(session, services.config.fleet.timezone)
        else:
            try:
                dt.date.fromisoformat(day)
            except ValueError:
                raise BadInputError(f"--day must be YYYY-MM-DD, got {day!r}") from None
        rows = {r.scope: r for r in ledger.day_rows(session, day=day)}
    caps = {GLOBAL: services.config.fleet.daily_cap_usd} | {
        n: a.daily_cap_usd for n, a in services.config.agents.items()}
    scopes = []
    for scope in sorted(set(caps) | set(rows), key=lambda s: (s != GLOBAL, s)):
        row = rows.get(scope)
        spent, reserved = (row.spent_micros, row.reserved_micros) if row else (0, 0)
        cap = caps.get(scope)
        scopes.append({"scope": scope, "spent_usd": spent / 1e6, "reserved_usd": reserved / 1e6, "cap_usd": cap,
                       "left_usd": None if cap is None else round(cap - (spent + reserved) / 1e6, 6),
                       "spent_micros": spent, "reserved_micros": reserved})
    return {"day": day, "timezone": services.config.fleet.timezone, "scopes": scopes}


def snapshot(services: Services) -> dict[str, Any]:
    """Everything an operator needs in one look; Redis being down is reported, not raised."""
    now = services.now()
    with db.session(services.engine) as session:
        picture: dict[str, Any] = {
            "at": now.isoformat(),
            "kill": [_kill_json(k) for k in killswitch.engaged(session)],
            "runs_24h": store.count_by_status(session=session, since=now - timedelta(hours=24)),
            "running": [_running_json(r) for r in session.exec(select(Run).where(Run.status == RunStatus.RUNNING))],
            "queued": session.exec(select(func.count()).select_from(Run).where(Run.status == RunStatus.QUEUED)).one(),
            "recent": [_recent_json(r) for r in store.list_runs(session=session, limit=20)],
            "dlq_depth": session.exec(select(func.count()).select_from(DeadLetter)).one(),
            "dead_letters": [_dead_json(d) for d in store.list_dead_letters(session=session, limit=10)],
            "watchdog": _verdict_json(session),
        }
    picture["spend"] = spend_report(services)
    picture |= _redis_part(services)
    if picture["redis"] == "ok":
        picture["kill"] += _unmirrored_kills(services, {k["scope"] for k in picture["kill"]}, now)
    picture["pauses"] = _pauses(services, picture["redis"] == "ok")
    picture["paused"] = {p["scope"]: p["reason"] or "paused" for p in picture["pauses"]}
    return picture


def _pauses(services: Services, redis_ok: bool) -> list[dict[str, Any]]:
    """Every pause in force (a pause stops intake; a kill also stops what runs: they are shown apart)."""
    scopes = [GLOBAL, *services.config.agents]
    with db.session(services.engine) as session:
        try:
            found = pause.paused(session, services.redis if redis_ok else None, scopes)
        except (redis.RedisError, UnicodeDecodeError):
            found = pause.paused(session, None, scopes)
    return [{"scope": p.scope, "reason": p.reason, "actor": p.actor, "since": p.at.isoformat() if p.at else None}
            for p in found]


def _unmirrored_kills(services: Services, mirrored: set[str], now: dt.datetime) -> list[dict[str, Any]]:
    """Kill flags only Redis holds (a mirror write that failed, a flag set by hand): in force all the same,
    so shown as kills until the watchdog has mirrored them."""
    scopes = [s for s in (GLOBAL, *services.config.agents) if s not in mirrored]
    try:
        values = services.redis.mget([keys.kill(s) for s in scopes]) if scopes else []
    except (redis.RedisError, UnicodeDecodeError):
        return []
    flags = [killswitch.parse_flag(s, v) for s, v in zip(scopes, values, strict=True) if v is not None]
    return [{"scope": f.scope, "reason": f.reason, "actor": f.actor, "hard": f.hard,
             "since": (f.at or now).isoformat(), "mirrored": False} for f in flags]


def _redis_part(services: Services) -> dict[str, Any]:
    r = services.redis
    try:
        return {
            "redis": "ok",
            "queues": {q: int(r.llen(q)) for q in watchdog.QUEUES},
            "breakers": {name: services.breakers.state(name) for name in services.config.agents},
            "canaries": {q: {"sent": r.get(keys.canary_sent(q)), "back": r.get(keys.canary(q)),
                             "seen": r.get(keys.canary_seen(q))} for q in watchdog.QUEUES},
            "beat": {"leader": r.get(keys.beat_leader()), "last_tick": r.get(keys.last_tick())},
        }
    except redis.RedisError as exc:
        return {"redis": f"unreachable: {exc.__class__.__name__}"}


def _kill_json(k: Any) -> dict[str, Any]:
    return {"scope": k.scope, "reason": k.reason, "actor": k.actor, "hard": k.hard, "since": k.changed_at.isoformat(),
            "mirrored": True}


def _running_json(r: Run) -> dict[str, Any]:
    return {"run_id": r.id, "agent": r.agent, "attempt": r.attempt, "host": r.host, "pid": r.pid,
            "started_at": r.started_at.isoformat() if r.started_at else None}


def _recent_json(r: Run) -> dict[str, Any]:
    return {"run_id": r.id, "agent": r.agent, "status": str(getattr(r.status, "value", r.status)),
            "attempt": r.attempt, "exit_code": r.exit_code, "cost_usd": r.cost_micros / 1e6,
            "created_at": r.created_at.isoformat(), "error": r.error}


def _dead_json(d: DeadLetter) -> dict[str, Any]:
    return {"id": d.id, "agent": d.agent, "run_id": d.run_id, "reason": d.reason, "attempts": d.attempts,
            "exit_code": d.exit_code, "error": d.last_error, "created_at": d.created_at.isoformat(),
            "replayed_run_id": d.replayed_run_id}


def _verdict_json(session: Session) -> dict[str, Any] | None:
    verdict = watchdog.latest(session)
    if verdict is None:
        return None
    return {"status": verdict.status, "at": verdict.at.isoformat(), "host": verdict.host,
            "checks": json.loads(verdict.checks)}
