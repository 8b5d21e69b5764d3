"""fleet.admission against a real Redis: a dispatch offers its script the lowest slots, and all of them
only when every slot offered is held, so a free slot is always found and never one held."""

from __future__ import annotations

import redis as redis_lib

from fleet import keys
from fleet.admission import SLOT_WINDOW, Admissions


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
