"""The dispatch: five named steps, in a fixed order, each there because skipping it has a price.

1. archive_stale  - a unit's runs that never started and are superseded or stale become `archived`
2. create         - one Run row per idempotency key; a repeat gets the existing run (`duplicate`)
3. plan           - what would fire now and every gate's verdict (kill, pause, breaker, bounded, caps,
                    lock); `dry_run` stops here, writing nothing
4. dispatch_one   - a fenced slot lease, the spend reservation and the day's run count, status
                    `queued`, one execute message
5. watch          - the executor (fleet/executor.py) owns the run from there

Steps 1 to 4 share one database transaction and one Redis round trip (fleet/admission.py: the kill
flags, the breaker and the lease, judged atomically), then the message is sent: a run costs one
durable commit to accept. A duplicate is answered from the unique key alone, before any Redis work;
a refusal rolls the row back and keeps only an event, so the same key may be dispatched later.
Clients, the clock and the message sender are injected, so a test can run every step against a
fixed clock and count what each did. Expected outcomes (duplicate, busy, over cap) are results.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any, Literal

import redis
from sqlalchemy import bindparam, delete, update
from sqlalchemy import select as core_select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col

from fleet import alerts, db, keys, killswitch, ledger, logs, pause, store
from fleet.admission import Admission
from fleet.config import AgentSpec, read_text
from fleet.errors import BadInputError, NotFoundError, UnavailableError, first_line
from fleet.ledger import Caps
from fleet.locks import Lease
from fleet.models import NOT_STARTED, Run, RunStatus, table_of
from fleet.services import Services, as_fleet_error

WORK_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")  # printable ASCII, no spaces: it is part of a unique key
MAX_PAYLOAD_BYTES = 32 * 1024  # it travels in the agent's environment, which the kernel limits

Sender = Callable[[str, int], None]  # (run_id, fence): enqueue exactly one fleet.execute

# Built once (models.table_of): every dispatch runs these. (A bind parameter may not share a column's
# name in an UPDATE: theirs start with p_.)
_RUNS = table_of(Run)
_CREATE = {name: insert(_RUNS).values(status=RunStatus.CREATED.value).on_conflict_do_nothing()
           .returning(_RUNS.c.id) for name, insert in (("postgresql", pg_insert), ("sqlite", sqlite_insert))}
_QUEUE = update(_RUNS).where(_RUNS.c.id == bindparam("p_id"), _RUNS.c.status == RunStatus.CREATED).values(
    status=RunStatus.QUEUED, fence=bindparam("p_fence"), slot=bindparam("p_slot"), budget_day=bindparam("p_day"),
    reserved_micros=bindparam("p_reserved"), queued_at=bindparam("p_queued_at"), updated_at=bindparam("p_now"),
    sends=1)
# Whether the kill or the pause mirror holds the fleet or the agent, and the database's clock: three
# answers every dispatch needs, in one statement.
_MIRRORS_AND_CLOCK = {dialect: core_select(killswitch.ENGAGED.exists(), pause.ENGAGED.exists(), ledger.clock(dialect))
                      for dialect in ("postgresql", "sqlite")}


# What unsend did: the run undone, `kept` (the database could not be told), or `taken` (a worker holds it).
Undone = Literal["undone", "kept", "taken"]


@dataclass(frozen=True)
class DispatchRequest:
    """What a caller asked for, validated by `validate`."""

    agent: str
    work_key: str | None = None
    payload: Any = None
    dry_run: bool = False
    actor: str = "unknown"
    prev_run_id: str | None = None  # a replay names the dead run it re-runs
    replay_of: int | None = None  # ... and its dead letter


@dataclass(frozen=True)
class Gate:
    """One gate's verdict."""

    ok: bool
    detail: str


