"""Run every benchmark with its defaults, one after the other, and collect their JSON lines.

    .venv/bin/python -m bench.all                       # ~12 minutes on 2 cores
    .venv/bin/python -m bench.all --only efficiency,enqueue --json /tmp/bench.jsonl

Each script is its own process with its own time bound; a script that misses a target or hits
its bound exits 1, which is reported here and does not stop the others.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from bench.common import ROOT

SCRIPTS = {
    "efficiency": ["--baseline"],
    "barrier": [],
    "ceiling": [],
    "enqueue": [],
    "resume": [],
    "worker_memory": [],
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(SCRIPTS))
    ap.add_argument("--json", default="/tmp/refexp-bench/results.jsonl")
    ap.add_argument("--wait-quiet", type=float, default=0,
                    help="before each script, wait up to this many s for the 1-min load average to drop below 1")
    a = ap.parse_args(argv)
    chosen = [s for s in (a.only.split(",") if a.only else SCRIPTS) if s]
    outcome = {}
    for name in chosen:
        quiet_by = time.monotonic() + a.wait_quiet
        while os.getloadavg()[0] >= 1.0 and time.monotonic() < quiet_by:
            time.sleep(5)
        t = time.monotonic()
        rc = subprocess.call([sys.executable, "-m", f"bench.{name}", *SCRIPTS[name], "--json", a.json], cwd=ROOT)
        outcome[name] = (rc, time.monotonic() - t)
        print()
    print("== bench.all")
    for name, (rc, secs) in outcome.items():
        print(f"  {name:14s} {'ok' if rc == 0 else 'target missed or bound hit'} ({secs:.0f} s)")
    print(f"figures: {a.json}")
    return 0 if all(rc == 0 for rc, _ in outcome.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
