"""An agent that keeps its own record of what it did, so a test can check Fleet against it.

Every line goes to an effects log opened with O_APPEND (one write per line, so lines from many
processes never interleave), stamped with the wall clock:

    START run attempt pid pgid t      the attempt began
    TICK  run attempt pid t           still alive (every --tick seconds, from each process)
    SPEND run attempt micros t        money about to be reported (then the usage line is printed)
    END   run attempt code t          the attempt is about to exit with `code`

`--child` starts a child in the same process group that ticks too (and ignores SIGTERM with
`--ignore-term`), so a test sees whether a whole group died. `--kill-worker` SIGKILLs the Fleet
pool process that runs it (the agent's grandparent: it runs under Fleet's launcher) mid-run,
like an out-of-memory kill; `--kill-worker-main` kills the worker's main process instead.
`--first-exit` exits with another code on the first attempt only (a transient failure its retry
gets past), `--done` prints `{"fleet_done": ...}` (the agent is finished for good) and `--crash`
ends in SIGSEGV instead of an exit, as a native crash does.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time


def record(log: str, *fields: object) -> None:
    """Append one line to the effects log in a single write."""
    line = " ".join(str(f) for f in (*fields, f"{time.time():.6f}")) + "\n"
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def parent_of(pid: int) -> int:
    """The parent pid of a process, from /proc."""
    with open(f"/proc/{pid}/stat", "rb") as handle:
        stat = handle.read()
    return int(stat[stat.rfind(b")") + 2:].split()[1])


def pool_process() -> int:
    """The Fleet pool process running this agent: the parent, or the grandparent behind a launcher."""
    pid = os.getppid()
    with open(f"/proc/{pid}/cmdline", "rb") as handle:
        if b"launcher" in handle.read():
            return parent_of(pid)
    return pid


def _child(log: str, run: str, attempt: str, tick: float) -> None:
    while True:
        record(log, "TICK", run, attempt, os.getpid())
        time.sleep(tick)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--log", required=True, help="the effects log")
    parser.add_argument("--seconds", type=float, default=0.0, help="how long to run")
    parser.add_argument("--steps", type=int, default=1, help="spend steps, spread over --seconds")
    parser.add_argument("--cost", type=float, default=0.0, help="dollars per step")
    parser.add_argument("--tick", type=float, default=0.1, help="seconds between TICK lines")
    parser.add_argument("--exit", type=int, default=0, help="exit code")
    parser.add_argument("--first-exit", type=int, default=None, help="exit code of the first attempt only")
    parser.add_argument("--done", default=None, help="print {\"fleet_done\": DONE} before exiting")
    parser.add_argument("--crash", action="store_true", help="die of SIGSEGV instead of exiting")
    parser.add_argument("--child", action="store_true", help="start a ticking child in the group")
    parser.add_argument("--ignore-term", action="store_true", help="ignore SIGTERM (agent and child)")
    parser.add_argument("--kill-worker", action="store_true", help="SIGKILL the pool process mid-run")
    parser.add_argument("--kill-worker-main", action="store_true", help="SIGKILL the worker's main process")
    args = parser.parse_args()
    run, attempt = os.environ.get("FLEET_RUN_ID", "-"), os.environ.get("FLEET_ATTEMPT", "-")
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    record(args.log, "START", run, attempt, os.getpid(), os.getpgid(0))
    if args.child and os.fork() == 0:
        _child(args.log, run, attempt, args.tick)
    pool = pool_process()
    step_every = args.seconds / max(1, args.steps)
    deadline = time.monotonic() + args.seconds
    for step in range(args.steps):
        if args.kill_worker and step == args.steps // 2:
            os.kill(pool, signal.SIGKILL)
        if args.kill_worker_main and step == args.steps // 2:
            os.kill(parent_of(pool), signal.SIGKILL)
        if args.cost:
            micros = round(args.cost * 1_000_000)
            record(args.log, "SPEND", run, attempt, micros)
            print(json.dumps({"fleet_usage": {"cost_usd": args.cost}}), flush=True)
        _tick_until(args.log, run, attempt, min(deadline, time.monotonic() + step_every), args.tick)
    _tick_until(args.log, run, attempt, deadline, args.tick)
    code = args.first_exit if args.first_exit is not None and attempt == "1" else args.exit
    if args.done is not None:
        print(json.dumps({"fleet_done": args.done}), flush=True)
    record(args.log, "END", run, attempt, -int(signal.SIGSEGV) if args.crash else code)
    sys.stdout.flush()
    if args.crash:
        signal.signal(signal.SIGSEGV, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGSEGV)
    return int(code)


def _tick_until(log: str, run: str, attempt: str, until: float, tick: float) -> None:
    while True:
        record(log, "TICK", run, attempt, os.getpid())
        left = until - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(tick, left))


if __name__ == "__main__":
    sys.exit(main())
