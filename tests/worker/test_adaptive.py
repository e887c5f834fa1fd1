"""The ``auto`` controller: its rule on samples (pure), and its fleet side on a real Redis.

Several ``FleetBudget`` objects with their own connections stand in for worker processes.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis

from tests.support.fleet import wait_until
from worker import adaptive
from worker.adaptive import Sample, State, decide
from worker.budget import FleetBudget, budget_stats, controller_state
from worker.errors import RateLimited, TimedOut
from worker.keys import budget_key


def sample(n: int, latency: float, step: str = "s", **kw) -> Sample:
    return Sample(steps={step: [n, n * latency]}, **kw)


# ----------------------------------------------------------------------------- the rule

def test_slow_start_doubles_while_latency_is_at_its_floor_and_the_limit_in_use():
    st = State(limit=4, floors={"s": 1.0})
    new, changed = decide(st, sample(4, 1.0), now=10, interval=1.0, ceiling=256)
    assert changed and new.limit == 8 and new.slow_start and "slow start" in new.reason
    assert new.settle_until >= 12  # no decision on latency before the new limit's calls are back


def test_nothing_grows_while_the_limit_is_not_in_use():
    st = State(limit=32, floors={"s": 1.0})
    new, changed = decide(st, sample(10, 1.0), now=10, interval=1.0, ceiling=256)
    assert not changed and new.limit == 32


def test_queueing_cuts_to_the_concurrency_that_sees_the_floor_plus_headroom():
    # 64 in flight on a server with 32 slots: latency 2x its floor, throughput 32/s.
    st = State(limit=64, floors={"s": 1.0}, slow_start=True)
    new, changed = decide(st, sample(32, 2.0), now=10, interval=1.0, ceiling=256)
    assert changed and new.limit == 38  # the floor's concurrency + alpha (6.4), in whole calls
    assert not new.slow_start and "2.00x" in new.reason and "~32 calls queued" in new.reason


def test_a_cut_on_few_answers_scales_the_limit_in_use_and_at_most_halves_it():
    # 16 in flight on 8 slots answer in one batch: an interval may hold only a few of them.
    st = State(limit=16, floors={"s": 1.0})
    new, changed = decide(st, sample(3, 2.0, waited=20), now=10, interval=1.0, ceiling=256)
    assert changed and new.limit == pytest.approx(16 / 2.0 + 2, rel=0.01)
    new, _ = decide(st, sample(3, 5.0, waited=20), now=10, interval=1.0, ceiling=256)
    assert new.limit == 8


def test_a_small_limit_grows_when_calls_wait_for_it_once_enough_answers_are_in():
    # One answer an interval: its latency alone is noise, so the rule waits for three.
    st = State(limit=1, floors={"s": 1.0}, slow_start=False)
    for t in (10, 11):
        st, changed = decide(st, sample(1, 1.0, waited=5), now=t, interval=1.0, ceiling=256)
        assert not changed and st.limit == 1
    new, changed = decide(st, sample(1, 1.0, waited=5), now=12, interval=1.0, ceiling=256)
    assert changed and new.limit == 2


def test_a_small_limit_holds_one_call_queued_and_moves_by_whole_calls():
    # K = 4: 4 in flight see the floor (grow by one), 5 see 1.25x (one queued: hold), 6 see
    # 1.5x (two queued: back to 5). The old band (2 to 3 queued) swung between 6 and 8.
    st = State(limit=4, floors={"s": 1.0}, slow_start=False)
    new, _ = decide(st, sample(4, 1.0, waited=3), now=10, interval=1.0, ceiling=256)
    assert new.limit == 5
    new, changed = decide(State(limit=5, floors={"s": 1.0}, slow_start=False), sample(4, 1.25, waited=3),
                          now=10, interval=1.0, ceiling=256)
    assert not changed and new.limit == 5
    new, _ = decide(State(limit=6, floors={"s": 1.0}, slow_start=False), sample(4, 1.5, waited=3),
                    now=10, interval=1.0, ceiling=256)
    assert new.limit == 5


def test_no_second_cut_before_the_first_one_settled():
    st = State(limit=35, floors={"s": 1.0}, slow_start=False, settle_until=12)
    new, changed = decide(st, sample(32, 2.0), now=11, interval=1.0, ceiling=256)
    assert not changed and new.limit == 35


def test_429s_and_timeouts_cut_multiplicatively_and_retry_after_pauses_the_fleet():
    st = State(limit=20, floors={"s": 1.0}, slow_start=False)
    new, changed = decide(st, sample(20, 1.0, r429=3, retry_after=7), now=100, interval=1.0, ceiling=256)
    # A 429 cuts to the concurrency the accepted rate allows (little accepted yet), at most halving.
    assert changed and new.limit == pytest.approx(10) and "3 429" in new.reason and "Retry-After 7" in new.reason
    assert new.pause_until == 107
    warm = State(limit=20, floors={"s": 1.0}, slow_start=False, rate=12.0)
    new, _ = decide(warm, sample(12, 1.0, r429=1), now=100, interval=1.0, ceiling=256)
    assert new.limit == 11 and new.refused_limit == pytest.approx(0.9 * 12, rel=0.01)
    new, _ = decide(State(limit=20, floors={"s": 1.0}), Sample(timeouts=2), now=1, interval=1, ceiling=256)
    assert new.limit == pytest.approx(14) and new.reason == "2 timeouts" and not new.slow_start
    new, _ = decide(State(limit=1.2), Sample(timeouts=1), now=1, interval=1, ceiling=256)
    assert new.limit == 1.0


def test_after_a_429_the_limit_creeps_back_below_the_level_refused_for_a_minute():
    st = State(limit=30, floors={"s": 1.0}, slow_start=False, rate=30.0)
    st, _ = decide(st, sample(30, 1.0, r429=2), now=100, interval=1, ceiling=256)
    assert st.limit == pytest.approx(21) and st.refused_limit == pytest.approx(27)
    limits = []
    for t in range(102, 140, 2):
        st, _ = decide(st, sample(int(st.limit), 1.0, waited=5), now=t, interval=1, ceiling=256)
        limits.append(st.limit)
    assert limits[0] == pytest.approx(22) and max(limits) == pytest.approx(27), limits
    st, _ = decide(st, sample(int(st.limit), 1.0, waited=5), now=170, interval=1, ceiling=256)
    assert st.limit > 27 + 1  # a minute on, the quota is probed again at the usual pace


def test_the_limit_stays_within_the_ceiling():
    new, _ = decide(State(limit=100, floors={"s": 1.0}), sample(100, 1.0), now=1, interval=1, ceiling=120)
    assert new.limit == 120


def test_a_ceiling_below_the_limit_brings_it_down_at_the_next_update():
    new, changed = decide(State(limit=4), Sample(), now=1, interval=1, ceiling=2)
    assert changed and new.limit == 2 and "ceiling" in new.reason


def test_floors_are_per_step_and_drift_up_slowly():
    st = State(limit=10, floors={"a": 1.0, "b": 4.0})
    # Both steps at their own floors: no queueing, though b's calls are 4x slower than a's.
    new, _ = decide(st, Sample(steps={"a": [5, 5.0], "b": [2, 8.0]}), now=1, interval=1, ceiling=256)
    assert new.floors["a"] == 1.0 and new.floors["b"] == 4.0 and new.limit >= 10
    new, _ = decide(st, sample(5, 2.0, step="a"), now=1, interval=1, ceiling=256)
    assert 1.0 < new.floors["a"] < 1.01
    new, _ = decide(st, sample(5, 0.5, step="a"), now=1, interval=1, ceiling=256)
    assert new.floors["a"] == 0.5


def test_on_a_simulated_batch_server_the_limit_settles_near_capacity_and_follows_a_halving():
    """The rule against the fake's model (latency = floor x max(1, n / K)), one update per second."""
    st, k = State(), 64

    def run(seconds: int, t0: int) -> list[float]:
        nonlocal st
        limits = []
        for t in range(t0, t0 + seconds):
            n = int(st.limit)
            latency = max(1.0, n / k)
            st, _ = decide(st, sample(round(n / latency), latency), now=t, interval=1.0, ceiling=256)
            limits.append(st.limit)
        return limits

    limits = run(40, 0)
    assert all(64 <= x <= 90 for x in limits[-10:]), limits
    k = 32
    limits = run(30, 40)
    assert all(32 <= x <= 50 for x in limits[-10:]), limits
    k = 4  # small: it settles one call above K (once the calls of its cuts are back)
    limits = run(40, 70)
    assert all(x == 5 for x in limits[-20:]), limits


