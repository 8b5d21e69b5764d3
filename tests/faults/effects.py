"""The effects log that test agents write themselves, and the invariants checked against it.

The agents (fleet/examples/effects_agent.py) record what really happened; Fleet's own account
(the database) is checked against that record, never the other way round:

I1  at most one START per run attempt, and never two attempts of one run alive at once
I2  spend per budget day within the caps, to the micro-dollar (from what the agents spent)
I3  every accepted run ends terminal, with exactly one terminal event
I4  no process of an agent alive once its run is terminal
I5  the ledger equals the runs: per day and scope, spent = sum of runs' costs and reserved =
    sum of their open reservations; and no run booked less than its agents reported spending
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine
from sqlmodel import select

from fleet import db
from fleet.keys import GLOBAL
from fleet.models import TERMINAL, Run, RunEvent, SpendDay

TERMINAL_EVENTS = {"run.succeeded", "run.idle", "run.failed", "run.killed", "run.archived", "run.dead"}


@dataclass(frozen=True)
class Effect:
    """One line of the effects log."""

    kind: str
    run: str
    attempt: str
    value: int  # pid for START/TICK, micros for SPEND, exit code for END
    pgid: int | None
    t: float


@dataclass
class EffectsLog:
    """A parsed effects log."""

    effects: list[Effect] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> EffectsLog:
        """Parse the log; a torn last line (a process killed mid-write) is ignored."""
        log = cls()
        if not path.exists():
            return log
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) < 5:
                continue
            kind, run, attempt = parts[0], parts[1], parts[2]
            pgid = int(parts[4]) if kind == "START" and len(parts) == 6 else None
            log.effects.append(Effect(kind, run, attempt, int(parts[3]), pgid, float(parts[-1])))
        return log

    def of(self, kind: str) -> list[Effect]:
        """Every effect of one kind."""
        return [e for e in self.effects if e.kind == kind]

    def starts(self, run: str) -> list[Effect]:
        """A run's START lines, in order."""
        return [e for e in self.of("START") if e.run == run]

    def pids(self, run: str) -> set[int]:
        """Every process that wrote anything for a run."""
        return {e.value for e in self.effects if e.run == run and e.kind in ("START", "TICK")}

    def spent(self, run: str | None = None) -> int:
        """Micro-dollars the agents reported spending (one run, or all)."""
        return sum(e.value for e in self.of("SPEND") if run is None or e.run == run)


def pid_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


def check_no_overlap(log: EffectsLog) -> list[str]:
    """I1: one START per attempt; an attempt starts only after every process of the one before fell silent."""
    problems = []
    by_run: dict[str, list[Effect]] = defaultdict(list)
    for effect in log.effects:
        by_run[effect.run].append(effect)
    for run, effects in by_run.items():
        starts = [e for e in effects if e.kind == "START"]
        attempts = [e.attempt for e in starts]
        if len(attempts) != len(set(attempts)):
            problems.append(f"I1: run {run} started twice in one attempt: {attempts}")
        for later in starts:
            earlier_after = [e for e in effects if _number(e.attempt) < _number(later.attempt) and e.t > later.t]
            if earlier_after:
                problems.append(f"I1: run {run} attempt {later.attempt} started at {later.t:.3f} while attempt "
                                f"{earlier_after[0].attempt} still wrote {earlier_after[0].kind} at "
                                f"{earlier_after[0].t:.3f}")
    return problems


def _number(attempt: str) -> int:
    return int(attempt) if attempt.isdigit() else 0


def check_caps(log: EffectsLog, engine: Engine, *, fleet_cap: int | None, agent_caps: dict[str, int]) -> list[str]:
    """I2: what the agents spent per day stays within each cap (the day is the one the run reserved on)."""
    with db.session(engine) as session:
        runs = {r.id: r for r in session.exec(select(Run))}
    per_scope: dict[tuple[str, str], int] = defaultdict(int)
    for effect in log.of("SPEND"):
        run = runs.get(effect.run)
        day = run.budget_day if run is not None and run.budget_day else "?"
        per_scope[(day, GLOBAL)] += effect.value
        if run is not None:
            per_scope[(day, run.agent)] += effect.value
    problems = []
    for (day, scope), spent in sorted(per_scope.items()):
        cap = fleet_cap if scope == GLOBAL else agent_caps.get(scope)
        if cap is not None and spent > cap:
            problems.append(f"I2: {scope} spent {spent} micro-dollars on {day}, over its cap of {cap}")
    return problems


