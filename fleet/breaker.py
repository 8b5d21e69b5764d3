"""A circuit breaker per agent, shared by every worker through one Redis hash.

closed -> open after `threshold` consecutive failures (auth failures open it at once) -> half-open
after the cool-down, when exactly one trial run is let through fleet-wide -> closed on its success,
open again on its failure. Every transition is one Lua script, so concurrent workers agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import redis

from fleet import keys


class Outcome(str, Enum):
    """How a run ended, as far as the breaker cares."""

    SUCCESS = "success"
    FAILURE = "failure"
    AUTH = "auth"  # a revoked key: open at once
    NEUTRAL = "neutral"  # idle, transient, killed: says nothing about the agent's health


# KEYS: breaker hash. ARGV: now, cooldown_s, run_id (empty for a read-only look).
# Returns {allowed (0/1), state}.
_ALLOW = """
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
local now = tonumber(ARGV[1])
if state == 'open' then
  local opened = tonumber(redis.call('HGET', KEYS[1], 'opened_at') or '0')
  if now - opened < tonumber(ARGV[2]) then return {0, 'open'} end
  if ARGV[3] == '' then return {1, 'half_open'} end
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'trial', ARGV[3])
  return {1, 'half_open'}
end
if state == 'half_open' then
  local trial = redis.call('HGET', KEYS[1], 'trial')
  if trial and trial ~= '' and trial ~= ARGV[3] then return {0, 'half_open'} end
  if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'trial', ARGV[3]) end
  return {1, 'half_open'}
end
return {1, 'closed'}
"""

# KEYS: breaker hash. ARGV: outcome, now, threshold, run_id. Returns {old state, new state}.
_RECORD = """
local old = redis.call('HGET', KEYS[1], 'state') or 'closed'
local outcome = ARGV[1]
local trial = redis.call('HGET', KEYS[1], 'trial')
if outcome == 'neutral' then
  if old == 'half_open' and trial == ARGV[4] then redis.call('HDEL', KEYS[1], 'trial') end
  return {old, old}
end
if outcome == 'success' then
  if old == 'open' then return {old, old} end
  redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0)
  redis.call('HDEL', KEYS[1], 'trial', 'opened_at')
  return {old, 'closed'}
end
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
if old == 'open' then return {old, old} end  -- a late failure does not stretch the cool-down
if outcome == 'auth' or old == 'half_open' or failures >= tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', ARGV[2])
  redis.call('HDEL', KEYS[1], 'trial')
  return {old, 'open'}
end
return {old, old}
"""

# KEYS: breaker hash. ARGV: run_id. Frees a half-open trial that a refused dispatch had taken.
_FORFEIT = """
if redis.call('HGET', KEYS[1], 'trial') == ARGV[1] then return redis.call('HDEL', KEYS[1], 'trial') end
return 0
"""


@dataclass(frozen=True)
class Verdict:
    """Whether a run may go, and the breaker's state."""

    allowed: bool
    state: str


class Breakers:
    """The breakers of every agent."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._allow = client.register_script(_ALLOW)
        self._record = client.register_script(_RECORD)
        self._forfeit = client.register_script(_FORFEIT)

    def peek(self, agent: str, *, now: float, cooldown_s: float) -> Verdict:
        """Would a run be let through now? Writes nothing (for dry runs)."""
        allowed, state = self._allow(keys=[keys.breaker(agent)], args=[now, cooldown_s, ""])
        return Verdict(bool(allowed), str(state))

    def admit(self, agent: str, run_id: str, *, now: float, cooldown_s: float) -> Verdict:
        """Let a run through, taking the single half-open trial if it is the one."""
        allowed, state = self._allow(keys=[keys.breaker(agent)], args=[now, cooldown_s, run_id])
        return Verdict(bool(allowed), str(state))

    def forfeit(self, agent: str, run_id: str) -> None:
        """Give back a trial taken by a run that was then refused for another reason."""
        self._forfeit(keys=[keys.breaker(agent)], args=[run_id])

    def record(self, agent: str, run_id: str, outcome: Outcome, *, now: float, threshold: int) -> tuple[str, str]:
        """Count a finished run; returns (old state, new state)."""
        old, new = self._record(keys=[keys.breaker(agent)], args=[outcome.value, now, threshold, run_id])
        return str(old), str(new)

    def state(self, agent: str) -> dict[str, str]:
        """The raw breaker hash (for status pages)."""
        return dict(self._redis.hgetall(keys.breaker(agent)) or {"state": "closed"})  # type: ignore[arg-type]

    def states(self, agents: list[str]) -> dict[str, dict[str, str]]:
        """Many agents' breaker hashes in one round trip (status pages, the watchdog)."""
        pipe = self._redis.pipeline(transaction=False)
        for agent in agents:
            pipe.hgetall(keys.breaker(agent))
        return {agent: dict(raw or {"state": "closed"}) for agent, raw in zip(agents, pipe.execute(), strict=True)}

    def reset(self, agent: str) -> None:
        """Close the breaker by hand."""
        self._redis.delete(keys.breaker(agent))
