"""Watching a running attempt: the kill flag, proof of ownership, and the running-cost guard.

Two threads share the work, so that the kill never waits on the database:
- the process runner's thread calls `Watcher.watch` every `kill_poll_s` and `Watcher.usage` on each
  usage line. It touches Redis only (the kill flags, the lease renewal) and the Bookkeeper's flags.
- the `Bookkeeper` thread does everything that needs the database: booking spend as it is reported
  (and the headroom that comes back), the fenced heartbeat, the kill mirror, recording the pid,
  shipping the run's log (fleet/runlog.py).
Either proof of ownership (a renewed Redis lease, or a fenced database heartbeat) extends the
launcher's tether; when neither has succeeded for long enough, the launcher stops the agent on
its own, before the lease can lapse and a retry start elsewhere (fleet/launcher.py).
"""

from __future__ import annotations

import threading
import time
from datetime import datetime

import redis
from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col

from fleet import alerts, db, killswitch, ledger, logs, store
from fleet.errors import first_line
from fleet.ledger import Caps
from fleet.locks import Lease
from fleet.models import Run, RunStatus
from fleet.process import Tether
from fleet.runlog import Shipper
from fleet.services import Services
from fleet.usage import LineParser

log = logs.get(__name__)
BAD_USAGE = "bad_usage"  # stop reason: a usage line Fleet cannot price (fleet/usage.py)


class Ownership:
    """Until when this attempt may run: the newest proof of ownership plus what it is good for."""

    def __init__(self, good_for_s: float) -> None:
        self.good_for_s = good_for_s
        self._lock = threading.Lock()
        self.valid_until = time.monotonic() + good_for_s  # the claim itself just proved it
        self._tether: Tether | None = None

    def tether(self) -> Tether:
        """A tether for the next process of the attempt (a poll, then the command), as taut as ownership."""
        with self._lock:
            self._tether = Tether(max(0.0, self.valid_until - time.monotonic()))
            return self._tether

    def proven(self, since: float) -> None:
        """A proof that began at `since` (monotonic) succeeded: extend the tether from then."""
        with self._lock:
            until = since + self.good_for_s
            if until > self.valid_until:
                self.valid_until = until
                if self._tether is not None:
                    self._tether.extend(until - time.monotonic())

    def lapsed(self) -> bool:
        """Whether the agent outlived its last proof (the launcher stopped it, or is stopping it)."""
        return time.monotonic() >= self.valid_until


LOST_SPEND = "run.orphaned_spend"  # the receipt of a lost attempt's spend booked so far


def book_lost_spend(session: Session, *, run: Run, total: int, now: datetime) -> int:
    """Book what an attempt that lost its run has spent beyond what it booked as the run's owner (`total`,
    cumulative), without the new owner's reservation; what was added. Each booking leaves a receipt of the
    total booked, so a retry of a commit whose answer was lost, or the end after the bookkeeper, books only
    the rest (the same attempt under the same fence: only one process ever runs it). The first booking
    replaces the stand-in the reaper booked as it took the run over, up or down."""
    fence = run.fence or 0
    # The run's row locked first: two bookings at once (the bookkeeper's outliving its join, and the end's) take
    # turns, and the second reads the first's receipt (PostgreSQL; SQLite's transaction holds the write lock).
    current = session.get(Run, run.id, with_for_update=True, populate_existing=True)
    receipts = store.attempt_events(session=session, run_id=run.id, kind=LOST_SPEND, attempt=run.attempt, fence=fence)
    if receipts:
        amount = total - max(int(receipt.get("total", 0)) for receipt in receipts)
        if amount <= 0:
            return 0
    else:
        # The reaper that took the run over booked this attempt a stand-in (its reservation): what it spent
        # replaces it, up or down (a refund is never more than the run has booked: ledger._book).
        stand_in = sum(int(taken.get("stand_in", 0)) for taken in store.attempt_events(
            session=session, run_id=run.id, kind="run.abandoned", attempt=run.attempt, fence=fence))
        amount = total - stand_in
        if amount == 0 and stand_in == 0:
            return 0
    if current is not None and amount:
        ledger.charge(session, run=run, amount=amount, now=now, own_reservation=False, current=current)
    store.add_event(session=session, at=now, kind=LOST_SPEND, run_id=run.id, agent=run.agent, attempt=run.attempt,
                    fence=fence, micros=amount, total=total)
    return amount