@dataclass
class DispatchResult:
    """The dispatch's answer, returned as JSON by `fleet.dispatch`."""

    run_id: str | None
    status: str  # queued, duplicate, refused, misdispatch, dry_run
    would_fire: list[str] = field(default_factory=list)
    gates: dict[str, Gate] = field(default_factory=dict)
    reason: str | None = None
    archived: list[str] = field(default_factory=list)
    fence: int | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types only (Celery results, `--json` output)."""
        return asdict(self)


# ---------------------------------------------------------------- validation


def validate(services: Services, request: DispatchRequest) -> tuple[AgentSpec, str, str | None]:
    """The agent (69 when unknown), the work key and the payload as JSON text (65 when malformed)."""
    # `celery call --kwargs` is JSON anyone can type: "false" is a non-empty string, which Python takes for true.
    if not isinstance(request.agent, str):
        raise BadInputError(f"agent must be an agent's name (a string), not {type(request.agent).__name__}")
    if not isinstance(request.dry_run, bool):
        raise BadInputError(f"dry_run must be true or false (JSON), not {type(request.dry_run).__name__}")
    try:
        spec = services.config.agent(request.agent)
    except NotFoundError:
        if services.config_change_pending():
            raise UnavailableError(f"fleet.toml changed a moment ago and is not taken yet (a save is given a second "
                                   f"to settle): agent {request.agent!r} may be in it; try again") from None
        raise
    work_key = request.work_key if request.work_key is not None else uuid.uuid4().hex
    if not isinstance(work_key, str) or not WORK_KEY.match(work_key):
        raise BadInputError("work key must be 1-200 printable ASCII characters without spaces "
                            "(no unicode, control characters or NUL)")
    return spec, work_key, _payload_text(request.payload)


def message_work_key(work_key: str | None, message_id: str | None) -> str | None:
    """The work key of a dispatch a message asks for: its own, or, keyless, one named by the message's id, so the
    same message delivered again (an at-least-once broker redelivers it after a lost worker or a reconnect) asks
    for the same run instead of making a second one. None (a fresh key) for an id no work key could hold."""
    if work_key is not None or message_id is None:
        return work_key
    key = f"message:{message_id}"
    return key if WORK_KEY.match(key) else None


def _payload_text(payload: Any) -> str | None:
    if payload is None:
        return None
    try:
        text = json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise BadInputError(f"payload must be JSON-serialisable: {exc}") from None
    if "\x00" in text:
        raise BadInputError("payload must not contain NUL characters")
    try:
        size = len(text.encode())
    except UnicodeEncodeError:  # lone surrogates: argv bytes that were not UTF-8, or a JSON "\udcxx" escape
        raise BadInputError("payload is not valid UTF-8 text (check the terminal's or the file's encoding)") from None
    if size > MAX_PAYLOAD_BYTES:
        raise BadInputError(f"payload is {size} bytes; the limit is {MAX_PAYLOAD_BYTES}")
    return text


def parse_payload(text: str | None) -> Any:
    """A payload given as JSON text on the command line (65 when it is not JSON)."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInputError(f"payload is not valid JSON: {exc.msg} at position {exc.pos}") from None


def payload_argument(value: str | None, stdin: IO[str]) -> Any:
    """`--payload`: JSON text, `@FILE` (read from the file) or `-` (read from stdin); 65 when unusable.

    The file and stdin forms keep the payload out of the command line, which every user of the
    machine can read (`ps`, /proc/PID/cmdline). JSON never starts with `@` and `-` alone is not JSON,
    so the forms cannot be mistaken for each other.
    """
    if value == "-":
        return parse_payload(stdin.read())
    if value is not None and value.startswith("@"):
        try:
            return parse_payload(read_text(Path(value[1:])))
        except ValueError as exc:
            raise BadInputError(f"payload: {exc}") from None
    return parse_payload(value)


# ---------------------------------------------------------------- the orchestrator


def dispatch(services: Services, request: DispatchRequest, send: Sender) -> DispatchResult:
    """Run the five steps for one request. Raises UnavailableError (75) when Redis or the DB is down."""
    spec, work_key, payload = validate(services, request)
    idem_key = f"{spec.name}:{work_key}"
    try:
        if request.dry_run:
            services.redis.ping()  # a plan from a fleet whose Redis is away would be a guess
            return dry_run(services, spec, work_key, idem_key)
        return _accept(services, spec, work_key, idem_key, payload, request, send)
    except (redis.RedisError, SQLAlchemyError) as exc:
        raise as_fleet_error(exc) from None


