"""The fleet on two hosts for real: network namespaces on one bridge (tests/hosts/bed.py).

Each scenario is checked against the agents' own effects logs (one per host, merged by time: the
agents' clocks are the machine's, whatever the worker's) and the database: I1-I5 of tests/faults.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlmodel import select

from fleet import db, ledger
from fleet.models import TERMINAL, Run, RunStatus
from tests.harness import PY, ROOT, wait_for
from tests.hosts.bed import Bed, faketime_lib
from tests.hosts.conftest import MultiFleet, multi_fleet, wait_consuming

pytestmark = [pytest.mark.hosts, pytest.mark.slow]
PY_FLEET = [PY, "-m", "fleet"]
HEAD = sorted(p.name for p in (ROOT / "fleet" / "migrations" / "versions").glob("0*.py"))[-1][:4]


def _started(multi: MultiFleet, run_ids: list[str], timeout: float = 30) -> dict[str, str]:
    """Wait until every run's first attempt wrote START; which host each started on."""
    def all_started() -> dict[str, str] | None:
        where = {run: host for (run, _), host in multi.host_of_effect().items()}
        return where if all(r in where for r in run_ids) else None

    return wait_for(all_started, timeout, f"{len(run_ids)} runs to start")


def _terminal(multi: MultiFleet, run_ids: list[str], timeout: float) -> None:
    wait_for(lambda: all(multi.run(r).status in TERMINAL for r in run_ids),
             timeout, "every run to end")


def test_dispatches_spread_over_both_hosts_and_a_kill_from_infra_stops_both(fleet2: MultiFleet) -> None:
    runs = [fleet2.dispatch("long", f"w{i}").run_id for i in range(2)]
    runs += [fleet2.dispatch("stubborn-long", f"s{i}").run_id for i in range(2)]
    ids = [r for r in runs if r is not None]
    where = _started(fleet2, ids)
    assert set(where.values()) == {"hostA", "hostB"}, f"every run on one host: {where}"
    assert {fleet2.run(r).host for r in ids} == {"hostA", "hostB"}

    before = time.time()
    killed = fleet2.infra.cli("kill", "--reason", "two hosts, one switch")
    after = time.time()
    assert killed.returncode == 0, killed.stdout + killed.stderr
    _terminal(fleet2, ids, 30)
    grace = 1.0  # kill_grace_s in the bed's fleet.toml
    log = fleet2.effects()
    for run in ids:
        last = max(e.t for e in log.effects if e.run == run)
        stubborn = run in runs[2:]
        # SIGTERM within a second of the flag; what ignores it is SIGKILLed kill_grace_s later.
        promised = after + 1.0 + (grace if stubborn else 0.0) + 0.5  # a margin for a loaded machine
        assert last <= promised, (f"run {run} on {where[run]} wrote at {last - before:.2f}s after the kill began "
                                  f"(the command took {after - before:.2f}s)")
        assert fleet2.run(run).status == RunStatus.KILLED
        print(f"figures: kill from infra; run {run[:8]} on {where[run]} (ignores SIGTERM: {stubborn}) last wrote "
              f"{last - after:+.2f}s after the command returned ({after - before:.2f}s to run it)")
    assert fleet2.violations() == []


def _on(multi: MultiFleet, where: dict[str, str], host: str) -> list[str]:
    runs = [run for run, h in where.items() if h == host]
    assert runs, f"no run started on {host}: {where}"
    return runs