class Bookkeeper:
    """The attempt's database work, on a thread of its own, off the watch loop's thread."""

    def __init__(self, services: Services, run: Run, lease: Lease, caps: Caps, ownership: Ownership,
                 room: int | None, shipper: Shipper | None = None) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"bookkeeper-{run.id}", daemon=True)
        self.services, self.run, self.lease, self.caps = services, run, lease, caps
        self.ownership, self.shipper = ownership, shipper
        fleet = services.config.fleet
        self.heartbeat_s = fleet.heartbeat_s
        self._wake = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._reported = 0  # the newest cumulative cost the agent reported
        self._started: tuple[int, int] | None = None
        self.charged = 0  # micro-dollars of this attempt booked in the ledger
        self.owned = 0  # of which booked as the run's owner (the rest, as a lost attempt's: book_lost_spend)
        # The most this attempt may cost before it must stop: its reservation plus what the caps still
        # allowed when it was last looked at (None: no cap).
        self.allowance: int | None = None if room is None else run.reserved_micros + max(room, 0)
        self.stop_reason: str | None = None  # over_cap, lease_lost or killed (the mirror)
        self.lost = False

    # ------------------------------------------------------------ from the watch loop (never blocks)

    def report(self, cost_micros: int) -> None:
        """The agent's cumulative cost so far: book it soon."""
        with self._lock:
            self._reported = max(self._reported, cost_micros)
        self._wake.set()

    def record_start(self, pid: int, pgid: int) -> None:
        """Where the agent runs: recorded with the next heartbeat."""
        self._started = (pid, pgid)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def finish(self) -> int:
        """Stop the thread; what it booked (the rest is booked with the outcome)."""
        self._done.set()
        self._wake.set()
        self._thread.join(timeout=30)
        return self.charged

    # ------------------------------------------------------------ the thread

    def _loop(self) -> None:
        # The claim stamped the first heartbeat: the next is due a heartbeat later, and the pid rides on
        # it, so a run shorter than `heartbeat_s` costs no commit here at all.
        next_beat = time.monotonic() + self.heartbeat_s
        while not self._done.is_set():
            self._wake.wait(max(0.0, next_beat - time.monotonic()))
            self._wake.clear()
            if self._done.is_set():
                return
            self._book()
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + self.heartbeat_s
                self._heartbeat()
                self._mirror()
                if self.shipper is not None:  # the log so far, for any host's `fleet logs` and page
                    self.shipper.ship(self.services.now())

    def _book(self) -> None:
        with self._lock:
            reported = self._reported
        step = reported - self.charged
        if step <= 0:
            return
        services = self.services
        try:
            with db.session(services.engine) as session:
                # The cumulative figure, not the step: a commit whose answer was lost is not booked twice.
                booked = None if self.lost else ledger.book_attempt(session, run=self.run, total=reported,
                                                                    now=services.now())
                if booked is None:  # the run is another attempt's now: what we spent is booked as a lost one's
                    book_lost_spend(session, run=self.run, total=reported - self.owned, now=services.now())
                current = session.get(Run, self.run.id, populate_existing=True)
                own = current.reserved_micros if current is not None else 0
                room = None if self.run.budget_day is None else ledger.headroom(
                    session, day=self.run.budget_day, agent=self.run.agent, caps=self.caps)
                session.commit()
        except SQLAlchemyError as exc:
            log.warning("run.charge_failed", run_id=self.run.id, error=first_line(exc))
            return  # booked later, or with the outcome
        self.charged = reported
        if booked is not None:
            self.owned = reported
        if room is None:
            return
        self.allowance = reported + own + max(room, 0)
        if room < 0:
            alerts.alert("overspend", f"run {self.run.id} of {self.run.agent} took today's spend past a cap by "
                         f"{ledger.money(ledger.to_usd(-room))}", agent=self.run.agent, run_id=self.run.id,
                         over_micros=-room)
            self.stop_reason = self.stop_reason or "over_cap"

    def _heartbeat(self) -> None:
        since = time.monotonic()
        started = self._started
        where = {"pid": started[0], "pgid": started[1]} if started else {}
        try:
            with db.session(self.services.engine) as session:
                owned = session.execute(update(Run).where(
                    col(Run.id) == self.run.id, col(Run.fence) == self.lease.fence,
                    col(Run.status) == RunStatus.RUNNING).values(heartbeat_at=ledger.database_now(session), **where))
                session.commit()
        except SQLAlchemyError:
            return  # the Redis lease may still prove ownership; the tether decides
        if started is self._started:
            self._started = None
        if db.rowcount(owned) == 1:
            self.ownership.proven(since)
        else:
            self.lost = True
            self.stop_reason = self.stop_reason or "lease_lost"

    def _mirror(self) -> None:
        # The durable mirror now and then: a kill flag that Redis lost must still stop the agent.
        try:
            with db.session(self.services.engine) as session:
                state = killswitch.check_mirror(session, self.run.agent)
        except SQLAlchemyError:
            return
        if state.killed:
            self.stop_reason = self.stop_reason or "killed"


