"""A ~$0 preflight: exit 0 when there is work, 3 when idle (no agent process is then started).

It reports work when the file given by `--marker` exists (and is not empty), or always with no marker.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--marker", help="work exists while this file exists and is not empty")
    args = parser.parse_args()
    if args.marker and not (Path(args.marker).exists() and Path(args.marker).stat().st_size):
        print("has_work: nothing to do", flush=True)
        sys.exit(3)
    print("has_work: work found", flush=True)


if __name__ == "__main__":
    main()
