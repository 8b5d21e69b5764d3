"""A run's Redis work in one round trip at each end: its admission, its claim, and its finish.

Each is one Lua script composed of the lease and breaker functions of fleet/locks.py and
fleet/breaker.py (one logic, two callers), so the gates a dispatch passes are judged atomically
against each other and cost one round trip instead of five:

admit   the kill flags (the fleet's and the agent's: any value kills), the pause flags, the breaker (taking the
        half-open trial when it is the one), a free slot's fenced lease (the trial is given back
        when none is free)
claim   the kill flags again and the lease renewed to the running TTL, as the executor starts
finish  the lease released if still ours, and the outcome counted by the breaker
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from fleet import keys
from fleet.breaker import ALLOW_FN, COUNTED_TTL_S, FORFEIT_FN, RECORD_FN, Outcome
from fleet.keys import GLOBAL
from fleet.locks import ACQUIRE_FN, RELEASE_FN, RENEW_FN, Lease, slot_list, to_ms

# KEYS: kill:*, kill:AGENT, paused:*, paused:AGENT, breaker:AGENT, the slot keys offered..., fence:AGENT.
# ARGV: run_id, cooldown_s, ttl_ms, the offered keys' slot numbers (none the database says live runs hold), the room
# (acquire's: '' unless live runs hold slots above the concurrency).
# Returns {'killed', scope index, value} | {'paused', scope index, value} | {'breaker_open', state}
# | {'busy', state} | {'ok', slot, fence, state}.
_ADMIT = ALLOW_FN + FORFEIT_FN + ACQUIRE_FN + """
for i = 1, 4 do
  local flag = redis.call('GET', KEYS[i])
  if flag then return {i <= 2 and 'killed' or 'paused', 2 - i % 2, flag} end
