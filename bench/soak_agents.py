"""The soak's fleet.toml: 50 agents on second-level schedules with a night's mix of behaviours.

Every agent is fleet/examples/effects_agent.py, so each records what it really did (START, TICK,
SPEND, END) in the effects log the checker reads. Timings are the fault suite's, shortened so a
3-minute soak sees leases lapse, retries, resends and breakers close again.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from fleet import ledger

FLEET = """
[fleet]
daily_cap_usd = {fleet_cap}
lease_ttl_s = 5
heartbeat_s = 0.5
kill_poll_s = 0.1
kill_grace_s = 1
retry_backoff_s = 0.5
breaker_threshold = 3
breaker_cooldown_s = 20
kill_unreachable_grace_s = 3
resend_after_s = 10
outcome_retry_s = 900
"""
FLEET_CAP_USD = 50.0
EFFECTS = ["python", "-m", "fleet.examples.effects_agent", "--log", "{tmp}/effects.log", "--tick", "0.5"]
POLL_IDLE = ["python", "-m", "fleet.examples.has_work", "--marker", "{tmp}/no-work-today"]


@dataclass(frozen=True)
class Behaviour:
    """One kind of agent: how many, what it runs, how often (seconds, drawn per agent), its fleet.toml fields."""

    name: str
    count: int
    args: tuple[str, ...]
    every: tuple[int, int]
    est_cost_usd: float
    fields: dict[str, object] = field(default_factory=dict)
    poll: bool = False
    exact: bool = True  # reports no more than it reserved: its cap holds to the micro-dollar

    @property
    def cap_usd(self) -> float | None:
        """Its own daily cap, if it has one."""
        cap = self.fields.get("daily_cap_usd")
        return float(cap) if isinstance(cap, int | float) else None


# Schedules between 1 and 10 s, most at the slow end, then stretched by `pace`: at pace 1 they ask for
# ~8 ticks a second, and two cores shared with other test suites (load 10) absorb 2-3: the soak would
# measure a backlog of ticks, not faults. The default pace 3 fits this machine; --pace 1 is the issue's.
BEHAVIOURS = (
    Behaviour("quick", 17, ("--seconds", "0.2", "--cost", "0.001"), (4, 10), 0.001),
    Behaviour("long", 8, ("--seconds", "{long_s}", "--steps", "4", "--cost", "0.002", "--child"), (4, 10), 0.008),
    Behaviour("transient", 6, ("--seconds", "0.2", "--cost", "0.001", "--first-exit", "75"), (6, 10), 0.001),
    Behaviour("crash", 3, ("--seconds", "0.3", "--crash"), (6, 10), 0.001),
    Behaviour("idle", 11, (), (5, 10), 0.001, poll=True),
    Behaviour("capped", 2, ("--seconds", "0.1", "--cost", "0.01"), (1, 2), 0.01, {"daily_cap_usd": 0.10}),
    Behaviour("overspender", 1, ("--seconds", "1", "--steps", "5", "--cost", "0.01"), (3, 3), 0.001,
              {"daily_cap_usd": 0.025}, exact=False),  # its third report passes the cap by $0.005
    Behaviour("done", 1, ("--seconds", "0.1", "--done", "converged"), (5, 5), 0.001),
    Behaviour("auth", 1, ("--seconds", "0.1", "--exit", "77"), (10, 10), 0.001),
)


def behaviour_of(agent: str) -> str:
    """The behaviour an agent name belongs to (`quick-07` -> `quick`)."""
    return agent.rsplit("-", 1)[0]


def _toml_list(words: list[str]) -> str:
    return "[" + ", ".join(f'"{w}"' for w in words) + "]"


def fleet_toml(seed: int, pace: float = 1.0) -> str:
    """The whole file (with `{tmp}` left for the harness to fill in); the same seed, the same file.
    Every schedule's interval is multiplied by `pace`."""
    rng = random.Random(seed)
    parts = [FLEET.format(fleet_cap=FLEET_CAP_USD)]
    for kind in BEHAVIOURS:
        for n in range(kind.count):
            args = [a.replace("{long_s}", str(rng.randint(6, 15))) for a in kind.args]
            every = max(1, round(rng.randint(*kind.every) * pace))
            lines = [f"[agents.{kind.name}-{n:02d}]", f"command = {_toml_list([*EFFECTS, *args])}",
                     f'schedule = "every {every}s"', f"est_cost_usd = {kind.est_cost_usd}", "timeout_s = 60"]
            if kind.poll:
                lines.append(f"poll = {_toml_list(POLL_IDLE)}")
            lines += [f"{name} = {value}" for name, value in kind.fields.items()]
            parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def caps_micros(agents: list[str]) -> tuple[int, dict[str, int]]:
    """The fleet cap and each exact agent's own cap, in micro-dollars (what I2 holds them to)."""
    kinds = {k.name: k for k in BEHAVIOURS}
    agent_caps = {}
    for agent in agents:
        kind = kinds[behaviour_of(agent)]
        if kind.exact and kind.cap_usd is not None:
            agent_caps[agent] = ledger.to_micros(kind.cap_usd) or 0
    return ledger.to_micros(FLEET_CAP_USD) or 0, agent_caps


def inexact_agents(agents: list[str]) -> set[str]:
    """Agents that report more than they reserve: their cap can be passed by one report, which must alert."""
    kinds = {k.name: k for k in BEHAVIOURS}
    return {a for a in agents if not kinds[behaviour_of(a)].exact}
