"""Fails every other run (exit 1, then 0, then 1...), keeping its count in a small state file.

The retry path in action: the first attempt fails and the one retry succeeds.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state", help="state file (default: one per agent in the temp folder)")
    args = parser.parse_args()
    agent = os.environ.get("FLEET_AGENT", "flaky")
    state = Path(args.state or Path(tempfile.gettempdir()) / f"fleet-flaky-{agent}.count")
    count = int(state.read_text() or 0) if state.exists() else 0
    state.write_text(str(count + 1))
    if count % 2 == 0:
        print(f"flaky: run {count + 1} fails on purpose", file=sys.stderr, flush=True)
        sys.exit(1)
    print(f"flaky: run {count + 1} succeeds", flush=True)


if __name__ == "__main__":
    main()
