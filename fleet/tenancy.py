"""One fleet per Redis database.

Fleet's keys (kill flags, pauses, slot leases, breakers, the beat leader) and its queues carry no
fleet's name: two fleets on one Redis database would take each other's messages (a run that is not
in the taker's database is dropped as `not_found`), share each other's leases and leader, and a kill
in one would stop the other. So a fleet marks the Redis database it uses with its own id (made once
with its database, fleet_identity), renewed by each watchdog pass and released by `fleet up` as it
stops; `fleet up` refuses to start on a database another fleet's mark holds, and a watchdog pass that
finds another fleet's mark turns red.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis
from sqlalchemy import Engine
from sqlmodel import Session

from fleet import keys
from fleet.models import FleetIdentity

MARK_TTL_S = 300  # five watchdog passes: a fleet stopped without releasing its mark frees the database this soon

# claim(owner key, our id, ttl s): false when the mark is ours now (set or renewed), else the other id.
_CLAIM = """
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[1] then return {held, redis.call('TTL', KEYS[1])} end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return false
"""
# release(owner key, our id): the mark is deleted only while it is ours.
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


@dataclass(frozen=True)
class OtherFleet:
    """The mark of another fleet on this Redis database."""

    fleet_id: str
    expires_in_s: int  # -1: it never expires (set by hand)

    def describe(self) -> str:
        """What the operator reads."""
        lapse = (f"its mark lapses in {self.expires_in_s} s unless that fleet renews it, as a running one does "
                 f"every minute: within {MARK_TTL_S // 60} minutes of its stop"
                 if self.expires_in_s >= 0 else "its mark does not expire")
        return (f"another fleet (id {self.fleet_id[:8]}, a database other than this one) uses this Redis database: "
                f"two fleets on one Redis database take each other's runs and kills; give each fleet its own "
                f"(FLEET_REDIS_URL=redis://HOST:6379/N, N from 0 to 15) or stop the other ({lapse})")


def fleet_id(engine: Engine) -> str:
    """This fleet's id, from its (migrated) database."""
    with Session(engine) as session:
        identity = session.get(FleetIdentity, 1)
    if identity is None:  # the migration makes the row; a database without it was not migrated by Fleet
        raise LookupError("fleet_identity has no row: run `fleet db upgrade`")
    return identity.fleet_id


def claim(client: redis.Redis, ours: str, ttl_s: int = MARK_TTL_S) -> OtherFleet | None:
    """Mark the Redis database as this fleet's, or renew the mark; another fleet's mark, if it holds it."""
    held = client.eval(_CLAIM, 1, keys.owner(), ours, ttl_s)
    if not held:
        return None
    other, ttl = held
    return OtherFleet(str(other), int(ttl))


def marked_by(client: redis.Redis) -> OtherFleet | None:
    """The fleet whose mark this Redis database holds (None: no mark), for the caller to compare with its own
    id; nothing is written."""
    pipe = client.pipeline(transaction=False)
    pipe.get(keys.owner())
    pipe.ttl(keys.owner())
    held, ttl = pipe.execute()
    if held is None:
        return None
    return OtherFleet(str(held), int(ttl))


def release(client: redis.Redis, ours: str) -> None:
    """Take the mark off, if it is still this fleet's."""
    client.eval(_RELEASE, 1, keys.owner(), ours)
