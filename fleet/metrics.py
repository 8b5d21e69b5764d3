"""Prometheus metrics: one custom collector that reads the fleet's state on each scrape.

Nothing is counted in-process: every scrape reads `fleet.state.snapshot` (plus two small queries the
snapshot does not carry), so any number of web processes report the same numbers, and a restart
loses nothing. Every family is a gauge named `fleet_*`. Enumerations (breaker state, watchdog colour)
are one-hot: one series per possible value, 1 for the current one, so `== 1` alerts are simple.
Families that need Redis are left out while Redis is down (`fleet_redis_up 0` says so); ages of
things that never happened (no beat tick yet) are left out rather than faked.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import func
from sqlmodel import col, select

from fleet import __version__, db, logs
from fleet.keys import GLOBAL
from fleet.models import Run
from fleet.services import Services
from fleet.state import snapshot

log = logs.get("fleet.metrics")
BREAKER_STATES = ("closed", "open", "half_open")
COLOURS = ("green", "amber", "red")


def registry(services: Services) -> CollectorRegistry:
    """A registry holding only the fleet collector (no process metrics of this one web process)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(FleetCollector(services))
    return reg


class FleetCollector(Collector):
    """Reads the fleet's state when scraped; a failed read is reported as `fleet_scrape_ok 0`."""

    def __init__(self, services: Services) -> None:
        self.services = services

    def describe(self) -> Iterable[Metric]:
        """Nothing up front: registering must not touch Redis or the database."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Every fleet_* family, from one snapshot."""
        began = time.perf_counter()
        ok = GaugeMetricFamily("fleet_scrape_ok", "1 when the fleet's state could be read (database answered)")
        try:
            picture = snapshot(self.services)
            now = datetime.fromisoformat(picture["at"])
            runs, reservations = run_counts(self.services, since=now - timedelta(hours=24))
            families = build_families(picture, runs, reservations, agents=list(self.services.config.agents))
        except Exception as exc:  # noqa: BLE001 - a scrape reports a failure rather than erroring
            log.warning("metrics: cannot read the fleet's state", error=logs.redact_value(str(exc)),
                        error_type=type(exc).__name__)
            families = []
            ok.add_metric([], 0)
        else:
            ok.add_metric([], 1)
        yield from families
        yield ok
        yield GaugeMetricFamily("fleet_scrape_duration_seconds", "How long reading the fleet's state took",
                                value=time.perf_counter() - began)


def run_counts(services: Services, *, since: datetime) -> tuple[dict[tuple[str, str], int], dict[str, int]]:
    """Runs created since `since` by (agent, status), and open (unsettled) reservations by agent."""
    with db.session(services.engine) as session:
        by_status = session.exec(
            select(Run.agent, Run.status, func.count()).where(col(Run.created_at) >= since)
            .group_by(Run.agent, Run.status)).all()
        open_ = session.exec(
            select(Run.agent, func.count()).where(col(Run.reserved_micros) > 0, col(Run.settled_at).is_(None))
            .group_by(Run.agent)).all()
    runs = {(agent, str(getattr(status, "value", status))): int(n) for agent, status, n in by_status}
    return runs, {agent: int(n) for agent, n in open_}


def build_families(picture: dict[str, Any], runs: dict[tuple[str, str], int], reservations: dict[str, int],
                   *, agents: list[str]) -> list[Metric]:
    """The metric families for one snapshot (pure: no I/O)."""
    now = datetime.fromisoformat(picture["at"])
    out: list[Metric] = [InfoMetricFamily("fleet", "Fleet's version", value={"version": __version__})]
    out += _run_families(picture, runs, reservations, agents)
    out += _spend_families(picture)
    out += _kill_families(picture, agents)
    out += _watchdog_families(picture, now)
    out.append(GaugeMetricFamily("fleet_dlq_depth", "Dead letters waiting (fleet dlq list)",
                                 value=picture["dlq_depth"]))
    redis_ok = picture.get("redis") == "ok"
    out.append(GaugeMetricFamily("fleet_redis_up", "1 when Redis answered during this scrape", value=int(redis_ok)))
    if redis_ok:
        out += _redis_families(picture, agents, now)
    return out


def _run_families(picture: dict[str, Any], runs: dict[tuple[str, str], int], reservations: dict[str, int],
                  agents: list[str]) -> list[Metric]:
    by_status = GaugeMetricFamily("fleet_runs_last_24h", "Runs created in the last 24 hours, by agent and status",
                                  labels=["agent", "status"])
    for (agent, status), n in sorted(runs.items()):
        by_status.add_metric([agent, status], n)
    running = GaugeMetricFamily("fleet_runs_running", "Runs running now, by agent", labels=["agent"])
    counts = {name: 0 for name in agents}
    for run in picture["running"]:
        counts[run["agent"]] = counts.get(run["agent"], 0) + 1
    for agent, n in sorted(counts.items()):
        running.add_metric([agent], n)
    open_ = GaugeMetricFamily("fleet_reservations_open", "Runs holding a spend reservation not yet settled",
                              labels=["agent"])
    for agent, n in sorted(({name: 0 for name in agents} | reservations).items()):
        open_.add_metric([agent], n)
    return [by_status, running, open_]


