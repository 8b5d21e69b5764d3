"""The kill flag in Redis: its record, and raising it with nothing but redis-py.

`fleet kill` raises the flag before it imports the database layer (a quarter of a second at 2am that
agents would keep spending money in); fleet/killswitch.py then writes the mirror and says where the
kill landed. The flag's value is Fleet's JSON record; any value at all under a kill key is a kill.
"""

from __future__ import annotations

import json
from datetime import datetime

import redis

from fleet import keys
from fleet.errors import BadInputError

MAX_REASON = 1000  # characters: the mirror's column (KillSwitch.reason), so a reason is kept whole or refused


def check_reason(reason: str | None) -> None:
    """Refuse a reason the mirror could not store whole (BadInputError, exit 65), before anything is set."""
    if reason is None:
        return
    if len(reason) > MAX_REASON:
        raise BadInputError(f"--reason is {len(reason)} characters long; at most {MAX_REASON} are kept")
    if "\x00" in reason:
        raise BadInputError("--reason must not contain a NUL character")


def record(*, reason: str | None, actor: str | None, at: datetime, hard: bool) -> str:
    """The flag's value: who, why, when, and whether Celery is asked to terminate too."""
    return json.dumps({"reason": reason, "actor": actor, "at": at.isoformat(), "hard": hard})


def raise_flag(client: redis.Redis, *, scope: str, reason: str | None, actor: str, at: datetime, hard: bool) -> None:
    """Set the kill flag of `scope` (in force at once); raises redis.RedisError when Redis cannot take it."""
    check_reason(reason)
    client.set(keys.kill(scope), record(reason=reason, actor=actor, at=at, hard=hard))
