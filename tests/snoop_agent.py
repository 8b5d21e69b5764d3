"""A hostile agent for tests/test_runas.py: it looks for a needle in every /proc/*/environ and
/proc/*/cmdline it can read, tries to read files it must not, tries to signal its launcher, and prints
what it found as one JSON line `{"snoop": {...}}`; then it sleeps and exits as told.

It runs under the system Python as another user, so it is stdlib only and sits in a folder any user
can read. The needle arrives reversed (NEEDLE_REVERSED), so that this process itself does not hold it.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import sys
import time
from typing import Any


def scan(needle: bytes) -> dict[str, Any]:
    """How many environ and cmdline files could be read, and which held the needle."""
    readable = {"environ": 0, "cmdline": 0}
    hits = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        for part in readable:
            try:
                with open(f"/proc/{name}/{part}", "rb") as handle:
                    data = handle.read()
            except OSError:
                continue
            readable[part] += 1
            if needle in data:
                hits.append([int(name), part])
    return {"readable": readable, "hits": hits}


def attempt(action: Any) -> str:
    """"ok", or the errno name the action failed with."""
    try:
        action()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return "ok"


def read(path: str) -> None:
    """Read a whole file."""
    with open(path, "rb") as handle:
        handle.read()


def capabilities() -> dict[str, int]:
    """This process's capability sets."""
    with open("/proc/self/status", encoding="ascii") as handle:
        fields = dict(line.split(":", 1) for line in handle.read().splitlines() if ":" in line)
    return {name: int(fields[name], 16) for name in ("CapInh", "CapPrm", "CapEff", "CapAmb")}


def main() -> int:
    """Snoop, report, then sleep and exit as the arguments say."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--try", dest="paths", action="append", default=[])
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--exit", type=int, default=0)
    args = parser.parse_args()
    key = os.environ.get("FLEET_AGENT_KEY", "")
    here = os.stat(".")
    report = {
        "uid": [os.getuid(), os.geteuid()], "gid": [os.getgid(), os.getegid()], "groups": os.getgroups(),
        "home": os.environ.get("HOME"), "cwd": os.getcwd(), "cwd_owner": here.st_uid,
        "cwd_mode": here.st_mode & 0o777, "caps": capabilities(),
        "key_sha256": hashlib.sha256(key.encode()).hexdigest() if key else None,
        "scan": scan(os.environ["NEEDLE_REVERSED"][::-1].encode()),
        "tried": {path: attempt(lambda path=path: read(path)) for path in args.paths},
        "signal_launcher": attempt(lambda: os.kill(os.getppid(), 0)),
    }
    print(json.dumps({"snoop": report}), flush=True)
    time.sleep(args.sleep)
    return args.exit


if __name__ == "__main__":
    sys.exit(main())
