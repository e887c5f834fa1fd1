"""The fleet budget on a real Redis: concurrent slots, lease expiry, calls per minute, stats.

Several ``FleetBudget`` objects with their own connections stand in for worker processes on
different hosts: they share nothing but Redis and the endpoint key.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis

from tests.support.fleet import wait_until
from worker.budget import FleetBudget, budget_stats


@pytest.fixture
def endpoint() -> str:
    # A fresh endpoint per test: threads a test leaves waiting cannot touch another test's budget.
    return f"openai|http://test-{uuid.uuid4().hex[:8]}/v1|fake-vl"


def make(redis_url: str, endpoint: str, *, max_concurrency: int = 3, rpm: int = 0,
         lease_seconds: float = 30.0) -> FleetBudget:
    return FleetBudget(redis.Redis.from_url(redis_url), redis_url, endpoint_key=endpoint,
                       max_concurrency=max_concurrency, requests_per_minute=rpm, lease_seconds=lease_seconds)


def test_many_threads_on_many_hosts_never_exceed_max_concurrency(redis_client, redis_url, endpoint):
    budgets = [make(redis_url, endpoint, max_concurrency=3) for _ in range(3)]  # three "hosts"
    lock = threading.Lock()
    holders = peak = calls = 0
    samples: list[int] = []

    def call(budget: FleetBudget) -> None:
        nonlocal holders, peak, calls
        for _ in range(4):
            with budget.slot():
                with lock:
                    holders += 1
                    peak = max(peak, holders)
                samples.append(budget_stats(redis_client, endpoint)["in_flight"])
                time.sleep(0.02)  # the "VLM call": hold the slot a moment
                with lock:
                    holders -= 1
                    calls += 1

    threads = [threading.Thread(target=call, args=(budgets[i % 3],)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a thread never got a slot"
    assert calls == 48
    assert peak == 3, f"at most 3 holders at once, and the limit is reached (peak {peak})"
    assert max(samples) <= 3
    assert budget_stats(redis_client, endpoint)["in_flight"] == 0


def test_two_endpoints_do_not_share_a_budget(redis_client, redis_url, endpoint):
    a = make(redis_url, endpoint, max_concurrency=1)
    b = make(redis_url, endpoint + "-other", max_concurrency=1)
    with a.slot():
        got = threading.Event()

        def other() -> None:
            with b.slot():
                got.set()

        t = threading.Thread(target=other, daemon=True)
        t.start()
        assert got.wait(5), "a full budget on one endpoint blocked another endpoint"
        t.join(5)


def test_a_killed_holders_lease_expires_and_frees_its_slot(redis_client, redis_url, endpoint):
    dead = make(redis_url, endpoint, max_concurrency=1, lease_seconds=1.5)
    held = dead.slot()
    held.__enter__()  # acquired, and its process "dies": never released
    assert budget_stats(redis_client, endpoint)["in_flight"] == 1

    alive = make(redis_url, endpoint, max_concurrency=1, lease_seconds=30)
    acquired_after: list[float] = []
    start = time.monotonic()

    def take() -> None:
        with alive.slot():
            acquired_after.append(time.monotonic() - start)

    t = threading.Thread(target=take, daemon=True)
    t.start()
    t.join(timeout=10)
    assert acquired_after, "the dead holder's lease never expired"
    assert 1.0 <= acquired_after[0] < 6.0, f"the slot was taken {acquired_after[0]:.2f}s after the holder died"
    wait_until(lambda: budget_stats(redis_client, endpoint)["in_flight"] == 0, 5, "the expired lease to be gone")
    del held  # keep the generator (and its release) alive until here


def test_requests_per_minute_limits_a_burst_across_hosts(redis_client, redis_url, endpoint):
    rpm = 5
    budgets = [make(redis_url, endpoint, max_concurrency=50, rpm=rpm) for _ in range(2)]
    done: list[float] = []
    lock = threading.Lock()

    def call(budget: FleetBudget) -> None:
        with budget.slot(), lock:
            done.append(time.monotonic())

    # Twice the per-minute allowance, at once, from two "hosts"; the extra ones wait for the window.
    threads = [threading.Thread(target=call, args=(budgets[i % 2],), daemon=True) for i in range(2 * rpm)]
    for t in threads:
        t.start()
    wait_until(lambda: len(done) >= rpm, 10, f"{rpm} calls to get through")
    # The rest must still be waiting a moment later (bounded wait for a negative).
    still_waiting = [t for t in threads if t.is_alive()]
    for t in still_waiting:
        t.join(timeout=1.5 / len(still_waiting))
    assert len(done) == rpm, f"{len(done)} calls in the burst; the limit is {rpm} per minute"
    st = budget_stats(redis_client, endpoint)
    assert st["calls_last_minute"] + st["calls_this_minute"] == rpm
    # A fresh window (its counters gone) lets the waiting ones through: none is left behind.
    for key in redis_client.scan_iter(match=f"*{budgets[0].endpoint}*"):
        if b"LIMITS" in key:
            redis_client.delete(key)
    for t in threads:
        t.join(timeout=15)
    assert len(done) == 2 * rpm, "waiting calls did not go through once the window had room"


def test_budget_stats_report_in_flight_calls_and_429s(redis_client, redis_url, endpoint):
    budget = make(redis_url, endpoint, max_concurrency=4)
    zero = budget_stats(redis_client, endpoint)
    assert zero == {"in_flight": 0, "calls_last_minute": 0, "calls_this_minute": 0,
                    "rate_limited_last_minute": 0, "rate_limited_this_minute": 0,
                    "calls_per_minute": 0, "rate_limited_per_minute": 0}
    first, second = budget.slot(), budget.slot()
    first.__enter__()
    second.__enter__()
    st = budget_stats(redis_client, endpoint)
    assert st["in_flight"] == 2
    assert st["calls_last_minute"] + st["calls_this_minute"] == 2
    assert st["calls_per_minute"] == 2  # both within the last 60 s
    budget.note_rate_limited()
    first.__exit__(None, None, None)
    st = budget_stats(redis_client, endpoint)
    assert st["in_flight"] == 1
    assert st["rate_limited_last_minute"] + st["rate_limited_this_minute"] == 1
    second.__exit__(None, None, None)
    assert budget_stats(redis_client, endpoint)["in_flight"] == 0
    # Stats are per endpoint.
    assert budget_stats(redis_client, endpoint + "-other")["calls_this_minute"] == 0


def test_a_release_wakes_a_waiting_thread_without_waiting_for_the_poll(redis_url, endpoint):
    # With a 60 s poll, the waiter can only get the slot within the test's bound if the release
    # wakes it.
    holder = make(redis_url, endpoint, max_concurrency=1)
    waiter = FleetBudget(redis.Redis.from_url(redis_url), redis_url, endpoint_key=endpoint, max_concurrency=1,
                         requests_per_minute=0, lease_seconds=30, wait_poll=60)
    got = threading.Event()

    def take() -> None:
        with waiter.slot():
            got.set()

    with holder.slot():
        t = threading.Thread(target=take, daemon=True)
        t.start()
        assert not got.wait(0.5), "the waiter got a slot while the only one was held"
    assert got.wait(10), "the release did not wake the waiting thread"
    t.join(5)


def test_releases_nobody_waits_for_leave_no_wake_tokens(redis_client, redis_url, endpoint):
    # A waiter registers in the script that refuses it, so a release knows nobody waits and
    # pushes nothing (a wake list also never holds more than max_concurrency tokens).
    from worker.budget import LEVELS
    from worker.keys import budget_key

    budget = make(redis_url, endpoint, max_concurrency=3)
    for step in ("", "double_check", "grounding_expr") * 4:
        with budget.slot(step):
            pass
    assert [redis_client.llen(budget_key(budget.endpoint, "wake", p)) for p in LEVELS] == [0] * len(LEVELS)
    st = budget_stats(redis_client, endpoint)
    assert st["calls_this_minute"] + st["calls_last_minute"] == 12  # counted in the acquire script


def test_a_waiting_later_step_call_gets_the_next_free_slot_before_a_waiting_head_call(
        redis_client, redis_url, endpoint):
    """Depth-first holds in the budget too: with every slot taken, a step-3 call that started
    waiting after a head-step call still gets the next free slot, and the head call the one after."""
    from worker.keys import budget_key
    from worker.stepdefs import STEP

    holder, head, last = (make(redis_url, endpoint, max_concurrency=1) for _ in range(3))
    held = holder.slot()
    held.__enter__()
    order: list[str] = []
    release_last = threading.Event()

    def call(budget: FleetBudget, step: str) -> None:
        with budget.slot(step):
            order.append(step)
            if step == STEP[3].name:
                release_last.wait(10)  # hold the slot until the test has seen who got it

    def waiting(priority: int) -> int:
        return redis_client.zcard(budget_key(holder.endpoint, "waiters", priority))

    t_head = threading.Thread(target=call, args=(head, STEP[0].name), daemon=True)
    t_head.start()
    wait_until(lambda: waiting(STEP[0].priority) == 1, 5, "the head call to wait")
    t_last = threading.Thread(target=call, args=(last, STEP[3].name), daemon=True)
    t_last.start()
    wait_until(lambda: waiting(STEP[3].priority) == 1, 5, "the step-3 call to wait")

    held.__exit__(None, None, None)
    wait_until(lambda: order, 5, "a waiting call to get the freed slot")
    assert order == [STEP[3].name], f"the freed slot went to {order}, not to the waiting step-3 call"
    release_last.set()
    t_last.join(5)
    t_head.join(5)
    assert order == [STEP[3].name, STEP[0].name], "the head call did not get the slot after the step-3 call"
    assert waiting(STEP[0].priority) == waiting(STEP[3].priority) == 0, "a served waiter left its entry behind"