# ----------------------------------------------------------------------------- the request rate

def test_a_stated_quota_becomes_the_rate_limit_at_once():
    new, _ = decide(State(limit=8, floors={"s": 1.0}), sample(8, 1.0, sent=8, stated=10.0), now=5,
                    interval=1, ceiling=256)
    assert new.rate_limit == pytest.approx(9.5) and new.rate_source == "stated"
    assert "600 requests/min" in new.rate_reason and new.rate_changed_at == 5
    same, _ = decide(new, sample(8, 1.0, sent=8, stated=10.0), now=6, interval=1, ceiling=256)
    assert same.rate_changed_at == 5  # the same statement changes nothing
    assert "tat" not in same.to_redis()  # the acquire script owns the turns once the rate is set


def test_calls_sent_before_the_quota_was_stated_count_against_it():
    # 19 calls left in the first second, before the first answer stated 600 a minute: the first
    # turn under the rate (9.5/s) comes when those 19 would have been spaced out, 2 s after them.
    st, _ = decide(State(limit=4), Sample(sent=19), now=100, interval=1, ceiling=256)
    new, _ = decide(st, sample(4, 1.0, stated=10.0), now=100.5, interval=1, ceiling=256)
    assert float(new.to_redis()["tat"]) == pytest.approx(102)


