"""The bed itself: hosts that are really apart, and a tear-down that leaves nothing behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.faults.effects import pid_alive
from tests.harness import PY, wait_for
from tests.hosts.bed import Bed, hosts_up, missing_tools

pytestmark = [pytest.mark.hosts, pytest.mark.slow]


@pytest.fixture
def bare_bed(tmp_path: Path) -> Bed:
    """A bed without servers: the bridge, three namespaces and infra's init."""
    why = missing_tools()
    if why is not None:
        pytest.skip(why)
    return Bed(tmp_path).build(servers=False)


def test_hosts_have_their_own_names_pids_and_addresses_and_nothing_survives_a_failed_test(bare_bed: Bed) -> None:
    bed, seen = bare_bed, {}
    with pytest.raises(RuntimeError), hosts_up(bed, ("hostA", "hostB")):
        for name in ("hostA", "hostB"):
            host = bed.hosts[name]
            assert host.enter(["hostname"]).stdout.strip() == name
            assert host.enter(["sh", "-c", "echo $$"]).stdout.strip() not in ("", str(os.getpid()))
            addresses = host.enter(["ip", "-4", "-o", "addr", "show", "eth0"]).stdout
            assert host.address in addresses
            sleeper = host.spawn(["sleep", "600"], bed.root / f"{name}.log")
            seen[name] = (host.init_pid, sleeper.pid)
        hostb = bed.hosts["hostB"]
        assert _connect(bed, "hostB") == "refused"  # infra answers (nothing listens on that port)
        hostb.cut()
        assert _connect(bed, "hostB") == "timeout"  # nothing comes back: cut off, not refused
        assert _connect(bed, "hostA") == "refused"
        hostb.reconnect()
        assert _connect(bed, "hostB") == "refused"
        raise RuntimeError("the test failed here")
    for init_pid, sleeper_pid in seen.values():
        assert init_pid is not None
        wait_for(lambda p=init_pid, q=sleeper_pid: not pid_alive(p) and not pid_alive(q), 10,  # type: ignore[misc]
                 "the host's processes to be gone")
    bed.destroy()
    assert bed.leftovers() == []
    assert not pid_alive(seen["hostA"][0] or 0)


def _connect(bed: Bed, name: str) -> str:
    """What a TCP connection from a host to infra meets: refused, or a timeout."""
    probe = ("import socket, sys\ntry:\n    socket.create_connection((sys.argv[1], 9), timeout=1.5)\n"
             "except ConnectionRefusedError:\n    print('refused')\nexcept OSError:\n    print('timeout')\n")
    return bed.hosts[name].enter([PY, "-S", "-c", probe, bed.infra.address]).stdout.strip()