def _accept(services: Services, spec: AgentSpec, work_key: str, idem_key: str, payload: str | None,
            request: DispatchRequest, send: Sender) -> DispatchResult:
    now = services.now()
    with db.session(services.engine) as session:
        store.events_at_commit(session)  # it may wait on the fleet's spend row: its events go in last
        archived = archive_stale(session, services, spec, work_key, idem_key)
        run = create(session, spec, work_key, idem_key, payload, request, now)
        if isinstance(run, DispatchResult):  # a duplicate: the key's own run, whatever the gates say now
            session.commit() if archived else session.rollback()
            run.archived = archived
            return run
        result = dispatch_one(session, services, spec, run, now)
        if result.status != "queued":
            session.rollback()  # the row, its reservation and its count go; an event stays
            result.archived = archived
            return _refused(services, spec, run, result)
        try:
            session.commit()
        except SQLAlchemyError as exc:
            # Most likely nothing was written: the slot goes back now, not a queued lease's TTL from now. If
            # the COMMIT did land (its answer lost), the run stands queued without its message; the reaper
            # sends it, and its claim takes the slot again while it is free (a lease missing is re-asserted).
            # So the caller is not told "nothing was written": a retry under a fresh key would be a second run.
            _give_back_slot(services, run)
            raise UnavailableError(f"database unreachable as the run was committed ({first_line(exc)}): it may "
                                   f"have been accepted, and is then sent by the reaper; retry with work key "
                                   f"{work_key}, which answers that run if it was") from None
    result.archived = archived
    try:
        send(run.id, run.fence or 0)
    except Exception as exc:  # noqa: BLE001 - whatever the broker raised, nothing may stay half-done
        undone = unsend(services, run)
        if undone != "undone":
            result.reason = still_queued(services, undone, exc)
            return result
        raise UnavailableError(f"could not enqueue the run ({exc.__class__.__name__}); nothing was kept: "
                               "its slot and reservation were returned, and the same key may be dispatched "
                               "again") from None
    return result


def still_queued(services: Services, undone: Undone, exc: BaseException) -> str:
    """Why a run whose send raised still stands, queued: its message got through after all and a worker has it
    (`taken`), or its undoing failed too (`kept`): it was durable before the send, and the reaper sends it (a
    caller told "nothing was kept" would think it never runs)."""
    if undone == "taken":
        return (f"its send reported an error ({exc.__class__.__name__}), but the message got through: "
                "a worker has the run")
    return (f"its message could not be sent ({exc.__class__.__name__}) nor the run undone: it stays queued, "
            f"and the reaper sends it again within {2 * services.config.fleet.resend_after_s:g} s")


# ---------------------------------------------------------------- step 1: archive-stale


def archive_stale(session: Session, services: Services, spec: AgentSpec, work_key: str,
                  idem_key: str) -> list[str]:
    """Archive the unit's never-started first attempts that another key superseded or that are older than
    stale_after (a retry waiting its turn is never archived: it already ran once)."""
    pending = store.pending_runs(session=session, agent=spec.name, work_key=work_key)
    if not pending:
        return []
    # By the database's clock, one for every host: a dispatcher whose own clock runs ahead must not take a run
    # queued a moment ago for a stale one, and drop it unstarted.
    cutoff = ledger.database_now(session) - timedelta(seconds=services.config.fleet.stale_after_s)
    stale = [r for r in pending
             if r.attempt == 0 and (r.idem_key != idem_key or ledger.as_database_time(r.created_at) < cutoff)]
    return [run.id for run in stale
            if archive(session, services, run, reason="superseded" if run.idem_key != idem_key else "stale")]