def test_the_first_429_learns_the_rate_the_endpoint_accepted_over_the_last_minute():
    # 600 calls went through in 6 s (slow start), then a 429: the quota is 600 a minute.
    st = State(limit=64, floors={"s": 1.0})
    for t in range(6):
        st, _ = decide(st, sample(100, 1.0, sent=100), now=t, interval=1, ceiling=256)
    assert st.rate_limit == 0
    st, _ = decide(st, sample(50, 1.0, sent=20, r429=20, retry_after=54), now=6, interval=1, ceiling=256)
    assert st.rate_limit == pytest.approx(0.9 * 600 / 60) and st.rate_source == "learned"
    assert "20 429 after 600 calls accepted" in st.rate_reason and st.pause_until == 60
    stated, _ = decide(State(limit=64, accepted=[[1, 100]]), sample(50, 1.0, sent=20, r429=20, stated=10.0),
                       now=6, interval=1, ceiling=256)
    assert stated.rate_limit == pytest.approx(9.5) and stated.rate_source == "stated"  # a 429 that says it
    # 429s of calls sent before it, within the settle time, do not lower it again.
    again, _ = decide(st, sample(0, 1.0, r429=5), now=8, interval=1, ceiling=256)
    assert again.rate_limit == st.rate_limit


def test_a_learned_rate_is_probed_upwards_after_a_quiet_spell_in_use():
    st = State(limit=16, floors={"s": 1.0}, rate_limit=9.0, rate_source="learned", rate_changed_at=0,
               refused_at=0)
    new, _ = decide(st, sample(9, 1.0, sent=9), now=50, interval=1, ceiling=256)
    assert new.rate_limit == 9.0  # not yet
    new, _ = decide(st, sample(2, 1.0, sent=2), now=200, interval=1, ceiling=256)
    assert new.rate_limit == 9.0  # not in use: nothing to learn by raising it
    new, _ = decide(st, sample(9, 1.0, sent=9), now=200, interval=1, ceiling=256)
    assert new.rate_limit == pytest.approx(9.9) and "probing" in new.rate_reason


