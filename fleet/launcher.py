"""The first program an agent's process runs: it asks to die with its parent, then becomes the agent.

`fleet.process` runs it as ``python -I -S launcher.py PARENT_PID LC_CTYPE -- PROGRAM ARGS...``.
It sets PR_SET_PDEATHSIG=SIGKILL, which `preexec_fn` could do only at the risk of a deadlock in a
threaded worker, checks that the parent did not die before that (the signal would then never come),
and execs PROGRAM with the exact environment it was given. Stdlib only and run without `site`: it
costs ~15 ms per spawn where ``python -m fleet.launcher`` costs ~35 ms.
"""

from __future__ import annotations

import ctypes
import os
import sys

PR_SET_PDEATHSIG = 1
SIGKILL = 9  # a literal: `import signal` pulls in `enum` and adds milliseconds to every spawn
EXIT_USAGE = 2
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127
UNSET = "-"  # the LC_CTYPE argument when the agent's environment has no LC_CTYPE


def set_parent_death_signal(signum: int) -> None:
    """Ask the kernel to send `signum` to this process when the thread that spawned it exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    zero = ctypes.c_ulong(0)
    if libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signum), zero, zero, zero) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def original_environment(lc_ctype: str) -> dict[bytes, bytes]:
    """The environment the agent was given, undoing what Python's own startup changed in it."""
    env = dict(os.environb)
    # In the C locale Python "coerces" LC_CTYPE to C.UTF-8 and exports it (PEP 538), even under -I.
    if lc_ctype == UNSET:
        env.pop(b"LC_CTYPE", None)
    else:
        env[b"LC_CTYPE"] = os.fsencode(lc_ctype.removeprefix("="))
    return env


def main(args: list[str]) -> int:
    """Set the death signal, make sure the parent still lives, exec the agent; return only on failure."""
    if len(args) < 4 or args[2] != "--":
        print("usage: launcher.py PARENT_PID LC_CTYPE -- PROGRAM [ARGS...]", file=sys.stderr)
        return EXIT_USAGE
    parent, lc_ctype, argv = int(args[0]), args[1], args[3:]
    set_parent_death_signal(SIGKILL)
    if os.getppid() != parent:
        # The parent died before the prctl: no signal will ever come, so do what it would have done.
        os.kill(os.getpid(), SIGKILL)
    try:
        os.execve(argv[0], argv, original_environment(lc_ctype))
    except OSError as exc:
        print(f"fleet launcher: cannot run {argv[0]}: {exc.strerror}", file=sys.stderr, flush=True)
        return EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else EXIT_CANNOT_EXECUTE
    return EXIT_CANNOT_EXECUTE  # not reached: execve returns only by raising


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
