"""The fleet on two hosts for real: network namespaces on one bridge (tests/hosts/bed.py).

Each scenario is checked against the agents' own effects logs (one per host, merged by time: the
agents' clocks are the machine's, whatever the worker's) and the database: I1-I5 of tests/faults.
"""

from __future__ import annotations

import time

import pytest

from fleet.models import TERMINAL, RunStatus
from tests.harness import wait_for
from tests.hosts.conftest import MultiFleet

pytestmark = [pytest.mark.hosts, pytest.mark.slow]


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
    runs = [fleet2.dispatch("work", f"w{i}").run_id for i in range(2)]
    runs += [fleet2.dispatch("stubborn", f"s{i}").run_id for i in range(2)]
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
        promised = after + 1.0 + (grace + 0.5 if stubborn else 0.0)
        assert last <= promised, (f"run {run} on {where[run]} wrote at {last - before:.2f}s after the kill began "
                                  f"(the command took {after - before:.2f}s)")
        assert fleet2.run(run).status == RunStatus.KILLED
    assert fleet2.violations() == []
