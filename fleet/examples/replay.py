"""Replays a recorded agent transcript (e.g. `claude -p --output-format stream-json --verbose`) at speed.

Each line of the file is printed as it was recorded, with `--delay` seconds between lines, so the
worker reads usage the way it would from the real CLI: turn by turn, while the agent still runs.
A way to try a price table and a cap without spending anything:
`command = ["python", "-m", "fleet.examples.replay", "tests/data/claude-stream-fix-test.jsonl"]`.
"""

from __future__ import annotations

import argparse
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("transcript", help="a file of output lines, replayed as they are")
    parser.add_argument("--delay", type=float, default=0.05, help="seconds between lines")
    parser.add_argument("--exit", type=int, default=0, help="exit code once the transcript is replayed")
    args = parser.parse_args()
    with open(args.transcript, "rb") as transcript:
        for line in transcript:
            sys.stdout.buffer.write(line)
            sys.stdout.buffer.flush()
            if args.delay:
                time.sleep(args.delay)
    sys.exit(args.exit)


if __name__ == "__main__":
    main()
