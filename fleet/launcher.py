"""The first program of every agent attempt: it starts the agent and outlives it, so the attempt's whole
process group goes when the attempt ends, for whatever reason it ends.

`fleet.process` runs it as ``python -I -S launcher.py key=value ... -- PROGRAM ARGS...`` as the leader
of a new process group; the keys are

    parent=PID     the executor's pid: if it is gone before we start, nothing starts
    lc=VALUE       the agent's LC_CTYPE ('=C.UTF-8'), or '-' for none (Python's startup changes it)
    tether=FD      the read end of the executor's dead-man pipe, or '-' for none
    ttl=SECONDS    how long the executor's first proof of ownership is good for
    grace=SECONDS  between SIGTERM and SIGKILL when the launcher itself stops the group
    creds=U:G:GS   switch the agent to uid U, gid G and groups GS (comma-separated), or '-'
    cwd=PATH       the folder the agent starts in, entered after the switch (it may be the agent's only), or '-'
    run=ID:FENCE   which run attempt this is (for `ps` and the orphan sweep; not a secret)

With creds, the forked child switches user, then drops every capability it still holds (a non-root
worker's ambient CAP_SETUID would otherwise survive setuid and exec: the agent could switch back),
then sets its parent-death signal (the kernel clears it on any credential change), then enters cwd and
execs. Without creds (the worker's own user) it still clears the ambient and inheritable sets, and
a non-root one drops every capability and sets no_new_privs (`confine_self`): the same ambient
CAP_SETUID would let an agent of the worker's user setuid(0). A switch, that drop or a cwd that fails
is a configuration error: exit 78, and nothing runs.

The launcher forks the agent (which gets PR_SET_PDEATHSIG, so it cannot outlive the launcher),
becomes a child subreaper (orphaned descendants come back to it) and then waits for one of:
- the agent exits: whatever it left in the group gets SIGTERM, the grace, then SIGKILL; the
  launcher exits with the agent's code (128+N for a death by signal N);
- the tether reaches end-of-file: the executor died (a SIGKILLed pool process), so nobody owns the
  attempt any more: the group is stopped the same way;
- the tether's deadline passes: the executor could not prove it still owns the run (its lease) in
  time, or is stopped or wedged: the group is stopped before the lease can lapse, so a retry
  elsewhere never overlaps this attempt.
Each message on the tether is a number of milliseconds the ownership is good for from now.
- SIGUSR1 (the executor's kill, fleet/process.py, or the orphan sweep's): the grace is over; every
  member of the group and every descendant gets SIGKILL at once.
Stopping the group always ends in SIGKILLs to every member and every descendant of the launcher,
found by the parent chains in /proc, until none is left, and only then does it exit: a process that
left the group (its own setsid) is still a descendant, and, the launcher being its subreaper, cannot
stop being one while the launcher lives. So nobody else may SIGKILL the group: that would take the
launcher first and leave such a process to init (fleet/process.py asks by SIGUSR1 instead).
The launcher ignores SIGTERM, SIGINT, SIGHUP and SIGQUIT (a group-wide SIGTERM is for the agent).
Stdlib only, `signal` not imported (it pulls in `enum`; `_signal` is its C half).
"""

from __future__ import annotations

import _signal  # not `signal`: it pulls in `enum`, a third of our start-up
import contextlib
import ctypes
import os
import select
import sys
import time

PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_CAPABILITY_VERSION_3 = 0x20080522
EINVAL = 22
SIGHUP, SIGINT, SIGQUIT, SIGKILL, SIGUSR1, SIGPIPE, SIGTERM, SIGXFSZ = 1, 2, 3, 9, 10, 13, 15, 25
SIG_DFL, SIG_IGN = 0, 1
EXIT_USAGE = 2
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127
EXIT_CONFIG = 78
UNSET = "-"
POLL_S = 0.02  # how often to look for the group's survivors while stopping it
_libc = ctypes.CDLL(None, use_errno=True)


def prctl(option: int, value: int) -> None:
    """prctl(2) with one argument; raises OSError."""
    zero = ctypes.c_ulong(0)
    if _libc.prctl(option, ctypes.c_ulong(value), zero, zero, zero) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def set_parent_death_signal(signum: int) -> None:
    """Ask the kernel to send `signum` to this process when the thread that spawned it exits."""
    prctl(PR_SET_PDEATHSIG, signum)


def _clear_ambient() -> None:
    try:
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError as exc:
        if exc.errno != EINVAL:  # EINVAL: a kernel without ambient capabilities (before 4.3) has none to clear
            raise


def _capset(data: ctypes.Array[ctypes.c_uint32]) -> None:
    header = (ctypes.c_uint32 * 2)(_CAPABILITY_VERSION_3, 0)
    if _libc.capset(header, data) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def drop_capabilities() -> None:
    """Empty every capability set of this process, the ambient one first; raises OSError."""
    _clear_ambient()
    _capset((ctypes.c_uint32 * 6)())  # effective, permitted, inheritable; twice (64 bits): all zero


