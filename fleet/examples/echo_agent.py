"""Prints what it was asked to do and a usage line, like a model call that costs `--cost` dollars.

`--append FILE` appends one line per run to FILE: tests count those lines to prove a job ran once.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cost", type=float, default=0.01, help="dollars to report spending")
    parser.add_argument("--usage-lines", type=int, default=1, help="how many usage lines to print")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds between usage lines")
    parser.add_argument("--append", help="file to append one line to (a countable side effect)")
    parser.add_argument("--done", help="print a fleet_done line with this reason")
    args = parser.parse_args()
    run_id = os.environ.get("FLEET_RUN_ID", "-")
    if args.append:
        with open(args.append, "a", encoding="utf-8") as handle:
            handle.write(f"{run_id} {os.getpid()}\n")
    print(f"echo agent: run {run_id}, work key {os.environ.get('FLEET_WORK_KEY', '-')!r}", flush=True)
    print(f"payload: {os.environ.get('FLEET_PAYLOAD', '')}", flush=True)
    for _ in range(args.usage_lines):
        usage = {"cost_usd": args.cost, "input_tokens": 1200, "output_tokens": 300}
        print(json.dumps({"fleet_usage": usage}), flush=True)
        if args.sleep:
            time.sleep(args.sleep)
    if args.done:
        print(json.dumps({"fleet_done": args.done}), flush=True)


if __name__ == "__main__":
    main()
