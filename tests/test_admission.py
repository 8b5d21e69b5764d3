"""fleet.admission against a real Redis: a dispatch offers its script the lowest slots, and all of them
only when every slot offered is held, so a free slot is always found and never one held."""

from __future__ import annotations

import redis as redis_lib

from fleet import keys
from fleet.admission import SLOT_WINDOW, Admissions
from fleet.locks import Leases


def _hold(client: redis_lib.Redis, agent: str, slots: range) -> None:
    for slot in slots:
        client.set(keys.slot_lease(agent, slot), f"{'o' * 32}:{slot + 1}", px=60_000)


def _admit(client: redis_lib.Redis, concurrency: int, taken: set[int], run_id: str = "r" * 32) -> tuple[str, int]:
    got = Admissions(client).admit("a", concurrency, run_id, cooldown_s=60, ttl_s=60, taken=taken)
    return got.verdict, -1 if got.lease is None else got.lease.slot


def test_a_free_slot_past_the_offered_ones_is_found(redis: redis_lib.Redis) -> None:
    """Every slot a dispatch offers first is held in Redis (runs admitted whose rows the database does not
    show yet): the second offer of all the slots finds the free one above them."""
    _hold(redis, "a", range(SLOT_WINDOW + 3))
    assert _admit(redis, 40, taken=set()) == ("ok", SLOT_WINDOW + 3)


def test_slots_the_database_holds_widen_the_offer(redis: redis_lib.Redis) -> None:
    """After a Redis restart the leases of 20 live runs are gone from Redis but not from the database: they
    are skipped, and the run gets the lowest slot nobody holds."""
    assert _admit(redis, 40, taken=set(range(20))) == ("ok", 20)


def test_an_agent_whose_every_slot_is_held_is_busy(redis: redis_lib.Redis) -> None:
    _hold(redis, "a", range(30))
    assert _admit(redis, 40, taken=set(range(30, 40))) == ("busy", -1)
    assert redis.get(keys.slot_lease("a", 39)) is None  # nothing was taken by the refused run


def test_only_slots_the_database_does_not_hold_are_offered_and_the_lowest_free_one_is_taken(
        redis: redis_lib.Redis) -> None:
    """Live runs hold every other slot by the database, Redis (restarted) holds none of them, and another
    dispatch's lease sits on slot 1 in Redis only (its row is not committed yet): the run gets slot 3."""
    _hold(redis, "a", range(1, 2))
    assert _admit(redis, 1000, taken={0, 2, 4, 6}) == ("ok", 3)


def test_a_window_of_free_slots_all_held_in_redis_looks_further(redis: redis_lib.Redis) -> None:
    """The database shows slots 0-99 taken and Redis holds the next SLOT_WINDOW + 1 (admitted, not yet
    committed): the second offer, of every slot the database leaves free, finds the one above them."""
    _hold(redis, "a", range(100, 100 + SLOT_WINDOW + 1))
    assert _admit(redis, 1000, taken=set(range(100))) == ("ok", 100 + SLOT_WINDOW + 1)


def test_a_lease_the_database_holds_is_never_handed_out_even_when_redis_lost_it(redis: redis_lib.Redis) -> None:
    assert _admit(redis, 3, taken={0, 1, 2}) == ("busy", -1)
    assert all(redis.get(keys.slot_lease("a", slot)) is None for slot in range(3))


def test_runs_live_above_a_lowered_concurrency_count_against_it(redis: redis_lib.Redis) -> None:
    """fleet.toml lowered the agent's concurrency from 4 to 2 while runs held slots 2 and 3: those two runs are
    the agent's two, and no slot below 2 may be handed out until one of them ends (with 3 live the agent would
    run more than its concurrency at once)."""
    _hold(redis, "a", range(2, 4))
    assert _admit(redis, 2, taken={2, 3}) == ("busy", -1)
    assert Admissions(redis).admit_many([("a", 2, "q" * 32, 60, 60, {2, 3})])[0].verdict == "busy"
    assert all(redis.get(keys.slot_lease("a", slot)) is None for slot in range(2))


def test_a_lowered_concurrency_counts_a_lease_in_redis_only_against_the_runs_above_it(
        redis: redis_lib.Redis) -> None:
    """Concurrency lowered to 3 with a run still in slot 5, and another dispatch's lease on slot 0 in Redis only
    (its row not committed yet): one more run fits (slot 1), and then none."""
    _hold(redis, "a", range(1))
    assert _admit(redis, 3, taken={5}) == ("ok", 1)
    assert _admit(redis, 3, taken={5}, run_id="s" * 32) == ("busy", -1)


def test_a_retry_under_a_lowered_concurrency_waits_for_the_runs_above_it(redis: redis_lib.Redis) -> None:
    """The reaper's retry of an abandoned run (Leases.acquire, `taken` by the database) under a concurrency
    lowered to 2 while two other runs hold slots 2 and 3: it waits for a slot, as a dispatch would."""
    _hold(redis, "a", range(2, 4))
    assert Leases(redis).acquire("a", 2, "t" * 32, 60, taken={2, 3}, replacing=7) is None
    assert all(redis.get(keys.slot_lease("a", slot)) is None for slot in range(2))