def check_terminal(engine: Engine, run_ids: set[str] | None = None) -> list[str]:
    """I3: every run is terminal and has exactly one terminal event."""
    problems = []
    with db.session(engine) as session:
        runs = [r for r in session.exec(select(Run)) if run_ids is None or r.id in run_ids]
        events = list(session.exec(select(RunEvent).where(RunEvent.kind.in_(TERMINAL_EVENTS))))  # type: ignore[attr-defined]
    ends: dict[str, int] = defaultdict(int)
    for event in events:
        if event.run_id is not None:
            ends[event.run_id] += 1
    for run in runs:
        if run.status not in TERMINAL:
            problems.append(f"I3: run {run.id} of {run.agent} is {run.status}, not terminal")
        elif ends[run.id] != 1:
            problems.append(f"I3: run {run.id} of {run.agent} ended {ends[run.id]} times")
    if run_ids is not None and len(runs) != len(run_ids):
        missing = run_ids - {r.id for r in runs}
        problems.append(f"I3: accepted runs missing from the database: {sorted(missing)}")
    return problems


def runs_process_alive(pid: int, run: str) -> bool:
    """Whether `pid` is alive and still one of `run`'s processes: the agent and its children inherit
    FLEET_RUN_ID. A pid alone is not enough: where pid_max is 32,768, a half-hour soak wraps the pids
    around, and a process of the check's own time may hold a pid an agent wrote long ago."""
    if not pid_alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            environ = handle.read().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return False
    except PermissionError:
        return True  # cannot tell: count it (a false alarm is better than a missed survivor)
    return f"FLEET_RUN_ID={run}".encode() in environ


def check_no_survivors(log: EffectsLog, engine: Engine) -> list[str]:
    """I4: no process of a terminal run is alive."""
    with db.session(engine) as session:
        terminal = {r.id for r in session.exec(select(Run)) if r.status in TERMINAL}
    alive = {run: sorted(p for p in log.pids(run) if runs_process_alive(p, run)) for run in terminal}
    return [f"I4: run {run} is terminal but its processes {pids} still live" for run, pids in alive.items() if pids]


def check_ledger(log: EffectsLog, engine: Engine) -> list[str]:
    """I5: ledger rows equal the runs' costs and open reservations; no run booked less than it spent."""
    problems = []
    with db.session(engine) as session:
        runs = list(session.exec(select(Run)))
        days = list(session.exec(select(SpendDay)))
    expected: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for run in runs:
        if run.budget_day is None:
            continue
        open_reservation = run.reserved_micros if run.settled_at is None else 0
        prior = run.prior_cost_micros if run.prior_day else 0  # a retry after midnight: spent before it, then
        for scope in (run.agent, GLOBAL):
            expected[(run.budget_day, scope)][0] += run.cost_micros - prior
            expected[(run.budget_day, scope)][1] += open_reservation
            if run.prior_day:
                expected[(run.prior_day, scope)][0] += prior
        if run.cost_micros < log.spent(run.id):
            problems.append(f"I5: run {run.id} booked {run.cost_micros} but its agents spent {log.spent(run.id)}")
    for row in days:
        spent, reserved = expected.get((row.day, row.scope), [0, 0])
        if (row.spent_micros, row.reserved_micros) != (spent, reserved):
            problems.append(f"I5: ledger {row.day}/{row.scope} holds spent {row.spent_micros} reserved "
                            f"{row.reserved_micros}; the runs say spent {spent} reserved {reserved}")
    return problems


def check_all(log_path: Path, engine: Engine, *, run_ids: set[str] | None = None, fleet_cap: int | None = None,
              agent_caps: dict[str, int] | None = None) -> list[str]:
    """Every invariant; an empty list means the scenario kept every promise."""
    log = EffectsLog.read(log_path)
    return [*check_no_overlap(log), *check_caps(log, engine, fleet_cap=fleet_cap, agent_caps=agent_caps or {}),
            *check_terminal(engine, run_ids), *check_no_survivors(log, engine), *check_ledger(log, engine)]