end
local verdict = allow(KEYS[5], ARGV[2], ARGV[1])
if verdict[1] == 0 then return {'breaker_open', verdict[2]} end
local slots = {}
for i = 6, #KEYS - 1 do slots[#slots + 1] = KEYS[i] end
local lease = acquire(slots, ARGV[4], KEYS[#KEYS], ARGV[1], ARGV[3], '', '', true, ARGV[5])  -- a dispatch's run is new
if not lease then
  forfeit(KEYS[5], ARGV[1])
  return {'busy', verdict[2]}
end
return {'ok', lease[1], lease[2], verdict[2]}
"""

# KEYS: kill:*, kill:AGENT, the slot key. ARGV: lease value, ttl_ms.
# Returns {'killed', scope index, value} | {'renewed', 0/1}.
_CLAIM = RENEW_FN + """
for i = 1, 2 do
  local flag = redis.call('GET', KEYS[i])
  if flag then return {'killed', i, flag} end
end
return {'renewed', renew(KEYS[3], ARGV[1], ARGV[2])}
"""

# KEYS: the slot key, breaker:AGENT, the attempt's counted key. ARGV: lease value, outcome, threshold, run_id,
# the counted key's ttl_ms. Returns {released 0/1, old state, new state}. Safe to repeat: the release is fenced,
# and the outcome is counted once per attempt.
_FINISH = RELEASE_FN + RECORD_FN + """
local released = release(KEYS[1], ARGV[1])
local states = record(KEYS[2], ARGV[2], ARGV[3], ARGV[4], KEYS[3], ARGV[5])
return {released, states[1], states[2]}
"""


@dataclass(frozen=True)
class Admission:
    """What Redis said about a dispatch: `ok` (with its lease), or why not."""

    verdict: str  # ok, killed, paused, breaker_open, busy; error (admit_many: this run's script failed)
    lease: Lease | None = None
    breaker: str = "closed"
    kill_scope: str | None = None
    kill_value: str | None = None
    error: str | None = None


# (agent, concurrency, run_id, cooldown_s, ttl_s, taken): one run's `admit`, as `admit_many` takes it.
AdmitRequest = tuple[str, int, str, float, float, set[int]]

# A dispatch offers the script only the lowest slots the database does not show taken: this many, which is
# more than the dispatches that can be between their admission and their commit at once (their leases are
# in Redis, their rows not yet queued). Only when every one offered is held does it offer all of the free
# ones (a second round trip). Offering every slot cost an agent of concurrency 1,000 a thousand keys packed
# and sent with every dispatch, and offering the taken ones too cost one key per live run.
SLOT_WINDOW = 16


def _admit_call(agent: str, offered: list[int], run_id: str, cooldown_s: float, ttl_s: float,
                room: int | None = None) -> dict[str, Any]:
    """The script's keys and arguments, offering the slots `offered` (lowest first); `room`: how many of them may
    be held at most for one to be taken (None: all but one)."""
    slot_keys = [keys.slot_lease(agent, i) for i in offered]
    return {"keys": [keys.kill(GLOBAL), keys.kill(agent), keys.paused(GLOBAL), keys.paused(agent),
                     keys.breaker(agent), *slot_keys, keys.fence_counter(agent)],
            "args": [run_id, cooldown_s, to_ms(ttl_s), slot_list(offered), "" if room is None else str(room)]}


def _free_and_room(concurrency: int, taken: set[int]) -> tuple[list[int], int | None]:
    """The slots below the concurrency the database leaves free, and the room (None: no bound but the slots). Live
    runs in slots at or above the concurrency (fleet.toml lowered it under them) count against it: then every free
    slot must be offered, and fewer than concurrency - live of them held, for one more run to start."""
    free = [slot for slot in range(concurrency) if slot not in taken]
    above = sum(1 for slot in taken if slot >= concurrency)
    return free, (concurrency - len(taken) if above else None)


def _admission(agent: str, run_id: str, got: Any) -> Admission:
    verdict = str(got[0])
    if verdict in ("killed", "paused"):  # the scope whose flag stops intake, and the flag as Redis holds it
        return Admission(verdict, kill_scope=GLOBAL if int(got[1]) == 1 else agent, kill_value=str(got[2]))
    if verdict == "ok":
        return Admission("ok", Lease(agent, int(got[1]), run_id, int(got[2])), breaker=str(got[3]))
    return Admission(verdict, breaker=str(got[1]))


class Admissions:
    """The three scripts, registered on one client."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._admit = client.register_script(_ADMIT)
        self._claim = client.register_script(_CLAIM)
        self._finish = client.register_script(_FINISH)

    def admit(self, agent: str, concurrency: int, run_id: str, *, cooldown_s: float, ttl_s: float,
              taken: set[int]) -> Admission:
        """Judge the kill flags, the breaker and the slots for one run, and take its lease if all pass.
        `taken`: the slots the database says live runs hold (Redis may have lost their keys)."""
        free, room = _free_and_room(concurrency, taken)
        if room is not None:  # (rare) all of them, counted
            return _admission(agent, run_id, self._admit(**_admit_call(agent, free, run_id, cooldown_s, ttl_s, room)))
        admission = _admission(agent, run_id, self._admit(**_admit_call(agent, free[:SLOT_WINDOW], run_id,
                                                                        cooldown_s, ttl_s)))
        if admission.verdict == "busy" and len(free) > SLOT_WINDOW:  # (its breaker trial was given back)
            admission = _admission(agent, run_id, self._admit(**_admit_call(agent, free, run_id, cooldown_s, ttl_s)))
        return admission

    def admit_many(self, wanted: list[AdmitRequest]) -> list[Admission]:
        """`admit` for many runs in one round trip (a pipeline; each script is still atomic on its own). A script
        that fails for one run (a key of the wrong type) is that run's `error`: the others' leases are kept."""
        pipe = self._redis.pipeline(transaction=False)
        for agent, concurrency, run_id, cooldown_s, ttl_s, taken in wanted:
            free, room = _free_and_room(concurrency, taken)
            self._admit(**_admit_call(agent, free, run_id, cooldown_s, ttl_s, room), client=pipe)
        return [Admission("error", error=str(got)) if isinstance(got, redis.ResponseError)
                else _admission(want[0], want[2], got)
                for want, got in zip(wanted, pipe.execute(raise_on_error=False), strict=True)]

    def claim(self, lease: Lease, *, ttl_s: float) -> tuple[str | None, str | None, bool]:
        """(killed scope, its raw flag, lease renewed): the executor's Redis side, as it starts a run."""
        got = self._claim(keys=[keys.kill(GLOBAL), keys.kill(lease.agent), lease.key], args=[lease.value, to_ms(ttl_s)])
        if str(got[0]) == "killed":
            return (GLOBAL if int(got[1]) == 1 else lease.agent), str(got[2]), False
        return None, None, bool(int(got[1]))

    def finish(self, lease: Lease, outcome: Outcome, *, threshold: int, attempt: int) -> tuple[bool, str, str]:
        """(released, breaker's old state, new state): the lease freed and the attempt's outcome counted, at once
        (and once: asked again, it answers what it answered first)."""
        got = self._finish(keys=[lease.key, keys.breaker(lease.agent), keys.counted(lease.run_id, attempt)],
                           args=[lease.value, outcome.value, threshold, lease.run_id, to_ms(COUNTED_TTL_S)])
        return bool(int(got[0])), str(got[1]), str(got[2])