# ----------------------------------------------------------------------------- the fleet side

@pytest.fixture
def endpoint() -> str:
    return f"openai|http://adaptive-{uuid.uuid4().hex[:8]}/v1|fake-vl"


def make(redis_url: str, endpoint: str, **kw) -> FleetBudget:
    kw.setdefault("max_concurrency", "auto")
    return FleetBudget(redis.Redis.from_url(redis_url), redis_url, endpoint_key=endpoint,
                       requests_per_minute=0, lease_seconds=kw.pop("lease_seconds", 30.0), **kw)


def set_limit(r: redis.Redis, budget: FleetBudget, limit: float) -> None:
    r.hset(budget_key(budget.endpoint, "ctl"), mapping={"limit": limit, "next": time.time() + 3600})


def test_auto_takes_the_limit_from_the_controller_state_and_a_lower_limit_stops_new_calls(
        redis_client, redis_url, endpoint):
    budgets = [make(redis_url, endpoint) for _ in range(3)]
    set_limit(redis_client, budgets[0], 5)
    held = [budgets[i % 3].slot() for i in range(5)]
    for h in held:
        h.__enter__()
    got = threading.Event()

    def take() -> None:
        with budgets[1].slot():
            got.set()

    t = threading.Thread(target=take, daemon=True)
    t.start()
    assert not got.wait(0.5), "a call started at the limit"
    set_limit(redis_client, budgets[0], 3)  # the limit drops with 5 in flight
    for h in held[:2]:
        h.__exit__(None, None, None)
    assert not got.wait(0.5), "a call started while the fleet was above its new limit"
    held[2].__exit__(None, None, None)  # 2 in flight: under the limit of 3
    assert got.wait(5), "no call started once the fleet was under the limit"
    t.join(5)
    for h in held[3:]:
        h.__exit__(None, None, None)


def test_a_timed_out_call_keeps_its_slot_for_as_long_again(redis_client, redis_url, endpoint):
    budget = make(redis_url, endpoint, max_concurrency=1)
    with pytest.raises(TimedOut), budget.slot():
        time.sleep(0.6)
        raise TimedOut("no answer")
    assert budget_stats(redis_client, endpoint)["in_flight"] == 1, "the abandoned call freed its slot at once"
    wait_until(lambda: budget_stats(redis_client, endpoint)["in_flight"] == 0, 5, "the held slot to free")


def test_samples_are_pushed_in_batches_and_one_process_updates_the_fleets_state(
        redis_client, redis_url, endpoint):
    budgets = [make(redis_url, endpoint, controller_interval=0.2) for _ in range(2)]
    for i in range(12):
        with budgets[i % 2].slot("region_expr"):
            time.sleep(0.05)
    for b in budgets:
        b.controller.maybe_flush(force=True)
    wait_until(lambda: controller_state(redis_client, endpoint), 5, "the controller to run")
    st = controller_state(redis_client, endpoint)
    assert st["floors_s"].get("region_expr", 0) >= 0.05, st
    assert st["limit"] >= adaptive.INITIAL_LIMIT


def test_a_429_with_retry_after_pauses_new_calls_fleet_wide(redis_client, redis_url, endpoint):
    a, b = make(redis_url, endpoint), make(redis_url, endpoint)
    with pytest.raises(RateLimited), a.slot():
        raise RateLimited("quota", retry_after=2, status=429)
    a.controller.maybe_flush(force=True)
    st = controller_state(redis_client, endpoint)
    assert st is not None and "429" in st["reason"]
    t0 = time.monotonic()
    with b.slot():
        waited = time.monotonic() - t0
    assert waited >= 1.0, f"the other process called {waited:.2f} s into a 2 s Retry-After"


