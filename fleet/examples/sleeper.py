"""Sleeps, printing a line each second: a long-running agent for timeout and kill tests.

`--ignore-term` ignores SIGTERM (only SIGKILL stops it); `--child` also starts a grandchild that
sleeps as long, to prove Fleet stops the whole process group.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("seconds", type=float, nargs="?", default=30.0)
    parser.add_argument("--ignore-term", action="store_true")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--pidfile", help="append this process's (and the child's) pid here")
    args = parser.parse_args()
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pids = [os.getpid()]
    if args.child:
        child = subprocess.Popen([sys.executable, "-c", "import time, signal; "
                                  "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)"])
        pids.append(child.pid)
    if args.pidfile:
        with open(args.pidfile, "a", encoding="utf-8") as handle:
            handle.write(" ".join(map(str, pids)) + "\n")
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        print(f"sleeper {os.getpid()}: {deadline - time.monotonic():.0f}s left", flush=True)
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    print("sleeper: done", flush=True)


if __name__ == "__main__":
    main()