def test_a_lost_host_s_runs_are_retried_once_on_the_other_never_overlapping(fleet2: MultiFleet) -> None:
    ids = [r for r in (fleet2.dispatch("work", f"w{i}").run_id for i in range(4)) if r is not None]
    where = _started(fleet2, ids)
    on_b = _on(fleet2, where, "hostB")
    wait_for(lambda: fleet2.effects().spent() >= 4 * 10_000, 20, "every agent to spend once")

    lost = time.time()
    fleet2.b.host.lose()  # every process of hostB SIGKILLed at once: worker, launchers, agents

    fleet2.reap_until(lambda: all(fleet2.run(r).status in TERMINAL for r in ids), 60, "every run to end")
    for run in on_b:
        starts = fleet2.starts(run)
        assert [(host, e.attempt) for host, e in starts] == [("hostB", "1"), ("hostA", "2")], starts
        row = fleet2.run(run)
        assert (row.status, row.attempt, row.host) == (RunStatus.SUCCEEDED, 2, "hostA")
        print(f"figures: hostB lost; run {run[:8]} retried on hostA {starts[1][1].t - lost:.1f}s later")
    for run in set(ids) - set(on_b):
        assert [(host, e.attempt) for host, e in fleet2.starts(run)] == [("hostA", "1")]
    assert fleet2.violations() == []


def test_a_cut_off_host_fences_itself_before_the_other_retries_and_rejoins(fleet2: MultiFleet) -> None:
    ids = [r for r in (fleet2.dispatch("work", f"w{i}").run_id for i in range(2))]
    ids += [r for r in (fleet2.dispatch("stubborn", f"s{i}").run_id for i in range(2))]
    run_ids = [r for r in ids if r is not None]
    where = _started(fleet2, run_ids)
    on_b = _on(fleet2, where, "hostB")
    wait_for(lambda: fleet2.effects().spent() >= 4 * 10_000, 20, "every agent to spend once")

    cut = time.time()
    fleet2.b.host.cut()  # hostB runs on, but reaches neither Redis nor PostgreSQL
    # It fences itself: no proof of ownership for the ownership window (1.5 s here), then SIGTERM, the
    # grace (1 s), SIGKILL. Its agents' own log says when they stopped.
    wait_for(lambda: fleet2.reap() and all(len(fleet2.starts(r)) == 2 for r in on_b), 60,
             "hostA to retry hostB's runs", interval=0.3)
    log = fleet2.effects()
    for run in on_b:
        last_b = max(e.t for e in log.effects if e.run == run and e.attempt == "1")
        assert last_b <= cut + 1.5 + 1.0 + 1.0, f"run {run} wrote on hostB {last_b - cut:.2f}s after the cut"
        retry = [e for host, e in fleet2.starts(run) if host == "hostA"]
        assert retry and retry[0].t > last_b
        print(f"figures: hostB cut off; run {run[:8]}: its last write {last_b - cut:.2f}s after the cut, "
              f"the retry on hostA {retry[0].t - cut:.2f}s after")

    fleet2.b.host.reconnect()
    wait_consuming(fleet2, ("hostB",))
    fleet2.reap_until(lambda: all(fleet2.run(r).status in TERMINAL for r in run_ids), 90, "every run to end")
    for run in on_b:
        row = fleet2.run(run)
        assert (row.host, row.attempt) == ("hostA", 2), "a stale write of hostB's landed"
    _a_run_on(fleet2, "quick", "hostB")  # hostB takes work again
    assert fleet2.violations() == []


def test_a_host_cut_off_briefly_has_its_runs_retried_not_ended_as_killed(fleet2: MultiFleet) -> None:
    """Cut off past kill_unreachable_grace_s, back before the reaper took over: nobody killed anything,
    so the fenced agents' runs are retried like those of any host that could not prove its lease."""
    ids = [r for r in (fleet2.dispatch("stubborn", f"s{i}").run_id for i in range(4)) if r is not None]
    where = _started(fleet2, ids)
    on_b = _on(fleet2, where, "hostB")
    wait_for(lambda: fleet2.effects().spent() >= 4 * 10_000, 20, "every agent to spend once")

    cut = time.time()
    fleet2.b.host.cut()
    wait_for(lambda: time.time() > cut + 4.0 and not fleet2.b.host.alive_pids() & set().union(
        *(fleet2.effects().pids(r) for r in on_b)), 20, "hostB's agents to stop", interval=0.1)
    fleet2.b.host.reconnect()  # before any reaper pass: the runs were never taken over

    fleet2.reap_until(lambda: all(fleet2.run(r).status in TERMINAL for r in ids), 90, "every run to end")
    for run in on_b:
        row = fleet2.run(run)
        assert (row.status, row.attempt) == (RunStatus.SUCCEEDED, 2), (row.status, row.attempt, row.error)
    assert fleet2.violations() == []