def test_timed_out_calls_do_not_put_more_calls_on_the_server_than_a_fixed_cap(redis_url, endpoint, monkeypatch):
    """The issue's case, scaled down: calls take 0.8 s at the server, the client gives up at
    0.5 s and calls again. Freeing the slot at the timeout put twice the cap on the server; held
    as long again, the server never sees more than the cap."""
    from tests.support.fake_capacity import Capacity
    from tests.support.fake_vlm import FakeVLM
    from worker.clients.base import VLMRequest
    from worker.clients.factory import get_client
    from worker.context import BudgetedClient
    from worker.images import ImagePayload
    from worker.spec import VLMSpec

    monkeypatch.setenv("OPENAI_API_KEY", "x")
    with FakeVLM(latency=0.8) as fake:
        fake.capacity = cap = Capacity(k=100)
        vlm = VLMSpec(backend="openai", openai={"base_url": fake.openai_base_url, "model_name": "m", "timeout": 0.5},
                      structured_output="off")
        budget = make(redis_url, endpoint, max_concurrency=2, lease_seconds=30.5)
        client = BudgetedClient(get_client(vlm), budget)
        request = VLMRequest(image=ImagePayload(b"\x89PNG\r\n\x1a\n", "image/png", 8, 8, ""), prompt="hi")
        outcomes: list[str] = []

        def caller() -> None:
            for _ in range(3):
                try:
                    client.generate(request)
                    outcomes.append("ok")
                except TimedOut:
                    outcomes.append("timeout")

        threads = [threading.Thread(target=caller) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert outcomes.count("timeout") == 12, outcomes
        assert cap.stats()["peak"] <= 2, f"the server held {cap.stats()['peak']} calls against a cap of 2"


def test_under_a_rate_a_429_keeps_the_concurrency_the_rate_needs_and_the_first_turn_waits_out_the_burst():
    # A burst of 600 calls from t = 0 filled a quota of 600 a minute; its 429 states it. Calls
    # resume when the burst would have left the window at the rate, not whenever it has room
    # for one; and the limit is not cut below the rate's concurrency (9.5/s x 1 s, and one).
    st = State(limit=128, floors={"s": 1.0}, accepted=[[float(t), 100.0] for t in range(6)])
    new, _ = decide(st, sample(100, 1.0, sent=10, r429=10, stated=10.0, retry_after=54), now=6, interval=1,
                    ceiling=256)
    assert float(new.to_redis()["tat"]) == pytest.approx(600 / 9.5)
    assert new.limit == 64  # at most halved
    st = State(limit=12, floors={"s": 1.0}, slow_start=False, rate_limit=9.5, rate_source="stated",
               rate_stated=10.0, rate_changed_at=0)
    new, _ = decide(st, sample(10, 1.0, sent=10, r429=1, stated=10.0, retry_after=1), now=100, interval=1,
                    ceiling=256)
    assert new.limit == 11 and new.refused_limit == 11


def test_a_first_turn_the_controller_writes_never_moves_the_turns_already_given_back(redis_client, endpoint):
    """The controller writes the first turn under a rate it just learned (``tat``), computed from
    the state it read; the acquire script may have given turns past it meanwhile (a fixed
    ``requests_per_minute`` beside auto's rate): moving ``tat`` back would give those turns a
    second time. The write keeps the later of the two; a later first turn is still written."""
    from worker.adaptive import STATE_TTL, Controller

    key = budget_key(f"test-{uuid.uuid4().hex[:8]}", "ctl")
    ctl = Controller(redis_client, samples_key=key + ":samples", state_key=key, ceiling=8, label=endpoint)
    given = time.time() + 25
    redis_client.hset(key, mapping={"epoch": 7, "tat": f"{given:.6f}"})
    assert ctl._write(keys=[key], args=[7, STATE_TTL, "limit", "4", "tat", f"{given - 20:.6f}"])
    assert float(redis_client.hget(key, "tat")) == pytest.approx(given, abs=0.01)
    assert redis_client.hget(key, "limit") == b"4"
    assert ctl._write(keys=[key], args=[7, STATE_TTL, "tat", f"{given + 5:.6f}"])
    assert float(redis_client.hget(key, "tat")) == pytest.approx(given + 5, abs=0.01)
