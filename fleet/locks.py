"""Fenced leases on an agent's concurrency slots, in Redis.

A lease's value is `run_id:fence`, where the fence comes from a per-agent counter that only grows,
so a holder whose lease expired and was taken over can be told apart from the new holder: every
renew and release names its fence and changes nothing when it no longer matches.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

import redis

from fleet import keys

# The lease logic as Lua functions, so that fleet/admission.py can run it inside a dispatch's single
# round trip; each script below is one of them applied to KEYS and ARGV.

# acquire(slot keys, their slot numbers, fence counter key, run_id, ttl_ms, taken, replace, fresh, room): {slot, fence},
# or nil when every slot offered is held, or `room` of them are ('' for no such bound: a number when runs the
# database shows live hold slots that are not offered yet count against the concurrency, as after fleet.toml
# lowered it below slots live runs hold). The numbers are a comma-separated list, one per key ('' when the keys
# are slots 0, 1, 2...: all of the agent's). `taken` is a comma-separated list of slot numbers the database says
# belong to live runs (after a Redis restart their keys are gone, but their agents are not). The same run asking
# again gets its own lease back, unless it holds it with fence `replace`: then the same slot gets a new
# fence (a retry must never share a fence with the attempt it replaces, even if that one re-asserted its
# key; a fence another taker issued since is kept). `fresh`: the run's id was minted in the caller's own
# open transaction, so no lease can hold it yet, and the scan for one (a GET per slot) is skipped.
ACQUIRE_FN = """
local function acquire(slots, offered, counter, run_id, ttl_ms, taken, replace, fresh, room)
  local prefix = run_id .. ':'
  local busy, numbers = {}, {}
  for n in string.gmatch(taken or '', '%d+') do busy[tonumber(n)] = true end
  for n in string.gmatch(offered or '', '%d+') do numbers[#numbers + 1] = tonumber(n) end
  local function number(i) return numbers[i] or i - 1 end
  local function new_fence()
    -- The counter never goes below the server's clock in microseconds, so fences keep growing
    -- even after a Redis restart without persistence wiped the counter.
    local now = redis.call('TIME')
    local floor = tonumber(now[1]) * 1000000 + tonumber(now[2])
    local fence = redis.call('INCR', counter)
    if fence < floor then
      fence = floor
      redis.call('SET', counter, string.format('%d', fence))
    end
    return fence
  end
  local function take(i)
    local fence = new_fence()
    -- %d, not tostring: Lua would print a number this large as 1.76e+15
    redis.call('SET', slots[i], prefix .. string.format('%d', fence), 'PX', ttl_ms)
    return {number(i), fence}
  end
  for i = 1, fresh and 0 or #slots do
    local v = redis.call('GET', slots[i])
    if v and string.sub(v, 1, #prefix) == prefix then
      local held = string.sub(v, #prefix + 1)
      -- Only the fence the caller saw is replaced: a newer one was issued by another taker, and is kept.
      if held == replace then return take(i) end
      redis.call('PEXPIRE', slots[i], ttl_ms)
      return {number(i), tonumber(held)}
    end
  end
  local limit, held, first = tonumber(room or ''), 0, nil
  for i = 1, #slots do
    if busy[number(i)] or redis.call('EXISTS', slots[i]) == 1 then
      held = held + 1
    elseif not limit then
      return take(i)
    elseif not first then
      first = i
    end
  end
  if first and held < limit then return take(first) end
  return nil
end
"""

# renew(slot key, expected value, ttl_ms): 1 when renewed, 0 when another holder has it. A key that
# vanished (Redis restarted, or the lease lapsed and nobody took it) is re-asserted with the same
# fence: the database row, fenced too, says whether the run is still ours.
RENEW_FN = """
local function renew(key, value, ttl_ms)
  local v = redis.call('GET', key)
  if v == value then
    return redis.call('PEXPIRE', key, ttl_ms)
  end
  if not v then
    redis.call('SET', key, value, 'PX', ttl_ms)
    return 1
  end
  return 0
end
"""

# release(slot key, expected value): 1 when released, 0 when the lease is not ours.
RELEASE_FN = """
local function release(key, value)
  if redis.call('GET', key) == value then
    return redis.call('DEL', key)
  end
  return 0
end
"""

# KEYS: the agent's slot keys, then its fence counter. ARGV: run_id, ttl_ms, taken, replace, room.
_ACQUIRE = ACQUIRE_FN + """
local slots = {}
for i = 1, #KEYS - 1 do slots[i] = KEYS[i] end
return acquire(slots, '', KEYS[#KEYS], ARGV[1], ARGV[2], ARGV[3], ARGV[4], false, ARGV[5])
"""
_RENEW = RENEW_FN + "return renew(KEYS[1], ARGV[1], ARGV[2])"  # KEYS: a slot key. ARGV: value, ttl_ms.
_RELEASE = RELEASE_FN + "return release(KEYS[1], ARGV[1])"  # KEYS: a slot key. ARGV: value.


@dataclass(frozen=True)
class Lease:
    """A held slot: which agent, which slot, which run, and its fencing token."""

    agent: str
    slot: int
    run_id: str
    fence: int

    @property
    def key(self) -> str:
        """The Redis key of this slot."""
        return keys.slot_lease(self.agent, self.slot)

    @property
    def value(self) -> str:
        """What the slot key holds while this lease is current."""
        return f"{self.run_id}:{self.fence}"


class Leases:
    """Acquire, renew, release and inspect an agent's slot leases."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def acquire(self, agent: str, concurrency: int, run_id: str, ttl_s: float, *, taken: set[int] | None = None,
                replacing: int | None = None) -> Lease | None:
        """Take a free slot for `run_id` (or return the one it holds; when it holds it with fence `replacing`,
        the same slot with a new fence); None when all are taken. `taken`: slots the database says live runs
        hold."""
        slot_keys = [keys.slot_lease(agent, i) for i in range(concurrency)]
        # Live runs above a lowered concurrency count against it: that many fewer of its slots may be held.
        above = sum(1 for slot in taken or () if slot >= concurrency)
        got = self._acquire(keys=[*slot_keys, keys.fence_counter(agent)],
                            args=[run_id, to_ms(ttl_s), slot_list(taken), "" if replacing is None else str(replacing),
                                  str(concurrency - above) if above else ""])
        if got is None:
            return None
        return Lease(agent, int(got[0]), run_id, int(got[1]))

    def renew(self, lease: Lease, ttl_s: float) -> bool:
        """Extend the lease, or re-assert it if its key vanished; False means another holder has it."""
        return bool(self._renew(keys=[lease.key], args=[lease.value, to_ms(ttl_s)]))

    def release(self, lease: Lease) -> bool:
        """Free the slot if the lease is still ours (a stale holder never frees a newer lease)."""
        return bool(self._release(keys=[lease.key], args=[lease.value]))

    def holder(self, agent: str, slot: int) -> Lease | None:
        """Who holds a slot now, if anyone."""
        value = self._redis.get(keys.slot_lease(agent, slot))
        return parse(agent, slot, cast(str, value)) if value else None  # decode_responses: str, never bytes

    def holders(self, agent: str, concurrency: int) -> list[Lease]:
        """Every held slot of an agent."""
        slot_keys = [keys.slot_lease(agent, i) for i in range(concurrency)]
        values = self._redis.mget(slot_keys) if slot_keys else []
        return [parse(agent, i, cast(str, v)) for i, v in enumerate(values) if v]

    def holders_of(self, concurrency: dict[str, int]) -> list[Lease]:
        """Every held slot of many agents, in one round trip (the watchdog looks at all of them)."""
        slots = [(agent, i) for agent, n in concurrency.items() for i in range(n)]
        values = self._redis.mget([keys.slot_lease(agent, i) for agent, i in slots]) if slots else []
        return [parse(agent, i, cast(str, v)) for (agent, i), v in zip(slots, values, strict=True) if v]


def parse(agent: str, slot: int, value: str) -> Lease:
    """Read a slot key's value back into a Lease."""
    run_id, _, fence = value.rpartition(":")
    return Lease(agent, slot, run_id, int(fence))


def to_ms(seconds: float) -> int:
    """Seconds as the whole milliseconds Redis takes (at least 1)."""
    return max(1, int(seconds * 1000))


def slot_list(slots: Iterable[int] | None) -> str:
    """Slot numbers as the scripts read them ('0,3')."""
    return ",".join(str(i) for i in sorted(slots or ()))
