"""The soak's checker: over the effects log, the database, Redis and the Sentry envelopes.

The effects-log invariants are the fault suite's (tests/faults/effects.py, I1-I5). Added here:
A1 every fault that must alert did, exactly once; A2 every dead letter alerted exactly once and no
run that did not die was reported dead; A3 no storm: no fleet-wide or per-run alert repeated within
a minute, one cap refusal alert per agent and day (one more after each Redis restart), a breaker
alert when it opens, not again each time its half-open trial fails; R1 no lease
outlives the drain; O1 no process outlives the fleet; M1 worker memory and open files flat (first vs
last 10 % of the samples); W1 no worker exited unless a fault killed it.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlmodel import select

from bench.common import epoch
from fleet import db
from fleet.models import Run, RunStatus
from tests.faults.effects import EffectsLog
from tests.sentry_server import SentryServer

DEAD_KINDS = ("dead_letter", "crash_loop")
PER_RUN_KINDS = ("dead_letter", "crash_loop", "overspend")
FLEET_KINDS = ("watchdog_red", "redis_restart", "kill_engaged")
ALERT_WINDOW_S = 120.0  # an expected alert may wait for the watchdog's next minute, and its queue
RSS_SLACK = (1.25, 20 * 1024)  # last-10 % median RSS may be at most 1.25x the first plus 20 MiB (in KiB)
FD_SLACK = (1.10, 16)  # and open files at most 1.1x plus 16


@dataclass(frozen=True)
class Sample:
    """The worker processes (mains and pools) at one moment."""

    t: float
    processes: int
    rss_kib: int
    fds: int


@dataclass(frozen=True)
class Alert:
    """One alert event as Sentry received it."""

    received: float
    kind: str
    agent: str | None
    run_id: str | None
    message: str


def alerts_of(server: SentryServer) -> list[Alert]:
    """Every alert event received, in arrival order."""
    found = []
    for envelope in list(server.envelopes):
        for item in envelope.items:
            if item.type != "event":
                continue
            event = item.json()
            tags = event.get("tags") or {}
            tags = dict(tags) if isinstance(tags, list) else tags
            if "alert" in tags:
                message = event.get("message") or (event.get("logentry") or {}).get("message") or ""
                found.append(Alert(envelope.received, tags["alert"], tags.get("agent"), tags.get("run_id"),
                                   str(message)))
    return found


def check_fault_alerts(faults: list[Any], alerts: list[Alert]) -> list[str]:
    """A1: each alerting fault raised its alert once, within ALERT_WINDOW_S of its start."""
    problems = []
    for fault in faults:
        kind = fault.expected_alert
        if kind is None:
            continue
        seen = [a for a in alerts if a.kind == kind and fault.start <= a.received < fault.start + ALERT_WINDOW_S]
        if kind == "kill_engaged":
            seen = [a for a in seen if f"soak fault {fault.n}" in a.message]
        if len(seen) != 1:
            problems.append(f"A1: fault {fault.n} ({fault.kind}) raised {len(seen)} {kind} alert(s), not 1")
    return problems


def check_dead_letter_alerts(engine: Engine, alerts: list[Alert]) -> list[str]:
    """A2: one dead-letter (or crash-loop) alert per dead run, none for a run that did not die."""
    with db.session(engine) as session:
        status = {r.id: r.status for r in session.exec(select(Run))}
    per_run = Counter(a.run_id for a in alerts if a.kind in DEAD_KINDS)
    problems = [f"A2: dead run {run} raised {per_run[run]} dead-letter alert(s), not 1"
                for run, s in sorted(status.items()) if s == RunStatus.DEAD and per_run[run] != 1]
    problems += [f"A2: run {run} was reported dead-lettered but is {status.get(run, 'not in the database')}"
                 for run in sorted(r for r in per_run if r is not None) if status.get(run) != RunStatus.DEAD]
    return problems


def check_storms(alerts: list[Alert], redis_restarts: int) -> list[str]:
    """A3: alerts are raised once per transition, not once per refusal, per process or per trial."""
    last: dict[tuple[str, str | None, str | None], float] = {}
    refusals = Counter(a.agent for a in alerts if a.kind == "cap_refusal")
    problems = [f"A3: {n} cap_refusal alerts for {agent}, not one a day (+{redis_restarts} for Redis restarts)"
                for agent, n in sorted(refusals.items(), key=lambda kv: str(kv[0])) if n > 1 + redis_restarts]
    retrips = Counter(a.agent for a in alerts if a.kind == "breaker_opened" and "(half_open -> open)" in a.message)
    problems += [f"A3: breaker_opened sent {n} more time(s) for {agent}, each time its half-open trial failed"
                 for agent, n in sorted(retrips.items(), key=lambda kv: str(kv[0]))]
    for alert in alerts:
        if alert.kind not in FLEET_KINDS + PER_RUN_KINDS:
            continue
        key = (alert.kind, alert.agent, alert.run_id)
        if key in last and alert.received - last[key] < 60:
            problems.append(f"A3: {alert.kind} (agent {alert.agent}, run {alert.run_id}) sent again "
                            f"{alert.received - last[key]:.1f} s after the last")
        last[key] = alert.received
    return problems


def alerts_per_fault(faults: list[Any], alerts: list[Alert], end: float) -> None:
    """Fill each fault's `alerts`: what arrived from its start until the next fault's."""
    for i, fault in enumerate(faults):
        until = faults[i + 1].start if i + 1 < len(faults) else end
        fault.alerts = dict(Counter(a.kind for a in alerts if fault.start <= a.received < until))


def recoveries(faults: list[Any], log: EffectsLog) -> None:
    """Fill each fault's `recovered_s`: from its end to the end of the first attempt started after it that succeeded."""
    ends = {(e.run, e.attempt): e for e in log.of("END")}
    starts = sorted(log.of("START"), key=lambda e: e.t)
    for fault in faults:
        done = [ends[(s.run, s.attempt)].t for s in starts if s.t > fault.end and (s.run, s.attempt) in ends
                and ends[(s.run, s.attempt)].value == 0]
        fault.recovered_s = (min(done) - fault.end) if done else None


