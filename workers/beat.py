"""The beat scheduler: sends only while it holds the leader lease, and reloads fleet.toml on change.

Two beats (HA, or `-B` by mistake) never double-fire: only the lease holder sends, and even if
two did, each tick names its slot and the dispatch's unique key keeps it to one run.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from typing import Any

import redis
from celery.beat import PersistentScheduler

import beat_schedule
from fleet import keys, logs
from fleet.config import Settling, load_fleet_config, mtime_of, still_settling
from fleet.errors import ConfigError
from fleet.services import redis_client
from workers.app import settings

log = logs.get(__name__)
LEADER_TTL_S = 10.0

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LeaderScheduler(PersistentScheduler):
    """A PersistentScheduler that fires only as leader and keeps the last good fleet.toml."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.identity = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.redis = redis_client(settings.broker_url)
        self._renew = self.redis.register_script(_RENEW)
        self._release = self.redis.register_script(_RELEASE)
        self.leader = False
        self.config_mtime: float | None = None
        self.settling = Settling()  # how long a changed fleet.toml has been waited for
        super().__init__(*args, **kwargs)

    def setup_schedule(self) -> None:
        """Load entries from fleet.toml on start."""
        super().setup_schedule()
        self._reload(force=True)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """One beat loop: hold (or wait for) the lease, pick up config changes, then fire as leader."""
        self._reload()
        if not self._hold_lease():
            return 1.0
        return min(float(super().tick(*args, **kwargs)), 1.0)

    def _hold_lease(self) -> bool:
        try:
            held = bool(self._renew(keys=[keys.beat_leader()], args=[self.identity, int(LEADER_TTL_S * 1000)]))
        except redis.RedisError as exc:
            held = False
            log.warning("beat.lease_unreachable", error=str(exc))
        if held != self.leader:
            log.info("beat.leader" if held else "beat.standby", identity=self.identity)
            self.leader = held
        return held

    def _reload(self, force: bool = False) -> None:
        path = settings.config
        mtime = mtime_of(path)
        if not force and (mtime == self.config_mtime or (mtime is not None and self.settling.wait(mtime))):
            return  # unchanged, or still being saved: a later tick looks again
        # A file read while it may be mid-save (a beat starting then) is read again once it settles: the finished
        # file may keep the empty one's mtime (both writes in one timestamp tick) and never look changed.
        self.config_mtime = None if mtime is not None and still_settling(mtime) else mtime
        try:
            config = load_fleet_config(path)
        except ConfigError as exc:
            # A running beat keeps its last good schedule and says what is wrong.
            log.error("beat.config_invalid", error=str(exc), keeping="last good schedule")
            return
        self.merge_inplace(beat_schedule.build(config))  # also drops entries of removed agents
        log.info("beat.schedule_loaded", entries=sorted(self.schedule))

    def close(self) -> None:
        """Give up the lease at once, so a standby takes over without waiting for it to expire."""
        with contextlib.suppress(redis.RedisError):
            self._release(keys=[keys.beat_leader()], args=[self.identity])
        super().close()
