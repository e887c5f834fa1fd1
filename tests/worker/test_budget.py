"""The fleet budget on a real Redis: concurrent slots, lease expiry, calls per minute, stats.

Several ``FleetBudget`` objects with their own connections stand in for worker processes on
different hosts: they share nothing but Redis and the endpoint key.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

import pytest
import redis

from producer.embedded import embedded_redis
from tests.support.budget_cost import commands_per_call
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


def hammer(budgets: list[FleetBudget], threads: int, *, hold: float,
           while_held: Callable[[], None] = lambda: None) -> tuple[int, int]:
    """``threads`` threads (spread over ``budgets``, the "hosts") each make 4 calls holding a slot
    ``hold`` s (``while_held`` runs in it); returns (calls made, most slots held at once)."""
    lock = threading.Lock()
    holders = peak = calls = 0

    def call(budget: FleetBudget) -> None:
        nonlocal holders, peak, calls
        for _ in range(4):
            with budget.slot():
                with lock:
                    holders += 1
                    peak = max(peak, holders)
                while_held()
                time.sleep(hold)  # the "VLM call": hold the slot a moment
                with lock:
                    holders -= 1
                    calls += 1

    workers = [threading.Thread(target=call, args=(budgets[i % len(budgets)],)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in workers), "a thread never got a slot"
    return calls, peak


def test_many_threads_on_many_hosts_never_exceed_max_concurrency(redis_client, redis_url, endpoint):
    budgets = [make(redis_url, endpoint, max_concurrency=3) for _ in range(3)]  # three "hosts"
    samples: list[int] = []
    calls, peak = hammer(budgets, 12, hold=0.02,
                         while_held=lambda: samples.append(budget_stats(redis_client, endpoint)["in_flight"]))
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


def test_requests_per_minute_spaces_a_burst_across_hosts(redis_client, redis_url, endpoint):
    """The rate is GCRA in the acquire script: calls leave 60 / rpm seconds apart (so no 60 s
    window holds more than rpm), each caller sleeping until the turn it was given."""
    rpm = 30  # a turn every 2 s
    budgets = [make(redis_url, endpoint, max_concurrency=50, rpm=rpm) for _ in range(2)]
    done: list[float] = []
    lock = threading.Lock()

    def call(budget: FleetBudget) -> None:
        with budget.slot(), lock:
            done.append(time.monotonic())

    # Four calls at once from two "hosts": one goes now, the others wait for their turns.
    threads = [threading.Thread(target=call, args=(budgets[i % 2],), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    wait_until(lambda: len(done) >= 1, 10, "the first call to get through")
    # The rest must still be waiting a moment later (bounded wait for a negative).
    threads[0].join(timeout=1.0)
    assert len(done) == 1, f"{len(done)} calls within a second; the rate is one per 2 s"
    for t in threads:
        t.join(timeout=20)
    assert len(done) == 4, "waiting calls did not go through at their turns"
    # Each process adds its calls to the minute's counter with a later acquire, or, making no
    # more calls, after about two seconds by itself.
    wait_until(lambda: _calls_counted(redis_client, endpoint) == 4, 5, "the 4 calls to be counted")


def _calls_counted(redis_client: redis.Redis, endpoint: str) -> int:
    st = budget_stats(redis_client, endpoint)
    return st["calls_last_minute"] + st["calls_this_minute"]


def test_turns_kept_while_waiting_for_a_slot_do_not_leave_together(redis_client, redis_url, endpoint):
    """Calls that wait for a slot under a rate leave a turn apart once one frees. A turn kept
    across the wait (given before the slot was found taken) has passed by then: every call
    that waited so would leave at once (a fleet's worth of calls in a moment, beyond the rate
    in that window). A turn is given only with a free slot, and one not used when it came is
    void: the call takes a new one."""
    budget = make(redis_url, endpoint, max_concurrency=1, rpm=60)  # a turn every second
    done: list[float] = []
    lock = threading.Lock()
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with budget.slot():
            holding.set()
            release.wait(30)

    def call() -> None:
        with budget.slot(), lock:
            done.append(time.monotonic())

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert holding.wait(10)
    callers = [threading.Thread(target=call, daemon=True) for _ in range(3)]
    for t in callers:
        t.start()
    # Every caller waits for the slot, and any turn given before it has passed.
    wait_until(lambda: _turns_passed(redis_client, budget), 20, "the callers' turns to pass")
    release.set()
    wait_until(lambda: len(done) >= 1, 10, "the first waiting call to get through")
    callers[0].join(timeout=0.5)  # bounded wait for a negative: the others are a turn apart
    assert len(done) == 1, f"{len(done)} calls within half a second of the slot freeing; the rate is one a second"
    for t in callers:
        t.join(timeout=20)
    assert len(done) == 3


def _turns_passed(redis_client: redis.Redis, budget: FleetBudget) -> bool:
    """Whether the last turn given under the rate is in the past (server time)."""
    from worker.keys import budget_key

    tat = float(redis_client.hget(budget_key(budget.endpoint, "ctl"), "tat") or 0)
    secs, micros = redis_client.time()
    return tat > 0 and tat - 1.0 < secs + micros / 1e6 and _waiting(redis_client, budget) == 3


def _waiting(redis_client: redis.Redis, budget: FleetBudget) -> int:
    return sum(redis_client.zcard(k) for k in budget._waiters)


@pytest.mark.parametrize("added_by", ["acquire", "flush"])
def test_a_fixed_rates_turn_outlives_a_long_run(redis_client, redis_url, endpoint, added_by):
    """The rate's next turn (``tat`` in the state hash) is the only record of the turns already
    given: were the hash to expire while calls are made, the next caller would get a turn at
    once beside the ones given up to the horizon ahead. Under a fixed rate no controller
    writes the hash, so the add that makes a new minute's call counter renews its TTL, not only
    the script that makes the hash: whether an acquire adds the calls or the process does by
    itself (it made no more calls, or it shuts down)."""
    from worker.budget import _stats_key
    from worker.keys import budget_key

    budget = FleetBudget(redis.Redis.from_url(redis_url), redis_url, endpoint_key=endpoint, max_concurrency=5,
                         requests_per_minute=600_000, lease_seconds=30, count_interval=3600)
    with budget.slot():
        pass
    budget.flush_counts()
    state = budget_key(budget.endpoint, "ctl")
    assert redis_client.hexists(state, "tat")
    redis_client.expire(state, 100)  # a day of calls later: the TTL set when the hash was made is running out
    redis_client.delete(_stats_key(budget.endpoint, "calls"))  # a new minute begins
    with budget.slot():
        pass
    assert redis_client.ttl(state) <= 100, "the call is not added yet: no add, no renewal"
    if added_by == "acquire":
        budget.count_interval = 0.0  # the next acquire adds the call above (and its own)
        with budget.slot():
            pass
        added = 2
    else:
        budget.flush_counts()
        added = 1
    assert redis_client.ttl(state) > 100
    assert int(redis_client.get(_stats_key(budget.endpoint, "calls"))) == added


def test_budget_stats_report_in_flight_calls_and_429s(redis_client, redis_url, endpoint):
    budget = make(redis_url, endpoint, max_concurrency=4)
    zero = budget_stats(redis_client, endpoint)
    assert zero == {"in_flight": 0, "calls_last_minute": 0, "calls_this_minute": 0,
                    "rate_limited_last_minute": 0, "rate_limited_this_minute": 0,
                    "calls_per_minute": 0, "rate_limited_per_minute": 0}
    first, second = budget.slot(), budget.slot()
    first.__enter__()
    second.__enter__()
    budget.flush_counts()  # what a clean shutdown does, or the process itself a second or two later
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
    budget.flush_counts()
    assert _calls_counted(redis_client, endpoint) == 12


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


def test_the_scripts_stay_lean(endpoint):
    """Issue 16 counts every command inside the scripts. Per call, with 4 threads under a limit of
    8: ZCOUNT (live leases), EXISTS (waiters?), ZADD in the acquire script; ZREM, EXISTS in the
    release, a plain pipeline (it was a script: one EVALSHA more per call); the leases' EXPIRE
    only when the fleet was idle or a minute begins (it was 9.0, with a ZREMRANGEBYSCORE + ZCARD
    and an EXPIRE on every call). No TIME (the process passes its estimate of Redis's time) and
    no INCR (calls are added to the minute's counter about once a second per process: the 200
    calls here take less than that). A fixed rate adds HMGET + HSET in the same script (it was a
    second round trip of GET, GET, PTTL, PTTL, PTTL, INCRBY, EXPIRE).

    On a private server: INFO commandstats and CONFIG RESETSTAT are server-wide, and the suite's
    other test worker may be using another database of the shared one."""
    with embedded_redis() as redis_url:
        _scripts_stay_lean(redis.Redis.from_url(redis_url), redis_url, endpoint)


def _scripts_stay_lean(redis_client: redis.Redis, redis_url: str, endpoint: str) -> None:
    plain = commands_per_call(redis_client, make(redis_url, endpoint, max_concurrency=8), 200, 4)
    inner = sum(v for k, v in plain.items() if k != "evalsha")
    assert plain["evalsha"] == pytest.approx(1, abs=0.05) and inner <= 5.6, plain
    assert plain.get("zremrangebyscore", 0) < 0.1 and plain.get("zcard", 0) == 0, plain
    assert "time" not in plain and "incr" not in plain and plain.get("incrby", 0) < 0.02, plain
    rated = commands_per_call(redis_client, make(redis_url, endpoint + "-rpm", max_concurrency=8, rpm=600_000),
                              200, 4)
    inner = sum(v for k, v in rated.items() if k != "evalsha")
    assert rated["evalsha"] == pytest.approx(1, abs=0.05) and inner <= 7.6, rated
    assert "time" not in rated and "incr" not in rated and rated.get("incrby", 0) < 0.02, rated


def test_the_rate_the_controller_learned_spaces_calls_fleet_wide(redis_client, redis_url, endpoint):
    """Under ``auto`` the acquire script keeps to the state's ``rate_limit`` (calls/s) too."""
    from worker.keys import budget_key

    budgets = [FleetBudget(redis.Redis.from_url(redis_url), redis_url, endpoint_key=endpoint, max_concurrency="auto",
                           requests_per_minute=0, lease_seconds=30) for _ in range(2)]
    redis_client.hset(budget_key(budgets[0].endpoint, "ctl"),
                      mapping={"limit": 10, "next": time.time() + 3600, "rate_limit": 0.5})
    done: list[float] = []

    def call(budget: FleetBudget) -> None:
        with budget.slot():
            done.append(time.monotonic())

    threads = [threading.Thread(target=call, args=(budgets[i % 2],), daemon=True) for i in range(3)]
    for t in threads:
        t.start()
    wait_until(lambda: len(done) >= 1, 10, "the first call to get through")
    threads[0].join(timeout=1.0)
    assert len(done) == 1, f"{len(done)} calls within a second at a learned rate of one per 2 s"
    for t in threads:
        t.join(timeout=15)
    assert len(done) == 3


def test_the_acquire_takes_redis_time_from_the_process_and_reads_time_without_an_estimate(endpoint):
    """The acquire script takes Redis's time from the process's estimate (no TIME per call: the
    estimate costs one TIME a process every 30 s); with no estimate (every reading too slow to
    trust) it reads TIME itself, and the budget works the same. On a private server: INFO
    commandstats is server-wide."""
    from worker.clock import RedisClock

    with embedded_redis() as redis_url:
        client = redis.Redis.from_url(redis_url)
        estimated = commands_per_call(client, make(redis_url, endpoint, max_concurrency=8), 100, 4)
        assert "time" not in estimated, estimated
        blind = make(redis_url, endpoint + "-blind", max_concurrency=8)
        blind.clock = RedisClock(client.time, max_error=0.0)  # no reading is ever good enough
        assert blind.clock.now() is None
        read = commands_per_call(client, blind, 100, 4)
        assert read["time"] >= 1.0 and read["zadd"] == 1.0, read
        assert budget_stats(client, endpoint + "-blind")["in_flight"] == 0


def test_a_host_clock_an_hour_off_scores_leases_by_redis_time(redis_client, redis_url, endpoint, monkeypatch):
    """The time the process passes is Redis's, measured against the monotonic clock: a host whose
    wall clock is an hour ahead (or is stepped by an hour mid-run) takes leases that expire a lease
    from now by Redis's clock, which every other host counts as in flight."""
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600.0)
    ahead = make(redis_url, endpoint, max_concurrency=2, lease_seconds=30)
    with ahead.slot():
        secs, micros = redis_client.time()
        (score,) = [s for _, s in redis_client.zrange(f"refexp:ep:{ahead.endpoint}:leases", 0, -1, withscores=True)]
        assert score == pytest.approx(secs + micros / 1e6 + 30, abs=2.0)
        assert budget_stats(redis_client, endpoint)["in_flight"] == 1  # counted by Redis's TIME
    assert budget_stats(redis_client, endpoint)["in_flight"] == 0