def _a_run_on(multi: MultiFleet, agent: str, host: str, tries: int = 12) -> str:
    """Dispatch `agent` until one of its runs ends on `host`; that run's id."""
    for i in range(tries):
        batch = [r for r in (multi.dispatch(agent, f"{host}-{i}-{j}").run_id for j in range(4)) if r is not None]
        wait_for(lambda b=batch: all(multi.run(r).status in TERMINAL for r in b), 60, "the runs to end")  # type: ignore[misc]
        there = [r for r in batch if multi.run(r).host == host]
        if there:
            return there[0]
    raise AssertionError(f"no run of {agent} landed on {host} in {tries} batches")


def test_a_run_on_hostb_is_readable_from_infra_with_hostb_gone(fleet2: MultiFleet) -> None:
    run = _a_run_on(fleet2, "talk", "hostB")
    fleet2.b.host.lose()  # its disk's copy is out of reach now: the page never needs a shared disk
    shown = fleet2.infra.cli("logs", run)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("hello from hostB\n"), shown.stdout[:200]
    assert shown.stdout.count("x") == 70000  # more than one chunk, in order, none twice

    import urllib.request

    token = "bed-web-token-" + fleet2.bed.tag
    address = fleet2.bed.infra.address
    fleet2.infra.fleet.env.update({"FLEET_WEB_TOKEN": token, "FLEET_WEB_HOST": address, "FLEET_WEB_PORT": "8700"})
    fleet2.bed.infra.spawn([*PY_FLEET, "web"], fleet2.infra.fleet.tmp / "web.log", env=fleet2.infra.fleet.env)
    try:
        def page() -> str | None:
            try:
                with urllib.request.urlopen(f"http://{address}:8700/runs/{run}/log?token={token}", timeout=5) as r:
                    return str(r.read().decode())
            except OSError:
                return None

        text = wait_for(page, 30, "the page on infra to serve the run's log", interval=0.3)
        assert text == shown.stdout
    finally:
        proc = fleet2.bed.infra.procs.pop()
        proc.terminate()
        proc.wait(10)


SLOT_S = 3  # the ticker's schedule
LEADER_TTL_S = 10  # workers/beat.py


def _slots(multi: MultiFleet) -> list[datetime]:
    """The ticker's slots that got a run, in order (its work key names the slot)."""
    with db.session(multi.services.engine) as session:
        keys = [r.work_key for r in session.exec(select(Run).where(Run.agent == "ticker"))]
    assert all(k.startswith("schedule:") for k in keys)
    return sorted(datetime.fromisoformat(k.removeprefix("schedule:")) for k in keys)


def _leader(multi: MultiFleet) -> str:
    return str(multi.a.fleet.redis.get("fleet:beat:leader") or "")


def _sends(beat_log: Path) -> int:
    return beat_log.read_text().count("Sending due task fleet.ticks:") if beat_log.exists() else 0