def archive(session: Session, services: Services, run: Run, *, reason: str) -> bool:
    """End a never-started run: its late execute message becomes a no-op, its slot and money come back."""
    now = services.now()
    changed = session.execute(update(Run).where(col(Run.id) == run.id, col(Run.status).in_(NOT_STARTED))
                           .values(status=RunStatus.ARCHIVED, finished_at=now, updated_at=now, error=reason))
    if db.rowcount(changed) != 1:
        return False
    run.status = RunStatus.ARCHIVED
    ledger.settle(session, run=run, now=now)
    store.add_event(session=session, at=now, kind="run.archived", run_id=run.id, agent=run.agent, reason=reason)
    if run.fence is not None and run.slot is not None:
        services.leases.release(Lease(run.agent, run.slot, run.id, run.fence))
    services.breakers.forfeit(run.agent, run.id)  # a trial that never ran frees the half-open breaker
    return True


# ---------------------------------------------------------------- step 2: create


def create(session: Session, spec: AgentSpec, work_key: str, idem_key: str, payload: str | None,
           request: DispatchRequest, now: datetime) -> Run | DispatchResult:
    """Insert the run unless its key exists: the new row, or the existing run's `duplicate` answer.
    Never a second row for a key (a concurrent insert of the same key waits on the unique index)."""
    run = Run(id=uuid.uuid4().hex, idem_key=idem_key, agent=spec.name, work_key=work_key, status=RunStatus.CREATED,
              attempt=0, max_attempts=2, payload=payload, reserved_micros=0, cost_micros=0,
              dispatched_by=request.actor[:255], prev_run_id=request.prev_run_id, replay_of=request.replay_of,
              created_at=now, updated_at=now)
    row = run.model_dump(include={"id", "idem_key", "agent", "work_key", "attempt", "max_attempts", "payload",
                                  "reserved_micros", "cost_micros", "dispatched_by", "prev_run_id", "replay_of",
                                  "created_at", "updated_at"})
    inserted = db.execute(session, _CREATE[session.get_bind().dialect.name], row).first()
    if inserted is not None:
        store.add_event(session=session, at=now, kind="run.created", run_id=run.id, agent=spec.name,
                        actor=request.actor[:255], work_key=work_key, replay_of=request.replay_of)
        return run
    existing = store.get_run_by_key(session=session, idem_key=idem_key)
    if existing is None:  # created and refused (rolled back) in between: the caller may try again
        raise UnavailableError(f"run for {idem_key!r} vanished while deduplicating; retry")
    return duplicate_of(existing)


def duplicate_of(run: Run) -> DispatchResult:
    """The answer to a key that already has its run: that run, whatever the gates say now."""
    return DispatchResult(run.id, "duplicate", reason=f"already {run.status}", fence=run.fence)


# ---------------------------------------------------------------- step 3: dry-run (the plan)


def plan(services: Services, spec: AgentSpec, run_id: str | None, work_key: str, idem_key: str) -> DispatchResult:
    """What would fire now for this unit and each gate's verdict. Reads only."""
    with db.session(services.engine) as session:
        pending = [r.id for r in store.pending_runs(session=session, agent=spec.name, work_key=work_key)
                   if r.status == RunStatus.CREATED]
        gates = _gates(services, session, spec)
    would_fire = pending if run_id is not None else [*pending, f"new:{idem_key}"]
    result = DispatchResult(run_id, "ok", would_fire=would_fire, gates=gates)
    expected = [run_id] if run_id is not None else [f"new:{idem_key}"]
    if would_fire != expected:
        result.status, result.reason = "misdispatch", f"expected to fire {expected}, would fire {would_fire}"
    else:
        closed = [name for name, gate in gates.items() if not gate.ok]
        if closed:
            result.status, result.reason = "refused", _REFUSAL[closed[0]]
    return result


_REFUSAL = {"kill": "killed", "pause": "paused", "breaker": "breaker_open", "bounded": "bounded",
            "caps": "over_cap", "lock": "busy"}