def test_calls_are_counted_at_a_clean_shutdown(redis_client, redis_url, endpoint):
    """A process adds its calls to the minute's counter about once a second; the calls of its last
    second are added when the worker shuts down cleanly (Celery's worker_shutdown signal, sent
    once a warm shutdown's tasks have finished), so ``producer status`` shows every call."""
    from celery.signals import worker_shutdown

    import worker.app  # noqa: F401 - connects the shutdown hook, as a worker process has

    budgets = [FleetBudget(redis.Redis.from_url(redis_url), redis_url, endpoint_key=endpoint, max_concurrency=4,
                           requests_per_minute=0, lease_seconds=30, count_interval=3600) for _ in range(2)]
    for i in range(5):
        with budgets[i % 2].slot():
            pass
    assert _calls_counted(redis_client, endpoint) == 0, "counted per call: the per-call INCR is back"
    worker_shutdown.send(sender=None)
    st = budget_stats(redis_client, endpoint)
    assert st["calls_last_minute"] + st["calls_this_minute"] == 5 and st["calls_per_minute"] >= 1, st


def test_an_estimate_of_redis_time_seconds_off_keeps_the_limit(redis_client, redis_url, endpoint):
    """An estimate can be wrong only by a step of Redis's own clock since the last reading (the
    host's wall clock plays no part), until the next reading (30 s). Seconds off are harmless
    too: leases last the call's timeout plus 30 s, so a process ahead by 2 s still counts every
    live lease, and one behind by 2 s leases 2 s shorter (by Redis's clock) than it thinks."""
    from worker.clock import RedisClock

    def off_by(seconds: float):
        def redis_time() -> tuple[int, int]:
            secs, micros = redis_client.time()
            t = secs + micros / 1e6 + seconds
            return int(t), int((t % 1) * 1e6)
        return redis_time

    budgets = []
    for seconds in (2.0, -2.0, 0.0):
        b = make(redis_url, endpoint, max_concurrency=2)
        b.clock = RedisClock(off_by(seconds))
        budgets.append(b)
    calls, peak = hammer(budgets, 9, hold=0.01)
    assert calls == 36 and peak == 2, (calls, peak)
    for b in budgets:
        b.flush_counts()
    assert _calls_counted(redis_client, endpoint) == 36
    assert budget_stats(redis_client, endpoint)["in_flight"] == 0
