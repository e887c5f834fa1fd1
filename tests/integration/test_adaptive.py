"""``vlm.max_concurrency: auto`` on real parts: three Celery worker processes, a real Redis, the
producer CLI and the OpenAI SDK against the in-process fake endpoint with a capacity model
(tests/support/fake_capacity.py), which reports the peak number of calls it held at once.

The first two tests pin the controller's limit (its state hash, with its next update put an hour
away, so no worker moves it) to check what the fleet does with a limit; the third lets the
controller run.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest

from tests.integration.test_faults import SHORT_VT, failures, job, seed_records, status_json
from tests.support.fake_capacity import Capacity
from tests.support.fleet import producer, wait_until
from worker.budget import endpoint_id
from worker.keys import budget_key

pytestmark = pytest.mark.integration

AUTO = "image_referring_expression.vlm.max_concurrency=auto"
ENDPOINT = "openai|{url}|fake-vl"


def state_key(fake) -> str:
    return budget_key(endpoint_id(ENDPOINT.format(url=fake.openai_base_url)), "ctl")


def leases(redis_client, fake) -> int:
    key = budget_key(endpoint_id(ENDPOINT.format(url=fake.openai_base_url)), "leases")
    sec, usec = redis_client.time()
    return redis_client.zcount(key, sec + usec / 1e6, "+inf")


def pin_limit(redis_client, fake, limit: int) -> None:
    redis_client.hset(state_key(fake), mapping={"limit": limit, "next": time.time() + 3600,
                                                "reason": "pinned by the test"})


def test_no_call_starts_while_the_fleet_is_at_its_limit_and_a_lower_limit_drains_first(
        fleet, fleet_env, fake_vlm, demo_data, tmp_path, redis_client):
    fake_vlm.latency = 0.3
    fake_vlm.capacity = cap = Capacity(k=100)
    pin_limit(redis_client, fake_vlm, 6)
    fleet.start(3, concurrency=4)  # 12 threads for 6 slots
    results = tmp_path / "results"
    proc = producer(fleet_env, "enqueue", *job(fake_vlm, demo_data, results, AUTO))
    assert proc.returncode == 0
    wait_until(lambda: cap.stats()["in_server"] == 6, 60, "the fleet to reach its limit of 6")
    pin_limit(redis_client, fake_vlm, 2)  # the limit drops with 6 calls in flight
    wait_until(lambda: cap.stats()["in_server"] <= 2, 30, "the calls in flight to finish")
    cap.mark()
    served = cap.stats()["served"]
    wait_until(lambda: cap.stats()["served"] >= served + 20, 60, "20 more calls under the new limit")
    st = cap.stats()
    assert st["peak"] == 6, f"the fleet held {st['peak']} calls at once with a limit of 6"
    assert st["peak_since_mark"] <= 2, f"{st['peak_since_mark']} calls at once after the limit dropped to 2"
    pin_limit(redis_client, fake_vlm, 12)
    producer(fleet_env, "wait", "--results-dir", str(results), "--timeout", "180")
    assert failures(results) == []
    assert cap.stats()["peak"] <= 12


def test_a_killed_workers_slots_come_back(fleet, fleet_env, fake_vlm, demo_data, tmp_path, redis_client):
    # Calls hang at the fake until released: the first worker takes every slot, then dies.
    release = threading.Event()

    def answer(prompt: str, image: bytes | None, protocol: str) -> str:
        from tests.support.fake_vlm import default_answer

        release.wait(60)
        return default_answer(prompt, image, protocol)

    fake_vlm.answer_fn = answer
    fake_vlm.capacity = cap = Capacity(k=100)
    pin_limit(redis_client, fake_vlm, 3)
    # A short timeout and lease margin keep the dead worker's leases short (2 s + 10 s, not + 30 s).
    env = {"REFEXP_VISIBILITY_TIMEOUT": SHORT_VT, "REFEXP_BUDGET_LEASE_MARGIN": "10"}
    first = fleet.start(1, concurrency=4, extra_env=env)[0]
    results = tmp_path / "results"
    producer(fleet_env, "enqueue", *job(fake_vlm, demo_data, results, AUTO,
                                        "image_referring_expression.vlm.openai.timeout=2"))
    wait_until(lambda: leases(redis_client, fake_vlm) == 3, 60, "the first worker to hold every slot")
    fleet.kill(first, signal.SIGKILL)
    first.proc.wait(10)
    release.set()  # the server finishes what the dead worker asked
    cap.mark()
    fleet.start(2, concurrency=4, extra_env=env)
    producer(fleet_env, "wait", "--results-dir", str(results), "--timeout", "240")
    assert cap.stats()["peak_since_mark"] <= 3
    ids = sorted(r["image_id"] for r in seed_records(results))
    assert status_json(fleet_env, results)["steps"]["3"]["pending"] == 0, ids
    wait_until(lambda: leases(redis_client, fake_vlm) == 0, 10, "every slot to be free at the end")


def test_the_controller_runs_once_for_the_fleet_and_status_shows_it(
        fleet, fleet_env, fake_vlm, demo_data, tmp_path, redis_client):
    fake_vlm.latency = 0.2
    fake_vlm.capacity = cap = Capacity(k=3)
    fleet.start(3, concurrency=4)
    results = tmp_path / "results"
    t0 = time.monotonic()
    producer(fleet_env, "enqueue", *job(fake_vlm, demo_data, results, AUTO), "--wait", "--timeout", "240")
    elapsed = time.monotonic() - t0
    assert failures(results) == []
    h = {k.decode(): v.decode() for k, v in redis_client.hgetall(state_key(fake_vlm)).items()}
    # One update per interval for the whole fleet, not one per process or per call.
    assert 1 <= int(h["epoch"]) <= elapsed + 2, (h["epoch"], elapsed)
    assert cap.stats()["served"] > 3 * int(h["epoch"])
    auto = status_json(fleet_env, results)["budget"]["auto"]
    assert auto["limit"] >= 1 and auto["floor_s"] >= 0.2 and auto["reason"]
    text = producer(fleet_env, "status", "--results-dir", str(results)).stdout
    assert "concurrency (auto): limit" in text
    logs = "\n".join(w.text() for w in fleet.workers)  # whole logs: the changes come early
    changes = [line for line in logs.splitlines() if "vlm concurrency limit" in line]
    assert changes, fleet.logs()


def test_a_stated_quota_keeps_429s_rare_and_status_shows_the_rate(
        fleet, fleet_env, fake_vlm, tmp_path, redis_client, request):
    """The fake states a quota of RPM calls a minute in OpenAI's x-ratelimit-* headers on every
    answer. The run needs more calls than that: a fleet keeping to no rate sends them in seconds
    (slow start doubles to dozens in flight at 0.1 s a call) and the endpoint refuses every call
    past the quota until its minute has passed. Kept to the stated rate, almost none is refused."""
    from producer.demo import make_demo_dataset

    rpm = 24  # 10 images make 34 calls
    # The fake's URL is the session's: its learned rate must not slow a later test using auto.
    request.addfinalizer(lambda: redis_client.delete(state_key(fake_vlm)))
    data = make_demo_dataset(tmp_path / "demo", n_images=10, seed=3)
    fake_vlm.latency = 0.1
    fake_vlm.capacity = cap = Capacity(k=100, rpm=rpm, style="openai")
    fleet.start(3, concurrency=4)
    results = tmp_path / "results"
    producer(fleet_env, "enqueue", *job(fake_vlm, data, results, AUTO), "--wait", "--timeout", "400")
    assert failures(results) == []
    st = cap.stats()
    calls = st["served"] + st["refused"]
    assert st["served"] > rpm, f"{st['served']} calls: the run must need more than a minute's quota"
    # A fleet keeping to no rate has every call past the window's quota refused at least once
    # (served - rpm of them). Kept to the stated rate, a few are on a loaded machine (calls sent
    # before the first answer stated the quota); the bench measures the share (bench/README.md).
    assert st["refused"] <= (st["served"] - rpm) // 2, f"{st['refused']} of {calls} calls refused (429)"
    auto = status_json(fleet_env, results)["budget"]["auto"]
    assert auto["rate_limit_per_minute"] == pytest.approx(0.95 * rpm) and auto["rate_source"] == "stated", auto
    assert f"{rpm} requests/min" in auto["rate_reason"]
    text = producer(fleet_env, "status", "--results-dir", str(results)).stdout
    assert "request rate (auto, stated): 22.8 calls/min" in text, text
    logs = "\n".join(w.text() for w in fleet.workers)
    assert "vlm request rate limit none -> 22.8 requests/min" in logs, fleet.logs()