def _spend_families(picture: dict[str, Any]) -> list[Metric]:
    help_scope = "scope '*' is the whole fleet, any other scope an agent"
    spent = GaugeMetricFamily("fleet_spend_dollars", f"Spent today, settled ({help_scope})", labels=["scope"])
    reserved = GaugeMetricFamily("fleet_spend_reserved_dollars", f"Reserved today, not yet settled ({help_scope})",
                                 labels=["scope"])
    cap = GaugeMetricFamily("fleet_spend_cap_dollars", f"Daily cap; absent when uncapped ({help_scope})",
                            labels=["scope"])
    for scope in picture["spend"]["scopes"]:
        spent.add_metric([scope["scope"]], scope["spent_usd"])
        reserved.add_metric([scope["scope"]], scope["reserved_usd"])
        if scope["cap_usd"] is not None:
            cap.add_metric([scope["scope"]], scope["cap_usd"])
    return [spent, reserved, cap]


def _kill_families(picture: dict[str, Any], agents: list[str]) -> list[Metric]:
    kill = GaugeMetricFamily("fleet_kill_engaged", "1 when the kill switch of a scope is engaged ('*': the fleet)",
                             labels=["scope"])
    engaged = {k["scope"] for k in picture["kill"]}
    for scope in sorted({GLOBAL, *agents, *engaged}):
        kill.add_metric([scope], int(scope in engaged))
    return [kill]


def _watchdog_families(picture: dict[str, Any], now: datetime) -> list[Metric]:
    verdict = picture.get("watchdog")
    status = GaugeMetricFamily("fleet_watchdog_status", "The last watchdog verdict, one-hot (all 0: none yet)",
                               labels=["status"])
    checks = GaugeMetricFamily("fleet_watchdog_check", "Each check of the last watchdog verdict, one-hot",
                               labels=["check", "status"])
    out: list[Metric] = [status, checks]
    current = verdict["status"] if verdict else None
    for colour in COLOURS:
        status.add_metric([colour], int(current == colour))
    if verdict:
        for check in verdict["checks"]:
            for colour in COLOURS:
                checks.add_metric([check["name"], colour], int(check["status"] == colour))
        out.append(GaugeMetricFamily("fleet_watchdog_age_seconds", "Seconds since the last watchdog verdict",
                                     value=age_seconds(now, verdict["at"])))
    return out


def _redis_families(picture: dict[str, Any], agents: list[str], now: datetime) -> list[Metric]:
    queues = GaugeMetricFamily("fleet_queue_depth", "Messages waiting in a Celery queue", labels=["queue"])
    for queue, depth in sorted(picture["queues"].items()):
        queues.add_metric([queue], depth)
    breaker = GaugeMetricFamily("fleet_breaker_state", "Circuit breaker state per agent, one-hot",
                                labels=["agent", "state"])
    failures = GaugeMetricFamily("fleet_breaker_failures", "Consecutive failures counted by the breaker",
                                 labels=["agent"])
    for agent, raw in sorted(picture["breakers"].items()):
        for state in BREAKER_STATES:
            breaker.add_metric([agent, state], int(raw.get("state", "closed") == state))
        failures.add_metric([agent], float(raw.get("failures") or 0))
    paused = GaugeMetricFamily("fleet_agent_paused", "1 when an agent's intake is paused (its own pause or the "
                               "fleet's: fleet pause, fleet_done, exit 78)", labels=["agent"])
    for agent in sorted(agents):
        paused.add_metric([agent], int(agent in picture["paused"] or "*" in picture["paused"]))
    canary = GaugeMetricFamily("fleet_canary_age_seconds", "Seconds since a canary last came back through a queue",
                               labels=["queue"])
    for queue, seen in sorted(picture["canaries"].items()):
        if seen.get("seen"):
            canary.add_metric([queue], age_seconds(now, seen["seen"]))
    orphaned = GaugeMetricFamily("fleet_orphan_agents", "Agent groups found alive on a host without a live run "
                                 "(and killed there), at that host's last scan", labels=["host"])
    for host, n in sorted(picture.get("orphans", {}).items()):
        orphaned.add_metric([host], n)
    out: list[Metric] = [queues, breaker, failures, paused, canary, orphaned,
                         GaugeMetricFamily("fleet_beat_leader", "1 when a beat holds the leader lease",
                                           value=int(bool(picture["beat"]["leader"])))]
    if picture["beat"]["last_tick"]:
        out.append(GaugeMetricFamily("fleet_last_tick_age_seconds", "Seconds since beat last sent a tick",
                                     value=age_seconds(now, picture["beat"]["last_tick"])))
    return out


def age_seconds(now: datetime, iso: str) -> float:
    """Seconds from an ISO timestamp (naive means UTC) to `now`, never negative."""
    at = datetime.fromisoformat(iso)
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return max(0.0, (now - at).total_seconds())