def test_beat_on_both_hosts_fires_once_per_slot_as_leadership_moves_and_comes_back(fleet2: MultiFleet) -> None:
    fleet2.a.start_beat()
    wait_for(lambda: _leader(fleet2).startswith("hostA:"), 30, "hostA's beat to lead")
    fleet2.b.start_beat()
    wait_for(lambda: len(_slots(fleet2)) >= 2, 30, "two ticks")

    cut = datetime.now(UTC)
    fleet2.a.host.cut()
    wait_for(lambda: _leader(fleet2).startswith("hostB:"), LEADER_TTL_S + 10, "hostB's beat to take over")
    took_over = datetime.now(UTC)
    print(f"figures: beat on hostA cut off; hostB's beat led {(took_over - cut).total_seconds():.1f}s later")
    wait_for(lambda: [s for s in _slots(fleet2) if s > took_over], 30, "a tick led by hostB")

    fleet2.a.host.reconnect()
    a_log = fleet2.a.fleet.tmp / "beat.log"
    back = datetime.now(UTC)
    wait_for(lambda: len([s for s in _slots(fleet2) if s > back]) >= 2, 30, "two ticks after hostA is back")
    assert _leader(fleet2).startswith("hostB:"), "leadership moved back without a hand-over"
    sent_by_a = _sends(a_log)
    wait_for(lambda: len([s for s in _slots(fleet2) if s > back]) >= 3, 30, "another tick")
    assert _sends(a_log) == sent_by_a, "hostA's beat sent ticks while hostB led"

    assert fleet2.b.beat is not None
    os.killpg(fleet2.b.beat.pid, signal.SIGTERM)  # a clean stop gives the lease up at once
    fleet2.b.beat.wait(30)
    wait_for(lambda: _leader(fleet2).startswith("hostA:"), 15, "hostA's beat to lead again")
    again = datetime.now(UTC)
    wait_for(lambda: [s for s in _slots(fleet2) if s > again], 30, "a tick led by hostA again")

    slots = _slots(fleet2)
    assert len(slots) == len(set(slots))  # one run per slot: the unique key, whatever fired
    handover = (cut, took_over + timedelta(seconds=SLOT_S))
    for earlier, later in itertools.pairwise(slots):
        if (later - earlier).total_seconds() > SLOT_S:
            assert handover[0] - timedelta(seconds=SLOT_S) <= earlier and later <= handover[1], (
                f"slots missed between {earlier} and {later}, outside the hand-over {handover}")
    fleet2.reap_until(lambda: not fleet2.violations(), 30, "every tick's run to end cleanly")


def test_a_host_two_minutes_ahead_starts_nothing_twice_and_names_the_database_s_slots(
        bed: Bed, tmp_path: Path) -> None:
    lib = faketime_lib()
    if lib is None:
        pytest.skip("libfaketime (Debian's faketime package) is not installed and cannot be")
    ahead = {"LD_PRELOAD": lib, "FAKETIME": "+120s"}
    with multi_fleet(bed, tmp_path, env_b=ahead) as multi:
        skew = multi.b.host.enter(["env", *(f"{k}={v}" for k, v in ahead.items()), "date", "+%s"])
        assert abs(int(skew.stdout) - time.time() - 120) < 5, "hostB's clock is not two minutes ahead"
        multi.b.start_beat()  # the leader beat on the host that is ahead; ticks run on both hosts' workers
        ids = [r for r in (multi.dispatch("quick", f"q{i}").run_id for i in range(4)) if r is not None]
        wait_for(lambda: len(set(_tick_hosts(multi).values())) == 2, 60, "ticks run by both hosts' workers")
        multi.reap_until(lambda: all(multi.run(r).status in TERMINAL for r in ids), 60, "the runs to end")
        log = multi.effects()
        with db.session(multi.services.engine) as session:
            today = ledger.budget_day(session, "UTC")
            # Beat keeps ticking while we look: a slot queued a moment ago has simply not been claimed yet,
            # and one claimed a moment ago has not started its agent yet (that follows the claim's commit).
            ticks = [r for r in session.exec(select(Run).where(Run.agent == "ticker")) if r.started_at is not None]
        assert len(ticks) >= 2
        for run in ticks:
            slot = datetime.fromisoformat(run.work_key.removeprefix("schedule:")).timestamp()
            starts = wait_for(lambda r=run: multi.effects().starts(r.id), 30, f"tick {run.work_key}'s agent to start")
            late = starts[0].t - slot  # the agents write the machine's own time, on either host
            # Within the slot's length plus what a loaded machine takes to start it; never the skew away.
            assert 0 <= late < SLOT_S + 30, (f"the tick run on {run.host} named slot {run.work_key}, "
                                             f"{late:+.1f}s from when it started")
        assert {r.budget_day for r in [*ticks, *(multi.run(i) for i in ids)]} == {today}
        assert all(len(log.starts(r)) == 1 for r in ids)
        multi.reap_until(lambda: not multi.violations(), 30, "every run to end cleanly")