def _gates(services: Services, session: Session, spec: AgentSpec) -> dict[str, Gate]:
    # Either store saying "killed" wins. Redis unreachable raises: the dispatch refuses with 75.
    kill = killswitch.check(session, services.redis, spec.name)
    paused = pause.check(session, services.redis, spec.name)
    fleet = services.config.fleet
    verdict = services.breakers.peek(spec.name, cooldown_s=spec.breaker_settings(fleet)[1])
    caps = caps_of(services, spec)
    estimate = ledger.to_micros(spec.est_cost_usd) or 0
    day = ledger.budget_day(session, fleet.timezone)
    room = ledger.headroom(session, day=day, agent=spec.name, caps=caps)
    # As the admission counts them: Redis's holders and the live runs by the database (Redis may have lost their
    # leases, or they hold slots above a concurrency lowered under them).
    held = {lease.slot for lease in services.leases.holders(spec.name, spec.concurrency)}
    free = max(0, spec.concurrency - len(held | store.live_slots(session=session, agent=spec.name)))
    counted = ledger.runs_counted(session, day=day, agent=spec.name)
    bound = spec.max_runs_per_day
    return {
        "kill": Gate(not kill.killed, kill.describe()),
        "pause": Gate(not paused.paused, paused.describe()),
        "breaker": Gate(verdict.allowed, verdict.state),
        "bounded": Gate(bound is None or counted < bound,
                        f"{counted} run(s) today, no bound" if bound is None else f"{counted} of {bound} run(s) today"),
        "caps": Gate(room is None or estimate <= room,
                     "no cap" if room is None else _needs(estimate, room)),
        "lock": Gate(free > 0, f"{free} of {spec.concurrency} slot(s) free"),
    }


def caps_of(services: Services, spec: AgentSpec) -> Caps:
    """The agent's and the fleet's daily caps in micro-dollars."""
    return Caps(agent=ledger.to_micros(spec.daily_cap_usd), fleet=ledger.to_micros(services.config.fleet.daily_cap_usd))


def dry_run(services: Services, spec: AgentSpec, work_key: str, idem_key: str) -> DispatchResult:
    """The plan alone: no row, no Redis key, no message."""
    with db.session(services.engine) as session:
        existing = store.get_run_by_key(session=session, idem_key=idem_key)
    if existing is not None:
        return DispatchResult(existing.id, "dry_run", reason=f"duplicate: already {existing.status}")
    result = plan(services, spec, None, work_key, idem_key)
    result.reason = result.reason if result.status != "ok" else "would fire"
    result.status = "dry_run"
    return result


# ---------------------------------------------------------------- step 4: dispatch-one


def _needs(estimate: int, room: int) -> str:
    """The caps gate's words: what a run reserves against what is left today (micro-dollars both)."""
    return f"needs {ledger.money(ledger.to_usd(estimate))}, {ledger.money(ledger.to_usd(max(room, 0)))} left today"


def dispatch_one(session: Session, services: Services, spec: AgentSpec, run: Run, now: datetime) -> DispatchResult:
    """In the dispatch's transaction: the gates and the lease in one Redis round trip, the kill mirror, the
    spend reservation, status `queued`. The caller commits, then sends the one execute message."""
    fleet = services.config.fleet
    # Queued runs wait in the broker, so the lease must outlive the wait: the reaper renews the
    # leases of runs still waiting, and the executor shortens it to the lease TTL once the run starts.
    taken = store.live_slots(session=session, agent=spec.name)
    admitted = services.admissions.admit(spec.name, spec.concurrency, run.id,
                                         cooldown_s=spec.breaker_settings(fleet)[1], ttl_s=fleet.queued_lease_ttl_s,
                                         taken=taken)
    result = DispatchResult(run.id, "refused", would_fire=[run.id])
    refused = admission_refusal(result, admitted, spec)
    if refused is not None or admitted.lease is None:
        return refused or result
    try:
        return _queue_admitted(session, services, spec, run, now, result, admitted, admitted.lease)
    except BaseException:
        with contextlib.suppress(redis.RedisError):  # anything raised before the commit: the slot goes back now
            give_back(services, admitted.lease, result)
        raise