def check_flat(samples: list[Sample], warm: float) -> tuple[list[str], dict[str, float]]:
    """M1: the workers' RSS and open files in the last 10 % of samples against the first 10 % taken after
    `warm` (the first fault: by then every pool process has opened its connections)."""
    samples = [s for s in samples if s.t >= warm]
    if len(samples) < 10:
        return [f"M1: only {len(samples)} resource samples, too few to judge"], {}
    tenth = max(1, len(samples) // 10)
    first, last = samples[:tenth], samples[-tenth:]
    figures = {
        "rss_first_mib": statistics.median(s.rss_kib for s in first) / 1024,
        "rss_last_mib": statistics.median(s.rss_kib for s in last) / 1024,
        "fds_first": statistics.median(s.fds for s in first),
        "fds_last": statistics.median(s.fds for s in last),
        "procs_first": statistics.median(s.processes for s in first),
        "procs_last": statistics.median(s.processes for s in last),
    }
    problems = []
    ratio, slack = RSS_SLACK
    if figures["rss_last_mib"] * 1024 > figures["rss_first_mib"] * 1024 * ratio + slack:
        problems.append(f"M1: worker RSS grew from {figures['rss_first_mib']:.0f} to {figures['rss_last_mib']:.0f} MiB")
    if figures["fds_last"] > figures["fds_first"] * FD_SLACK[0] + FD_SLACK[1]:
        problems.append(f"M1: worker open files grew from {figures['fds_first']:.0f} to {figures['fds_last']:.0f}")
    return problems, figures


def sample(pids: list[int], t: float) -> Sample:
    """RSS and open files of some processes (one that is gone meanwhile counts nothing)."""
    rss = fds = alive = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            fds += len(list(Path(f"/proc/{pid}/fd").iterdir()))
        except OSError:
            continue
        alive += 1
        rss += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return Sample(t, alive, rss, fds)


def outcomes(engine: Engine) -> dict[str, Counter[str]]:
    """Run outcomes per behaviour (agent name without its number)."""
    from bench.soak_agents import behaviour_of

    table: dict[str, Counter[str]] = defaultdict(Counter)
    with db.session(engine) as session:
        for run in session.exec(select(Run)):
            table[behaviour_of(run.agent)][str(run.status)] += 1
    return table


def timeline(engine: Engine) -> list[tuple[float, str, int]]:
    """(finished at, status, cost in micros) of every finished run, for the plot."""
    with db.session(engine) as session:
        return sorted((epoch(r.finished_at), str(r.status), r.cost_micros)
                      for r in session.exec(select(Run)) if r.finished_at is not None)


def pids_in_group(pgid: int) -> list[int]:
    """Live processes of a process group."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[-1].split()
            if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
                found.append(int(entry.name))
    return found
