"""`run_as`: agents under their own uid, with no capability, no key but their own, and no fleet secret.

The tests run as root. A worker that is not root but may switch users (compose's: CAP_SETUID,
CAP_SETGID and CAP_KILL as ambient capabilities) is played by `setpriv --reuid` with those ambient
capabilities, and one that may not by a capability-less root (tests.harness.CAPLESS). Agents run as
`nobody` with the system's /usr/bin/python3: the test venv's interpreter lives under /root, which
nobody cannot enter.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import CAPLESS, ROOT, pid_alive, wait_for

LAUNCHER = ROOT / "fleet" / "launcher.py"
SYSTEM_PY = "/usr/bin/python3"
NOBODY = 65534
WORKER_UID = 1234  # a non-root "worker" with no passwd entry: setpriv takes numbers
SWITCH_CAPS = "+setuid,+setgid,+kill"
# A non-root process that keeps CAP_SETUID, CAP_SETGID and CAP_KILL across exec, as compose starts workers.
NON_ROOT_WITH_CAPS = ["setpriv", f"--reuid={WORKER_UID}", f"--regid={WORKER_UID}", "--clear-groups",
                      f"--inh-caps={SWITCH_CAPS}", f"--ambient-caps={SWITCH_CAPS}", "--"]

PROBE = """
import ctypes, json, os
libc = ctypes.CDLL(None)
signum = ctypes.c_int(-1)
libc.prctl(2, ctypes.byref(signum), 0, 0, 0)  # PR_GET_PDEATHSIG
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
print(json.dumps({"uid": status["Uid"].split(), "gid": status["Gid"].split(), "groups": os.getgroups(),
                  "caps": {name: int(status[name], 16) for name in ("CapInh", "CapPrm", "CapEff", "CapAmb")},
                  "pdeathsig": signum.value, "cwd": os.getcwd()}))
"""

needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not Path(SYSTEM_PY).exists(),
                                reason="needs root, setpriv and /usr/bin/python3")


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A fresh folder under /tmp that any user may enter (pytest's tmp_path is under a 0700 folder)."""
    folder = Path(tempfile.mkdtemp(prefix="fleet-runas-", dir="/tmp"))
    folder.chmod(0o711)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def world_readable(path: Path) -> bool:
    """Whether any user can read `path` through every folder above it (by mode bits)."""
    folders = [p for p in path.resolve().parents]
    return all(p.stat().st_mode & 0o001 for p in folders) and bool(path.stat().st_mode & 0o004)


def launch(options: list[str], argv: list[str], prefix: list[str] | None = None) -> subprocess.Popen[bytes]:
    """fleet/launcher.py under the system Python (it is stdlib only), as a new group leader."""
    return subprocess.Popen([*(prefix or []), SYSTEM_PY, "-I", "-S", str(LAUNCHER), f"parent={os.getpid()}",
                             "lc=-", *options, "--", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, env={"PATH": "/usr/bin:/bin"})


def probe(options: list[str], prefix: list[str] | None = None) -> tuple[int, str]:
    """Run PROBE as the agent; (the launcher's exit code, what was printed)."""
    proc = launch(options, [SYSTEM_PY, "-I", "-S", "-c", PROBE], prefix)
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out.decode()


# ---------------------------------------------------------------- the launcher's switch


@needs_root
@pytest.mark.parametrize("worker", ["root", "non-root with CAP_SETUID, CAP_SETGID, CAP_KILL"])
def test_the_agent_runs_as_its_user_with_no_capability_and_dies_with_the_launcher(worker: str, tmp_path: Path) -> None:
    """After the switch the agent has the target's uid, gid and groups, no capability in any set (a
    non-root worker's ambient ones would otherwise survive setuid and exec), and still its parent-death
    signal (the kernel clears it on a credential change: it must be set after the switch)."""
    if worker != "root" and not world_readable(LAUNCHER):
        pytest.skip("the launcher must be readable by a non-root uid")
    prefix = None if worker == "root" else NON_ROOT_WITH_CAPS
    if prefix:  # the control: the "worker" itself does hold the capabilities
        held = subprocess.run([*prefix, "grep", "CapAmb", "/proc/self/status"], capture_output=True, text=True)
        assert int(held.stdout.split()[1], 16) == 0b11100000, held.stdout
    code, out = probe([f"creds={NOBODY}:{NOBODY}:{NOBODY}"], prefix)
    assert code == 0, out
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen["uid"] == [str(NOBODY)] * 4 and seen["gid"] == [str(NOBODY)] * 4 and seen["groups"] == [NOBODY]
    assert seen["caps"] == {"CapInh": 0, "CapPrm": 0, "CapEff": 0, "CapAmb": 0}, seen
    assert seen["pdeathsig"] == signal.SIGKILL


@needs_root
def test_a_switched_agent_dies_when_its_launcher_is_killed(open_dir: Path) -> None:
    """The behaviour behind the flag: SIGKILL the launcher, and the agent (another uid) goes with it."""
    open_dir.chmod(0o777)
    pidfile = open_dir / "agent.pid"
    script = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    proc = launch([f"creds={NOBODY}:{NOBODY}:"], [SYSTEM_PY, "-I", "-S", "-c", script])
    agent = None
    try:
        wait_for(lambda: pidfile.exists() and pidfile.read_text(), 20, "the agent to start")
        agent = int(pidfile.read_text())
        assert os.stat(f"/proc/{agent}").st_uid == NOBODY
        proc.kill()
        proc.wait(10)
        wait_for(lambda: not pid_alive(agent), 5, "the agent to die with its launcher")
    finally:
        if agent is not None and pid_alive(agent):
            os.kill(agent, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@needs_root
def test_a_launcher_that_cannot_switch_exits_78_and_runs_nothing(tmp_path: Path) -> None:
    """A capability-less root cannot setgroups/setuid: a configuration error (78) naming the switch,
    and the program never runs as the worker's own user instead."""
    marker = tmp_path / "ran"
    proc = launch([f"creds={NOBODY}:{NOBODY}:"], ["/usr/bin/touch", str(marker)], prefix=CAPLESS)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 78, out
    assert b"cannot switch to uid:gid:groups 65534:65534:" in out
    time.sleep(0.1)
    assert not marker.exists()


@needs_root
def test_the_agent_starts_in_its_working_directory(open_dir: Path) -> None:
    """`cwd=` is entered by the agent after the switch (a folder only the agent may enter: the launcher,
    another uid, need not)."""
    home = open_dir / "home"
    home.mkdir(mode=0o700)
    os.chown(home, NOBODY, NOBODY)
    code, out = probe([f"creds={NOBODY}:{NOBODY}:", f"cwd={home}"])
    assert code == 0, out
    assert json.loads(out.strip().splitlines()[-1])["cwd"] == str(home)
    code, out = probe([f"creds={NOBODY}:{NOBODY}:", f"cwd={open_dir / 'missing'}"])
    assert code == 78 and "cannot enter its working directory" in out, out