def _tick_hosts(multi: MultiFleet) -> dict[str, str]:
    with db.session(multi.services.engine) as session:
        return {r.id: str(r.host) for r in session.exec(select(Run).where(Run.agent == "ticker")) if r.host}


def _code_before_newest_migration(tmp: Path) -> Path | None:
    """The repository as it was before the newest migration was added (the "old code"), or None."""
    if shutil.which("git") is None:
        return None
    newest = sorted(p.name for p in (ROOT / "fleet" / "migrations" / "versions").glob("0*.py"))[-1]
    found = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%H", "--diff-filter=A", "--",
                            f"fleet/migrations/versions/{newest}"], capture_output=True, text=True)
    if found.returncode != 0 or not found.stdout.strip():
        return None
    old = tmp / "old-code"
    old.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", f"{found.stdout.strip()}^"], capture_output=True)
    if archive.returncode != 0:
        return None
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    return old


def test_a_rolling_upgrade_from_both_hosts_at_once_one_on_the_new_code_while_the_other_finishes_its_runs(
        bed: Bed, tmp_path: Path) -> None:
    old = _code_before_newest_migration(tmp_path)
    if old is None:
        pytest.skip("not a git checkout: the code before the newest migration cannot be had")
    with multi_fleet(bed, tmp_path, workers=False) as multi:
        for h in multi.hosts:  # both hosts on the old code, the schema at its head
            h.fleet.env["PYTHONPATH"] = str(old)
        assert multi.b.cli("db", "upgrade").returncode == 0
        previous = db.current_revision(multi.services.engine)
        assert previous is not None and previous != HEAD
        old_b = multi.b.start_worker()
        wait_consuming(multi, ("hostB",))
        on_old = [r for r in (multi.dispatch("work", f"old{i}").run_id for i in range(2)) if r is not None]
        _started(multi, on_old)

        # The new code's `fleet db upgrade` from both hosts at once (hostB's old worker runs on meanwhile).
        # Where the kernel has netem, hostB's statements arrive later, so the two interleave differently.
        multi.b.host.delay(40)
        new_env = [{**h.fleet.env, "PYTHONPATH": str(ROOT)} for h in multi.hosts]
        procs = [subprocess.Popen([*h.host.prefix(h.fleet.tmp), PY, "-m", "fleet", "db", "upgrade"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for h, env in zip(multi.hosts, new_env, strict=True)]
        outcomes = [(p.wait(120), *p.communicate()) for p in procs]
        assert [code for code, _, _ in outcomes] == [0, 0], outcomes
        multi.b.host.undelay()
        assert db.current_revision(multi.services.engine) == HEAD
        multi.a.fleet.env["PYTHONPATH"] = str(ROOT)  # hostA on the new code starts
        multi.a.start_worker()
        wait_consuming(multi, ("hostA",))
        on_new = [r for r in (multi.dispatch("quick", f"new{i}").run_id for i in range(2)) if r is not None]
        multi.reap_until(lambda: all(multi.run(r).status in TERMINAL for r in on_old), 60, "the old host's runs")
        assert all(multi.run(r).status == RunStatus.SUCCEEDED for r in on_old)

        multi.b.fleet.stop_worker(old_b)  # warm: hostB finishes what it runs, then comes back on the new code
        multi.b.fleet.env["PYTHONPATH"] = str(ROOT)
        multi.b.start_worker()
        multi.reap_until(lambda: all(multi.run(r).status in TERMINAL for r in on_new), 90, "the new runs")
        assert all(multi.run(r).status == RunStatus.SUCCEEDED for r in on_new)
        assert multi.violations() == []
