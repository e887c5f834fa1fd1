"""Redis commands per VLM call of the fleet budget alone (issue 16 counts every one).

Why apart from ``bench.redis_cost``: that one runs a whole fleet, where the budget's share is
mixed with kombu's and the run state's; this one takes and releases slots in a loop
(``FleetBudget.slot`` with an empty body) on a private redis-server and reads ``INFO
commandstats``, which counts the commands a Lua script runs as well as the ``EVALSHA`` itself.

    .venv/bin/python -m bench.budget_cost [--calls 400]
"""

from __future__ import annotations

import argparse
import uuid

from bench.common import banner, redis_client, redis_server

CASES = (  # label, max_concurrency, requests_per_minute, threads
    ("fixed 8, 4 threads (nobody waits)", 8, 0, 4),
    ("fixed 8, 4 threads, requests_per_minute 600000", 8, 600_000, 4),
    ("fixed 2, 8 threads (threads wait)", 2, 0, 8),
    ("auto, 4 threads (limit 4 at the start)", "auto", 0, 4),
)


def measure(url: str, max_concurrency: int | str, rpm: int, threads: int, calls: int) -> dict[str, float]:
    """Commands per call by name, for ``calls`` slots taken and released by ``threads`` threads."""
    import redis

    from tests.support.budget_cost import commands_per_call
    from worker.budget import FleetBudget

    endpoint = f"openai|http://cost-{uuid.uuid4().hex[:8]}/v1|m"
    budget = FleetBudget(redis.Redis.from_url(url), url, endpoint_key=endpoint, max_concurrency=max_concurrency,
                         requests_per_minute=rpm, lease_seconds=30)
    return commands_per_call(redis_client(url), budget, calls, threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=400)
    a = ap.parse_args()
    banner("budget cost", calls=a.calls)
    with redis_server() as url:
        for label, mc, rpm, threads in CASES:
            st = measure(url, mc, rpm, threads, a.calls)
            # CONFIG RESETSTAT (in measure) zeroed the reads too: one per request or pipeline,
            # less the two INFOs that read the figures.
            trips = (int(redis_client(url).info("stats")["total_reads_processed"]) - 2) / a.calls
            scripts = st.get("evalsha", 0)
            shown = ", ".join(f"{k.upper()} {v:.2f}" for k, v in sorted(st.items(), key=lambda kv: -kv[1]))
            print(f"{label}: {sum(st.values()):.2f} commands per call ({trips:.2f} round trips, {scripts:.2f} "
                  f"scripts): {shown}")


if __name__ == "__main__":
    main()
