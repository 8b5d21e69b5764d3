"""Exits with a chosen code: 0 done, 3 idle, 75 transient, 77 auth, 78 config, anything else a failure."""

from __future__ import annotations

import argparse
import sys


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("code", type=int, nargs="?", default=0)
    parser.add_argument("--message", default="")
    args = parser.parse_args()
    print(f"exit_with: exiting {args.code} {args.message}".rstrip(), file=sys.stderr, flush=True)
    sys.exit(args.code)


if __name__ == "__main__":
    main()