def _capabilities() -> ctypes.Array[ctypes.c_uint32]:
    """This process's capability sets (capget): effective, permitted, inheritable; twice (64 bits)."""
    header = (ctypes.c_uint32 * 2)(_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()
    if _libc.capget(header, data) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return data


def confine_self() -> None:
    """Stay this user, but pass on nothing that could make the agent someone else; raises OSError.

    A non-root worker may hold CAP_SETUID and friends as ambient capabilities (to switch users for run_as
    agents): an agent of its own user would inherit them through the exec and setuid(0). Ambient and
    inheritable go always; a non-root process also drops permitted and effective and takes no_new_privs (no
    setuid binary or file capability gives any back). Root stays root (doctor warns about such an agent)."""
    root = os.geteuid() == 0
    if root:
        _clear_ambient()
        data = _capabilities()
        data[2] = data[5] = 0  # inheritable
        _capset(data)
        return
    drop_capabilities()
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def switch_user(creds: str) -> None:
    """Become uid:gid:groups for good, holding no capability; raises OSError."""
    uid, gid, groups = creds.split(":")
    os.setgroups([int(g) for g in groups.split(",") if g])
    os.setgid(int(gid))
    os.setuid(int(uid))
    drop_capabilities()


def _disposition(signums: tuple[int, ...], handler: int) -> None:
    _libc.signal.restype = ctypes.c_void_p
    for signum in signums:
        _libc.signal(signum, ctypes.c_void_p(handler))


def parse(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """The key=value options and the agent's argv; ValueError when malformed."""
    if "--" not in args:
        raise ValueError("missing --")
    cut = args.index("--")
    options = dict(arg.split("=", 1) for arg in args[:cut])
    argv = args[cut + 1:]
    if not argv or "parent" not in options:
        raise ValueError("parent= and a program are required")
    return options, argv


def original_environment(lc_ctype: str) -> dict[bytes, bytes]:
    """The environment the agent was given, undoing what Python's own startup changed in it."""
    env = dict(os.environb)
    # In the C locale Python "coerces" LC_CTYPE to C.UTF-8 and exports it (PEP 538), even under -I.
    if lc_ctype == UNSET:
        env.pop(b"LC_CTYPE", None)
    else:
        env[b"LC_CTYPE"] = os.fsencode(lc_ctype.removeprefix("="))
    return env


def _become_agent(argv: list[str], options: dict[str, str], tether: int | None) -> None:
    """In the forked child: drop to the agent's user, die with the launcher, enter its folder, exec. Never returns."""
    launcher = os.getppid()
    creds, cwd = options.get("creds", UNSET), options.get("cwd", UNSET)
    # Until the exec, a failure is the configuration's (a user or a folder this agent cannot have): 78.
    code, step = EXIT_CONFIG, f"cannot switch to uid:gid:groups {creds}"
    try:
        # Ignored signals survive exec: ours, and the two Python's start-up ignores (as subprocess restores them).
        _disposition((SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGPIPE, SIGXFSZ), SIG_DFL)
        if tether is not None:
            os.close(tether)
        if creds != UNSET:
            switch_user(creds)
        else:
            step = "cannot drop the worker's capabilities"
            confine_self()
        set_parent_death_signal(SIGKILL)  # after the switch, which would clear it
        if os.getppid() != launcher:
            return  # the launcher died before the signal was armed: nobody would stop the agent
        step = f"cannot enter its working directory {cwd}"
        if cwd != UNSET:
            os.chdir(cwd)
        code, step = EXIT_CANNOT_EXECUTE, f"cannot run {argv[0]}"
        os.execve(argv[0], argv, original_environment(options.get("lc", UNSET)))
    except OSError as exc:
        if code == EXIT_CANNOT_EXECUTE and isinstance(exc, FileNotFoundError):
            code = EXIT_NOT_FOUND
        _say(f"fleet launcher: {step}: {exc.strerror}\n")
    finally:
        os._exit(code)


def _say(text: str) -> None:
    """A line into the agent's output; nobody may be reading it any more (the executor died)."""
    with contextlib.suppress(OSError):
        os.write(2, text.encode())


def _live_processes() -> dict[int, tuple[int, int]]:
    """Every live process of this host (this pid namespace): pid -> (parent, group)."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if fields[0] not in (b"Z", b"X"):
            found[int(name)] = (int(fields[1]), int(fields[2]))
    return found


def _members() -> list[int]:
    """Every other live process of our group and every descendant of ours, by the parent chains down from us.

    A descendant that left the group (its own setsid) is still one, and while we live it cannot leave our
    tree: an orphan comes back to us, the subreaper."""
    me, group = os.getpid(), os.getpgid(0)
    processes = _live_processes()
    children: dict[int, list[int]] = {}
    for pid, (parent, _group) in processes.items():
        children.setdefault(parent, []).append(pid)
    found = {pid for pid, (_parent, pgrp) in processes.items() if pgrp == group} - {me}
    todo = list(found | set(children.get(me, [])))
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(child for child in children.get(pid, []) if child not in found)
    return sorted(found)


_statuses: dict[int, int] = {}  # wait statuses of the children reaped while stopping the group


def _reap() -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _statuses[pid] = status


def _wait(pid: int) -> int:
    """A child's wait status, whether it was reaped just now or earlier by `_reap`."""
    if pid in _statuses:
        return _statuses.pop(pid)
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return _statuses.pop(pid, 0)


def _no_children() -> bool:
    # Every member of our group is a descendant, and as a subreaper every orphaned one becomes our child:
    # with no child left there is nothing to stop (and no /proc scan to pay for).
    _reap()  # reaps (and records) every exited child; then ECHILD means none is left
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return False


class _KillRequest:
    """SIGUSR1 from the executor (fleet/process.py's kill, the orphan sweep): no more grace, kill it all now.

    The handler only notes it; `_signal`'s wakeup fd (a pipe) wakes a select that is under way."""

    requested = False

    def __init__(self) -> None:
        self.read_fd, write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        _signal.set_wakeup_fd(write_fd)
        _signal.signal(SIGUSR1, self._note)

    @classmethod
    def _note(cls, _signum: int, _frame: object) -> None:
        cls.requested = True


def stop_group(grace_s: float) -> None:
    """SIGTERM the group, wait up to `grace_s` (cut short by a kill request) for it to empty, then SIGKILL every
    member and descendant, until none is: we are never in the way of that SIGKILL, so nothing is left unwatched."""
    if _no_children():
        return
    members = _members()
    if not members:
        return
    if not _KillRequest.requested:
        os.killpg(os.getpgid(0), SIGTERM)  # we ignore it ourselves
    deadline = time.monotonic() + grace_s
    while members and not _KillRequest.requested and time.monotonic() < deadline:
        time.sleep(POLL_S)
        _reap()
        members = _members()
    while members:
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, SIGKILL)
        time.sleep(POLL_S)
        _reap()
        members = _members()


def _read_tether(tether: int) -> float | None:
    """The newest validity in the pipe (seconds), or None at end-of-file."""
    data = os.read(tether, 4096)
    if not data:
        return None
    lines = data.split(b"\n")
    last = lines[-1] or (lines[-2] if len(lines) > 1 else b"")
    try:
        return int(last) / 1000
    except ValueError:
        return 0.0


def supervise(agent: int, tether: int | None, ttl_s: float | None, grace_s: float, wake: int) -> int:
    """Wait for the agent, the tether's end or its deadline, or a kill request (`wake` is readable); stop the
    group; the agent's exit status."""
    pidfd = os.pidfd_open(agent)
    deadline = None if ttl_s is None else time.monotonic() + ttl_s
    watched = [pidfd, wake] + ([tether] if tether is not None else [])
    status: int | None = None
    reason = ""
    while status is None:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select(watched, [], [], 0 if _KillRequest.requested else timeout)
        if pidfd in ready:
            status = _wait(agent)
            break
        if _KillRequest.requested:
            reason = ""  # the executor's kill: it says why; no line of ours in the agent's output
        elif tether is not None and tether in ready:
            valid = _read_tether(tether)
            if valid is None:
                reason = "its executor is gone"
            else:
                deadline = time.monotonic() + valid
                continue
        elif deadline is not None and time.monotonic() >= deadline:
            reason = "its executor could not prove it still owns the run"
        else:
            continue
        if reason:
            _say(f"\nfleet launcher: stopping the agent: {reason}\n")
        stop_group(grace_s)
        status = _wait(agent)
    stop_group(grace_s)
    _reap()
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def main(args: list[str]) -> int:
    """Start the agent under supervision; return its exit code (or a launcher failure's)."""
    try:
        options, argv = parse(args)
        parent = int(options["parent"])
        tether = None if options.get("tether", UNSET) == UNSET else int(options["tether"])
        ttl_s = float(options["ttl"]) if "ttl" in options else None
        grace_s = float(options.get("grace", "5"))
    except ValueError as exc:
        print(f"usage: launcher.py parent=PID [key=value ...] -- PROGRAM [ARGS...] ({exc})", file=sys.stderr)
        return EXIT_USAGE
    if os.getppid() != parent:
        return EXIT_CANNOT_EXECUTE  # the executor died before we started: nobody would own the agent
    if os.getpgid(0) != os.getpid():
        os.setpgid(0, 0)  # the group we stop must be the attempt's own, however we were started
    _disposition((SIGHUP, SIGINT, SIGQUIT, SIGTERM), SIG_IGN)
    wake = _KillRequest().read_fd  # before the fork: a kill that comes at once must find it in place
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    agent = os.fork()
    if agent == 0:
        _become_agent(argv, options, tether)
    code = supervise(agent, tether, ttl_s, grace_s, wake)
    # Nothing is left to kill, and the executor asks on every turn until we are gone: Python's shutdown puts
    # SIGUSR1's default action back (ending us by it, not with the agent's status), but leaves an ignored one be.
    _signal.signal(SIGUSR1, _signal.SIG_IGN)  # through Python's own table: its shutdown reads that one
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