def _queue_admitted(session: Session, services: Services, spec: AgentSpec, run: Run, now: datetime,
                    result: DispatchResult, admitted: Admission, lease: Lease) -> DispatchResult:
    """dispatch_one once Redis admitted the run: the mirrors, the reservation, the count, `queued`."""
    fleet = services.config.fleet
    # The mirrors (a flag Redis lost still stops intake) and the database's clock, in one round trip.
    killed, paused, clock = tuple(db.execute(session, _MIRRORS_AND_CLOCK[session.get_bind().dialect.name],
                                             {"scopes": [keys.GLOBAL, spec.name]}).one())
    # The detail read decides: on PostgreSQL it is a later snapshot, and a release committed in between
    # lets the dispatch go on (a refusal must give the reason it was refused for, never "not killed").
    mirror = killswitch.check_mirror(session, spec.name) if killed else killswitch.ALIVE
    if mirror.killed:
        killswitch.restore(session, services.redis)
        return give_back(services, lease, refuse(result, "kill", Gate(False, mirror.describe())))
    held = pause.check(session, services.redis, spec.name) if paused else None
    if held is not None and held.paused:  # likewise a pause; check() puts the lost flag back
        return give_back(services, lease, refuse(result, "pause", Gate(False, held.describe())))
    estimate = ledger.to_micros(spec.est_cost_usd) or 0
    # queued_at is the reaper's to compare (resend_after_s): by the database's clock, one for every host.
    database_now = ledger.as_database_time(clock)
    day = ledger.budget_day(session, fleet.timezone, at=database_now)
    queued = db.execute(session, _QUEUE, {"p_id": run.id, "p_fence": lease.fence, "p_slot": lease.slot, "p_day": day,
                                          "p_reserved": estimate, "p_queued_at": database_now, "p_now": now})
    if db.rowcount(queued) != 1:  # the row is this transaction's own: nobody else can have ended it
        give_back(services, lease, result)
        raise UnavailableError(f"run {run.id} changed under its own dispatch; nothing was kept, retry")
    caps = caps_of(services, spec)
    reserved = ledger.reserve_counted(session, day=day, agent=spec.name, amount=estimate, caps=caps, now=now,
                                      count=True, limit=spec.max_runs_per_day)
    if reserved == "caps":
        if first_refusal_today(services, spec.name, day):
            alerts.alert("cap_refusal", f"dispatch of {spec.name} refused: its daily cap or the fleet's is reached",
                         agent=spec.name, level="warning")
        room = ledger.headroom(session, day=day, agent=spec.name, caps=caps) or 0
        gate = Gate(False, _needs(estimate, room))
        return give_back(services, lease, refuse(result, "caps", gate))  # the caller rolls the queueing back
    if reserved == "bounded":
        full = f"{spec.max_runs_per_day} of {spec.max_runs_per_day} run(s) today"
        return give_back(services, lease, refuse(result, "bounded", Gate(False, full)))
    store.add_event(session=session, at=now, kind="run.queued", run_id=run.id, agent=spec.name, fence=lease.fence,
                    slot=lease.slot, reserved_micros=estimate)
    run.status, run.fence, run.slot, run.budget_day, run.reserved_micros = (
        RunStatus.QUEUED, lease.fence, lease.slot, day, estimate)
    result.status, result.fence = "queued", lease.fence
    # What each gate said, as the plan would show it (no extra reads: the verdicts are in hand).
    bound = spec.max_runs_per_day
    result.gates = {"kill": Gate(True, "not killed"), "pause": Gate(True, "not paused"),
                    "breaker": Gate(True, admitted.breaker),
                    "bounded": Gate(True, "no bound" if bound is None else f"within {bound} run(s) today"),
                    "caps": Gate(True, f"reserved {ledger.money(ledger.to_usd(estimate))}"),
                    "lock": Gate(True, f"slot {lease.slot} of {spec.concurrency}, fence {lease.fence}")}
    return result


