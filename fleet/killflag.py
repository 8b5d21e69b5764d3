"""The kill flag in Redis: its record, and raising it with nothing but redis-py.

`fleet kill` raises the flag before it imports the database layer (a quarter of a second at 2am that
agents would keep spending money in); fleet/killswitch.py then writes the mirror and says where the
kill landed. The flag's value is Fleet's JSON record; any value at all under a kill key is a kill.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime

import redis

from fleet import keys
from fleet.errors import BadInputError

MAX_REASON = 1000  # characters: the mirror's column (KillSwitch.reason), so a reason is kept whole or refused


def check_reason(reason: str | None) -> None:
    """Refuse a reason the mirror could not store whole or at all (BadInputError, exit 65), before anything is set."""
    if reason is None:
        return
    if len(reason) > MAX_REASON:
        raise BadInputError(f"--reason is {len(reason)} characters long; at most {MAX_REASON} are kept")
    if "\x00" in reason:
        raise BadInputError("--reason must not contain a NUL character")
    try:
        reason.encode()
    except UnicodeEncodeError:  # argv bytes that are not UTF-8 arrive as lone surrogates, which no database takes
        raise BadInputError("--reason is not valid UTF-8 text (check the terminal's encoding)") from None


def record(*, reason: str | None, actor: str | None, at: datetime, hard: bool, delivery_tag: str | None = None) -> str:
    """The flag's value: who, why, when, and whether Celery is asked to terminate too (`delivery_tag`: the broker
    message that asked, for a kill that reaches only Redis to be known when kombu delivers it again)."""
    tagged = {} if delivery_tag is None else {"delivery_tag": delivery_tag}
    return json.dumps({"reason": reason, "actor": actor, "at": at.isoformat(), "hard": hard, **tagged})


def raise_flag(client: redis.Redis, *, scope: str, reason: str | None, actor: str, at: datetime, hard: bool,
               delivery_tag: str | None = None) -> None:
    """Set the kill flag of `scope` (in force at once); raises redis.RedisError when Redis cannot take it."""
    check_reason(reason)
    client.set(keys.kill(scope), record(reason=reason, actor=actor, at=at, hard=hard, delivery_tag=delivery_tag))


# Deletes the key only while it still holds the value given (a flag someone set since is theirs to keep).
_DELETE_IF_OURS = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


def put_back(client: redis.Redis, key: str, value: str, still_engaged: Callable[[], bool], *,
             only_if_missing: bool = True) -> bool:
    """Set a flag Redis lost (a kill's or a pause's) from its mirror row; whether it was put back.
    `only_if_missing=False`: the flag of a pause its mirror holds already (an agent's own, written with its
    outcome), set whatever Redis holds.

    A resume releases the mirror, then deletes the flag: one committed between the caller's read of the mirror
    and this set may have deleted before we set, and the flag would outlive its resume (every tick refused,
    the mirror saying released). So the mirror is read again after the set (`still_engaged`, a fresh statement)
    and what we set is taken back if it was released. Raises redis.RedisError."""
    if not client.set(key, value, nx=only_if_missing):
        return False
    if still_engaged():
        return True
    client.eval(_DELETE_IF_OURS, 1, key, value)
    return False
