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
from fleet.locks import to_ms

# How long an attempt's count is remembered (keys.counted): longer than any retry of it (executor.REDIS_RETRY_S).
COUNTED_TTL_S = 300.0


class Outcome(str, Enum):
    """How a run ended, as far as the breaker cares."""

    SUCCESS = "success"
    FAILURE = "failure"
    AUTH = "auth"  # a revoked key: open at once
    NEUTRAL = "neutral"  # idle, transient, killed: says nothing about the agent's health


# The transitions as Lua functions, so that fleet/admission.py can run them inside a dispatch's or an
# outcome's single round trip; each script below is one of them applied to KEYS and ARGV. Time is the
# Redis server's own (TIME): every host judges the cool-down by one clock, so a worker whose clock is
# a day ahead cannot hold a breaker open for a day.
SERVER_NOW_FN = """
local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""

# allow(hash, cooldown_s, run_id or '' for a read-only look): {allowed (0/1), state}.
ALLOW_FN = SERVER_NOW_FN + """
local function allow(key, cooldown, run_id)
  local state = redis.call('HGET', key, 'state') or 'closed'
  if state == 'open' then
    local opened = tonumber(redis.call('HGET', key, 'opened_at') or '0')
    if server_now() - opened < tonumber(cooldown) then return {0, 'open'} end
    if run_id == '' then return {1, 'half_open'} end
    redis.call('HSET', key, 'state', 'half_open', 'trial', run_id)
    return {1, 'half_open'}
  end
  if state == 'half_open' then
    local trial = redis.call('HGET', key, 'trial')
    if trial and trial ~= '' and trial ~= run_id then return {0, 'half_open'} end
    if run_id ~= '' then redis.call('HSET', key, 'trial', run_id) end
    return {1, 'half_open'}
  end
  return {1, 'closed'}
end
"""

# record(hash, outcome, threshold, run_id, counted key, its ttl_ms): {old state, new state}. The counted key is the
# attempt's own (keys.counted): it keeps the first count's answer, so the same attempt counted again (its answer
# was lost to a dropped connection, and the executor tries again) changes nothing and answers the same transition.
RECORD_FN = SERVER_NOW_FN + """
local function count_outcome(key, outcome, threshold, run_id)
  local old = redis.call('HGET', key, 'state') or 'closed'
  local trial = redis.call('HGET', key, 'trial')
  if outcome == 'neutral' then
    if old == 'half_open' and trial == run_id then redis.call('HDEL', key, 'trial') end
    return {old, old}
  end
  if outcome == 'success' then
    if old == 'open' then return {old, old} end
    redis.call('HSET', key, 'state', 'closed', 'failures', 0)
    redis.call('HDEL', key, 'trial', 'opened_at')
    return {old, 'closed'}
  end
  local failures = redis.call('HINCRBY', key, 'failures', 1)
  if old == 'open' then return {old, old} end  -- a late failure does not stretch the cool-down
  if outcome == 'auth' or old == 'half_open' or failures >= tonumber(threshold) then
    redis.call('HSET', key, 'state', 'open', 'opened_at', string.format('%.6f', server_now()))
    redis.call('HDEL', key, 'trial')
    return {old, 'open'}
  end
  return {old, old}
end
local function record(key, outcome, threshold, run_id, counted, counted_ms)
  local done = redis.call('GET', counted)
  if done then
    local cut = string.find(done, ' ', 1, true)
    return {string.sub(done, 1, cut - 1), string.sub(done, cut + 1)}
  end
  local states = count_outcome(key, outcome, threshold, run_id)
  redis.call('SET', counted, states[1] .. ' ' .. states[2], 'PX', counted_ms)
  return states
end
"""

# forfeit(hash, run_id): frees a half-open trial that a refused or ended-unstarted run had taken.
FORFEIT_FN = """
local function forfeit(key, run_id)
  if redis.call('HGET', key, 'trial') == run_id then return redis.call('HDEL', key, 'trial') end
  return 0
end
"""

# reopen(hash, age_s): a breaker Redis lost (a restart without persistence) opened again as it was opened
# `age_s` ago by the database's record; never over a hash that exists (what Redis knows now stands).
_REOPEN = SERVER_NOW_FN + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', string.format('%.6f', server_now() - tonumber(ARGV[1])))
return 1
"""

_ALLOW = ALLOW_FN + "return allow(KEYS[1], ARGV[1], ARGV[2])"
_RECORD = RECORD_FN + "return record(KEYS[1], ARGV[1], ARGV[2], ARGV[3], KEYS[2], ARGV[4])"
_FORFEIT = FORFEIT_FN + "return forfeit(KEYS[1], ARGV[1])"


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
        self._reopen = client.register_script(_REOPEN)

    def peek(self, agent: str, *, cooldown_s: float) -> Verdict:
        """Would a run be let through now? Writes nothing (for dry runs)."""
        allowed, state = self._allow(keys=[keys.breaker(agent)], args=[cooldown_s, ""])
        return Verdict(bool(allowed), str(state))

    def admit(self, agent: str, run_id: str, *, cooldown_s: float) -> Verdict:
        """Let a run through, taking the single half-open trial if it is the one."""
        allowed, state = self._allow(keys=[keys.breaker(agent)], args=[cooldown_s, run_id])
        return Verdict(bool(allowed), str(state))

    def forfeit(self, agent: str, run_id: str) -> None:
        """Give back a trial taken by a run that was then refused for another reason."""
        self._forfeit(keys=[keys.breaker(agent)], args=[run_id])

    def record(self, agent: str, run_id: str, outcome: Outcome, *, threshold: int, attempt: int) -> tuple[str, str]:
        """Count a finished attempt, once however often it is asked; returns (old state, new state)."""
        old, new = self._record(keys=[keys.breaker(agent), keys.counted(run_id, attempt)],
                                args=[outcome.value, threshold, run_id, to_ms(COUNTED_TTL_S)])
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

    def reopen(self, agent: str, *, age_s: float) -> bool:
        """Open a breaker Redis lost again, as opened `age_s` ago; False when Redis has one for the agent."""
        return bool(self._reopen(keys=[keys.breaker(agent)], args=[max(0.0, age_s)]))

    def reset(self, agent: str) -> None:
        """Close the breaker by hand."""
        self._redis.delete(keys.breaker(agent))