class Watcher:
    """The watch loop's callbacks (fleet.process calls them on the runner's thread)."""

    def __init__(self, services: Services, run: Run, lease: Lease, ownership: Ownership,
                 bookkeeper: Bookkeeper, lease_renewed_at: float) -> None:
        self.services, self.run, self.lease = services, run, lease
        self.lease_renewed_at = lease_renewed_at  # monotonic, at or before the last renewal to the full TTL
        self.ownership, self.books = ownership, bookkeeper
        fleet = services.config.fleet
        self.heartbeat_every, self.lease_ttl = fleet.heartbeat_s, fleet.lease_ttl_s
        self.unreachable_grace = fleet.kill_unreachable_grace_s
        self.next_heartbeat = time.monotonic() + self.heartbeat_every
        self.unreachable_since: float | None = None
        self.stop_reason: str | None = None
        self.reserved = run.reserved_micros
        self._last_cost = 0
        self.meter: LineParser | None = None  # the agent command's usage parser (its `problem` stops it)

    @property
    def lost(self) -> bool:
        """Whether another owner took the run over while it ran."""
        return self.stop_reason == "lease_lost" or self.books.lost

    def started(self, pid: int, pgid: int) -> None:
        """The agent started: the bookkeeper records where."""
        self.books.record_start(pid, pgid)

    def may_start(self) -> str | None:
        """Just before the agent is spawned: a kill that landed since the claim read the flags keeps it unstarted.
        Redis not answering within a quarter second (it did at the claim, a moment ago) lets it start: the watch
        loop's checks stop it past kill_unreachable_grace_s, as they would a Redis lost a moment later."""
        self.stop_reason = self.stop_reason or self._kill_check(self.services.instant_redis)
        return self.stop_reason

    def watch(self, _cost_micros: int) -> str | None:
        """Every poll: stop on a kill, on a lost lease, or on what the bookkeeper found."""
        self.stop_reason = (self.stop_reason or self._kill_check() or self._renew_if_due()
                            or self.books.stop_reason)
        return self.stop_reason

    def usage(self, cost_micros: int) -> str | None:
        """Each usage line: hand it to the bookkeeper, and stop before one more step like this one could
        pass what the caps allowed when last looked at (the reservation always covers itself)."""
        if self.meter is not None and self.meter.problem:
            self.stop_reason = self.stop_reason or BAD_USAGE  # tokens Fleet cannot price are never $0
            return BAD_USAGE
        step, self._last_cost = cost_micros - self._last_cost, cost_micros
        self.books.report(cost_micros)
        allowance = self.books.allowance
        if allowance is not None and cost_micros > self.reserved and cost_micros + step > allowance:
            self.stop_reason = self.stop_reason or "over_cap"
            return "over_cap"
        return None

    def _kill_check(self, client: redis.Redis | None = None) -> str | None:
        try:
            state = killswitch.check_redis(client or self.services.fast_redis, self.run.agent)
            self.unreachable_since = None
        except redis.RedisError:
            # The mirror is read by the bookkeeper; but without Redis nobody can throw the switch in time,
            # so past the grace the agent stops.
            self.unreachable_since = self.unreachable_since or time.monotonic()
            if time.monotonic() - self.unreachable_since > self.unreachable_grace:
                return "unreachable"
            return None
        return "killed" if state.killed else None

    def _renew_if_due(self) -> str | None:
        if time.monotonic() < self.next_heartbeat:
            return None
        self.next_heartbeat = time.monotonic() + self.heartbeat_every
        since = time.monotonic()
        try:
            renewed = self.services.leases_fast.renew(self.lease, self.lease_ttl)
        except redis.RedisError:
            return None  # the database heartbeat may still prove ownership; the tether decides
        if not renewed:
            return "lease_lost"
        self.lease_renewed_at = since
        self.ownership.proven(since)
        return None

    def lease_renewed_within(self, seconds: float) -> bool:
        """Whether the lease was last renewed to its full TTL less than `seconds` ago."""
        return time.monotonic() - self.lease_renewed_at < seconds


