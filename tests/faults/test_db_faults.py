"""The database misbehaving: an outcome write that fails, a restart under racing admissions, an ambiguous
commit, a database that stops answering."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import event

from fleet import db
from fleet.dispatch import DispatchRequest, DispatchResult, Sender, dispatch
from fleet.errors import UnavailableError
from fleet.models import RunStatus
from fleet.services import Services
from tests.faults.conftest import FaultFleet, fault_fleet
from tests.faults.effects import EffectsLog
from tests.faults.proxy import PASS, RESET
from tests.faults.servers import PrivateCluster
from tests.harness import wait_for
from tests.test_dispatch import run_of, send, wait_status

pytestmark = [pytest.mark.slow, pytest.mark.faults]


@pytest.fixture
def pg_faults(tmp_path: Path, pg_cluster: PrivateCluster | None) -> Iterator[FaultFleet]:
    """A fault fleet on a private PostgreSQL behind the proxy."""
    with fault_fleet("postgresql", tmp_path, pg_cluster) as faults:
        yield faults


def test_a_failed_outcome_write_does_not_run_a_finished_agent_again(pg_faults: FaultFleet) -> None:
    """The database goes away as the agent finishes: the outcome is written once it is back, the reaper
    keeps its hands off meanwhile (the lease is still renewed), and the agent never runs a second time."""
    faults = pg_faults
    result = send(faults.fleet, "work", f"outcome-{uuid.uuid4().hex}")
    faults.accepted.add(result.run_id)
    wait_for(lambda: len([e for e in faults.effects.of("SPEND") if e.run == result.run_id]) >= 3, 60,
             "the agent's third step")
    assert faults.db_proxy is not None
    faults.db_proxy.set(RESET)
    try:
        wait_for(lambda: [e for e in faults.effects.of("END") if e.run == result.run_id], 30, "the agent to end")
        # Longer than the lease: a reaper that took this for a dead worker would start the agent again.
        faults.reap_for(8, until=lambda: len(faults.effects.starts(result.run_id)) > 1)
    finally:
        faults.db_proxy.set(PASS)
    run = faults.reap_until(lambda: run_of(faults.fleet, result.run_id).status in {"succeeded", "dead"}
                            and run_of(faults.fleet, result.run_id), 60, "the outcome to be written")
    assert len(faults.effects.starts(result.run_id)) == 1, "the finished agent was run again"
    assert run.status == RunStatus.SUCCEEDED and run.attempt == 1
    assert faults.violations() == []


def test_postgresql_restarted_during_racing_admissions(pg_faults: FaultFleet, tmp_path: Path) -> None:
    """100 dispatches of one key from 8 processes while PostgreSQL crashes and comes back: each answers queued,
    duplicate or 75, and there is one run, reserved once, run once."""
    faults = pg_faults
    assert faults.cluster is not None
    work_key = f"race-{uuid.uuid4().hex}"
    start_at = time.time() + 4
    out = tmp_path / "storm"
    procs = [subprocess.Popen([sys.executable, "-m", "tests.storm", str(faults.fleet.config_path),
                               faults.fleet.redis_url, faults.fleet.database_url, "quick", work_key, "13",
                               str(out / f"{i}.json"), str(start_at), "--tolerate-outages"], env=faults.fleet.env)
             for i in range(8)]
    wait_for(lambda: time.time() > start_at + 0.05, 30, "the storm to begin")
    faults.cluster.restart_immediately()
    for proc in procs:
        assert proc.wait(180) == 0
    results = [r for f in out.iterdir() for r in json.loads(f.read_text())]
    assert len(results) == 104 and {r["status"] for r in results} <= {"queued", "duplicate", "unavailable"}
    # The caller's retry after its 75s, once the database is back (a slow machine can spend the whole
    # storm inside the outage): queued if nothing was accepted yet, else a duplicate of the one run.
    retry = wait_for(lambda: _dispatch_or_none(faults, work_key), 60, "the database to take dispatches again")
    assert retry.status in {"queued", "duplicate"} and retry.run_id
    run_ids = {r["run_id"] for r in results if r["run_id"]} | {retry.run_id}
    assert len(run_ids) == 1, run_ids
    faults.accepted |= run_ids
    (run_id,) = run_ids
    faults.reap_until(lambda: run_of(faults.fleet, run_id).status in {"succeeded", "dead"}, 90, "the run to finish")
    assert run_of(faults.fleet, run_id).status == RunStatus.SUCCEEDED
    assert len(faults.effects.starts(run_id)) == 1
    assert faults.violations() == []


def _dispatch_or_none(faults: FaultFleet, work_key: str) -> DispatchResult | None:
    try:
        request = DispatchRequest("quick", work_key, actor="test")
        return dispatch(faults.fleet.services, request, faults.fleet.send_execute)
    except UnavailableError:
        return None


def test_an_ambiguous_commit_of_the_reservation_is_counted_once(pg_faults: FaultFleet) -> None:
    """The reservation's COMMIT reaches PostgreSQL but its answer never comes back: the caller hears 75, its retry
    is a duplicate, the reaper sends the queued run, and the money is reserved and spent once."""
    faults = pg_faults
    assert faults.db_proxy is not None
    request = DispatchRequest("quick", f"ambiguous-{uuid.uuid4().hex}", actor="test")
    services = dataclasses.replace(faults.fleet.services, engine=db.make_engine(faults.fleet.database_url))
    try:
        faults.db_proxy.cut_on(b"UPDATE spend_days SET reserved_micros", b"COMMIT")
        with pytest.raises(UnavailableError):
            dispatch(services, request, faults.fleet.send_execute)
        assert faults.db_proxy.cuts == 1
        again = dispatch(services, request, faults.fleet.send_execute)
    finally:
        services.engine.dispose()
    assert again.status == "duplicate" and again.run_id
    faults.accepted.add(again.run_id)
    faults.reap_until(lambda: run_of(faults.fleet, again.run_id or "").status in {"succeeded", "dead"}, 90,
                      "the reaper to send the queued run, and the run to finish")
    assert run_of(faults.fleet, again.run_id).status == RunStatus.SUCCEEDED
    assert len(faults.effects.starts(again.run_id)) == 1
    assert faults.violations() == []


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs of the test's own (root here), unmounted afterwards."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_sqlite_on_a_full_disk_refuses_before_any_agent_starts(tmp_path: Path, small_disk: Path) -> None:
    """The disk under SQLite fills up: a dispatch is refused with 75 and nothing starts; the file stays intact;
    once space is freed, dispatches work again."""
    from tests.faults.conftest import FAULT_AGENTS
    from tests.harness import Fleet, PrivateRedis

    server = PrivateRedis(tmp_path)
    server.start()
    home = tmp_path / "fleet"
    home.mkdir()
    database = small_disk / "fleet.db"
    fleet = Fleet(home, server.url, f"sqlite:///{database}", agents=FAULT_AGENTS)
    try:
        fleet.start(workers=1, concurrency=2)
        first = dispatch(fleet.services, DispatchRequest("quick", uuid.uuid4().hex, actor="test"), fleet.send_execute)
        assert first.status == "queued"
        filler = small_disk / "filler"
        # Fill the disk to the last byte. Unbuffered: a buffered file keeps what the last write could not place
        # and raises ENOSPC again as it closes, whenever the space left is not a multiple of the block written.
        with open(filler, "wb", buffering=0) as handle, contextlib.suppress(OSError):
            while True:
                handle.write(b"\0" * 65536)
        started_before = len(EffectsLog.read(home / "effects.log").of("START"))
        refused = 0
        for _ in range(5):
            try:
                dispatch(fleet.services, DispatchRequest("quick", uuid.uuid4().hex, actor="test"), fleet.send_execute)
            except UnavailableError:
                refused += 1
        assert refused == 5
        assert len(EffectsLog.read(home / "effects.log").of("START")) <= started_before + 1  # only the first run
        with fleet.services.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
        filler.unlink()
        after = dispatch(fleet.services, DispatchRequest("quick", uuid.uuid4().hex, actor="test"), fleet.send_execute)
        assert after.status == "queued"
        wait_for(lambda: run_of(fleet, after.run_id or "").status == RunStatus.SUCCEEDED, 60, "the run after")
    finally:
        fleet.stop()
        server.stop()


@contextlib.contextmanager
def _a_send_refused_as_the_database_goes(faults: FaultFleet) -> Iterator[tuple[Services, Sender]]:
    """A dispatcher whose connections go through the proxy, and a send that cuts the database off (the proxy
    resets every connection) and then fails as a broker that is down would; the database is back afterwards."""
    proxy = faults.db_proxy
    assert proxy is not None

    def refuse_with_the_database_gone(_run_id: str, _fence: int) -> None:
        proxy.set(RESET)
        raise ConnectionError("broker down")

    proxied = db.make_engine(faults.fleet.database_url)
    try:
        yield dataclasses.replace(faults.fleet.services, engine=proxied), refuse_with_the_database_gone
    finally:
        proxy.set(PASS)
        proxied.dispose()


def _sent_by_the_reaper_and_run_once(faults: FaultFleet, run_id: str) -> None:
    faults.accepted.add(run_id)
    run = faults.reap_until(lambda: run_of(faults.fleet, run_id).status in {"succeeded", "dead"}
                            and run_of(faults.fleet, run_id), 60, "the reaper to send it")
    assert run.status == RunStatus.SUCCEEDED and len(faults.effects.starts(run_id)) == 1
    assert faults.violations() == []


def test_an_enqueue_failure_the_database_cannot_undo_is_never_answered_as_undone(pg_faults: FaultFleet) -> None:
    """The broker refuses the message, and the database is cut off before the run can be undone. The row was
    durable before the send: the answer says the run stays queued (not 75, "nothing was kept", which invites a
    caller to think the work will not happen), the reaper sends it once both are back, and it runs once."""
    with _a_send_refused_as_the_database_goes(pg_faults) as (services, send_refused):
        try:
            answer = dispatch(services, DispatchRequest("quick", f"undo-{uuid.uuid4().hex}", actor="test"),
                              send_refused)
        except UnavailableError as exc:
            answer = DispatchResult(run_id=None, status="unavailable", reason=str(exc))
    assert answer.status == "queued" and "reaper" in (answer.reason or ""), answer
    assert answer.run_id is not None
    _sent_by_the_reaper_and_run_once(pg_faults, answer.run_id)


def test_a_batch_whose_failed_message_cannot_be_undone_answers_it_queued(pg_faults: FaultFleet) -> None:
    """The same in a beat batch: it used to answer such a run `unavailable ... undone` while its row stood."""
    from fleet import bulk

    with _a_send_refused_as_the_database_goes(pg_faults) as (services, send_refused):
        answers = bulk.dispatch_many(services, [(services.config.agent("quick"), f"batch-{uuid.uuid4().hex}")],
                                     send_refused, "test")
    assert [(a.status, "reaper" in (a.reason or "")) for a in answers] == [("queued", True)], answers
    _sent_by_the_reaper_and_run_once(pg_faults, answers[0].run_id or "")


def test_a_dispatch_whose_commit_never_reached_the_database_gives_its_slot_back(pg_faults: FaultFleet) -> None:
    """The connection drops as the dispatch commits, before its COMMIT leaves: nothing was written, and the
    slot lease the admission took goes back at once (it used to stay held for a queued lease's TTL, three
    resend_after_s: fifteen minutes by default, in which a concurrency-1 agent refused every dispatch)."""
    faults = pg_faults
    assert faults.db_proxy is not None
    proxy = faults.db_proxy
    proxied = db.make_engine(faults.fleet.database_url)
    cuts: list[bool] = []

    def cut_before_commit(_conn: object) -> None:
        if not cuts:
            cuts.append(True)
            proxy.set(RESET)

    event.listen(proxied, "commit", cut_before_commit)
    services = dataclasses.replace(faults.fleet.services, engine=proxied)
    request = DispatchRequest("quick", f"uncommitted-{uuid.uuid4().hex}", actor="test")
    try:
        with pytest.raises(UnavailableError):
            dispatch(services, request, faults.fleet.send_execute)
    finally:
        proxy.set(PASS)
        proxied.dispose()
    assert cuts and faults.fleet.services.leases.holders("quick", 100) == []
    again = dispatch(faults.fleet.services, request, faults.fleet.send_execute)
    assert again.status == "queued" and again.run_id
    faults.accepted.add(again.run_id)
    wait_status(faults.fleet, again.run_id, {"succeeded"}, timeout=60)
    assert faults.violations() == []
