"""Redis commands the fleet budget costs per call, counted by Redis itself.

Shared by ``tests/worker/test_budget.py`` (the scripts stay lean) and ``bench/budget_cost.py``
(the figures): ``INFO commandstats`` counts the commands a Lua script runs inside it too, which
is what one Redis has to serve (issue 16 counts every command).
"""

from __future__ import annotations

import threading

import redis

from worker.budget import FleetBudget


def commands_per_call(redis_client: redis.Redis, budget: FleetBudget, calls: int, threads: int) -> dict[str, float]:
    """Every command Redis ran for ``calls`` slots taken and released by ``threads`` threads, by
    name, per call. Resets the server's command statistics: use a server of its own."""
    with budget.slot():
        pass  # the scripts are loaded
    redis_client.config_resetstat()

    def work() -> None:
        for _ in range(calls // threads):
            with budget.slot():
                pass

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(60)
    stats = {k.removeprefix("cmdstat_"): v["calls"] / calls for k, v in redis_client.info("commandstats").items()}
    return {k: v for k, v in stats.items() if not k.startswith(("config", "info", "hello", "client"))}