def admission_refusal(result: DispatchResult, admitted: Admission, spec: AgentSpec) -> DispatchResult | None:
    """The refusal that an admission's verdict means, or None when it was admitted (its lease taken)."""
    if admitted.verdict == "killed":
        state = killswitch.parse_flag(admitted.kill_scope or "*", admitted.kill_value)
        return refuse(result, "kill", Gate(False, state.describe()))
    if admitted.verdict == "paused":
        held = pause.parse_flag(admitted.kill_scope or "*", admitted.kill_value)
        return refuse(result, "pause", Gate(False, held.describe()))
    if admitted.verdict == "breaker_open":
        return refuse(result, "breaker", Gate(False, admitted.breaker))
    if admitted.lease is None:
        return refuse(result, "lock", Gate(False, f"0 of {spec.concurrency} slot(s) free"))
    return None


def refuse(result: DispatchResult, gate: str, verdict: Gate) -> DispatchResult:
    """Mark `result` refused by `gate` (its reason is that gate's, as the plan names it)."""
    result.gates[gate] = verdict
    result.reason = _REFUSAL[gate]
    return result


def first_refusal_today(services: Services, agent: str, day: str) -> bool:
    """Whether this is the fleet's first cap refusal of the agent on this budget day: the alert is raised
    once per cap reached, not by every refused tick of every worker process. Without Redis, alert anyway."""
    try:
        return bool(services.redis.set(keys.alerted("cap_refusal", agent, day), "1", nx=True, ex=2 * 86400))
    except redis.RedisError:
        return True


def give_back(services: Services, lease: Lease, result: DispatchResult) -> DispatchResult:
    """A refusal after the lease was taken: the slot and the breaker's trial go back at once."""
    services.leases.release(lease)
    services.breakers.forfeit(lease.agent, lease.run_id)
    return result


def unsend(services: Services, run: Run) -> Undone:
    """The message could not be sent: return the reservation and the slot and delete the row, so the
    retry that 75 invites dispatches the key afresh (a message that did get through finds no run).

    `undone` once done; `kept` when the database could not be told (the row stands, queued, and the reaper
    sends it again); `taken` when the run is no longer this queued attempt: the message got through after
    all and a worker claimed it, and nothing of it may be given back."""
    now = services.now()
    try:
        with db.session(services.engine) as session:
            # Locked before it is read: a claim committing in between must not have its reservation handed back.
            fresh = session.get(Run, run.id, with_for_update=True, populate_existing=True)
            if fresh is not None and (fresh.status != RunStatus.QUEUED or fresh.fence != run.fence):
                return "taken"
            if fresh is not None:
                ledger.settle(session, run=fresh, now=now, current=fresh)
                if fresh.budget_day is not None:
                    ledger.uncount_run(session, day=fresh.budget_day, agent=fresh.agent)
                session.execute(delete(Run).where(col(Run.id) == run.id, col(Run.status) == RunStatus.QUEUED,
                                                  col(Run.fence) == run.fence))
                store.add_event(session=session, at=now, kind="dispatch.enqueue_failed", run_id=run.id,
                                agent=run.agent)
            session.commit()
    except SQLAlchemyError as exc:
        logs.get(__name__).warning("dispatch.unsend_failed", run_id=run.id, agent=run.agent,
                                   error=exc.__class__.__name__)
        return "kept"
    _give_back_slot(services, run)
    return "undone"


def _give_back_slot(services: Services, run: Run) -> None:
    """The run's slot lease and breaker trial, back at once (a slot left behind lapses with its queued lease)."""
    with contextlib.suppress(redis.RedisError):
        if run.slot is not None and run.fence is not None:
            services.leases.release(Lease(run.agent, run.slot, run.id, run.fence))
        services.breakers.forfeit(run.agent, run.id)


def _refused(services: Services, spec: AgentSpec, run: Run, result: DispatchResult) -> DispatchResult:
    """The refusal's event, in a transaction of its own (the row it was about never happened), and every
    gate's verdict as the plan shows it, for the person reading it (a refusal is not the hot path)."""
    with db.session(services.engine) as session:
        store.add_event(session=session, at=services.now(), kind=f"dispatch.{result.status}", run_id=run.id,
                        agent=run.agent, reason=result.reason)
        session.commit()
        with contextlib.suppress(redis.RedisError, UnavailableError):
            result.gates = {**_gates(services, session, spec), **result.gates}
    return result
