"""The fake endpoint's capacity model: K slots shared like a GPU batch server, a quota, a peak.

Times are lower bounds where the model promises them (a shared slot cannot finish early) and
loose upper bounds elsewhere, so a busy machine does not fail them.
"""

from __future__ import annotations

import threading
import time

from tests.support.fake_capacity import Capacity
from tests.support.fake_vlm import FakeVLM
from tests.support.test_fake_vlm import gemini_body, openai_body, post


def run_together(cap: Capacity, works: list[float], *, after=None) -> list[float]:
    """Serve ``works`` at once; each one's latency. ``after`` runs once every request is in."""
    latencies = [0.0] * len(works)
    inside = threading.Barrier(len(works) + 1)

    def one(i: int) -> None:
        inside.wait(5)
        t0 = time.monotonic()
        cap.serve(works[i])
        latencies[i] = time.monotonic() - t0

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(works))]
    for t in threads:
        t.start()
    inside.wait(5)
    if after is not None:
        after()
    for t in threads:
        t.join(30)
    return latencies


def test_up_to_k_requests_run_at_their_base_latency():
    cap = Capacity(k=4)
    lat = run_together(cap, [0.5] * 4)
    assert all(0.5 <= x < 1.0 for x in lat), lat
    assert cap.stats()["peak"] == 4 and cap.stats()["served"] == 4


def test_beyond_k_requests_share_the_slots_and_every_latency_grows():
    cap = Capacity(k=2)
    lat = run_together(cap, [0.3] * 6)  # 3x the capacity: each runs at a third of full speed
    assert all(x >= 0.85 for x in lat), lat
    assert max(lat) < 3.0, lat
    assert cap.stats()["peak"] == 6


def test_capacity_changed_mid_run_applies_to_requests_in_the_server():
    cap = Capacity(k=1)
    # Two requests of 1 s on one slot would take 2 s; two slots from the start, 1 s.
    lat = run_together(cap, [1.0, 1.0], after=lambda: (time.sleep(0.2), cap.set_capacity(2)))
    assert all(1.0 <= x < 1.9 for x in lat), lat
    assert cap.stats()["k"] == 2


def test_peak_since_mark_counts_from_the_mark():
    cap = Capacity(k=8)
    run_together(cap, [0.05] * 5)
    cap.mark()
    run_together(cap, [0.05] * 2)
    st = cap.stats()
    assert st["peak"] == 5 and st["peak_since_mark"] == 2 and st["in_server"] == 0


def test_quota_refuses_above_rpm_with_the_seconds_until_the_window_has_room():
    now = [1000.0]
    cap = Capacity(k=1, rpm=3, clock=lambda: now[0])
    assert [cap.admit() for _ in range(3)] == [None, None, None]
    now[0] += 20
    assert cap.admit() == 40.0  # the first admitted request leaves the window 60 s after it came
    now[0] += 40
    assert cap.admit() is None
    assert cap.stats()["refused"] == 1


def test_fake_endpoint_answers_429_over_quota_with_retry_after_and_gemini_retry_info():
    with FakeVLM() as fake:
        fake.capacity = Capacity(k=4, rpm=2)
        assert post(fake, "/v1/chat/completions", openai_body())[0] == 200
        assert post(fake, "/v1beta/models/g:generateContent", gemini_body())[0] == 200
        status, headers, body = post(fake, "/v1/chat/completions", openai_body())
        assert status == 429 and 0 < float(headers["Retry-After"]) <= 60
        assert body["error"]["code"] == "rate_limit_exceeded"
        status, headers, body = post(fake, "/v1beta/models/g:generateContent", gemini_body())
        assert status == 429 and body["error"]["status"] == "RESOURCE_EXHAUSTED"
        delays = [d["retryDelay"] for d in body["error"]["details"] if d["@type"].endswith("RetryInfo")]
        assert delays == [f"{float(headers['Retry-After']):g}s"]
        assert fake.capacity.stats()["served"] == 2


def test_fake_endpoint_serves_through_the_capacity_and_reports_its_peak():
    with FakeVLM(latency=0.3) as fake:
        fake.capacity = Capacity(k=1)
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(
            post(fake, "/v1/chat/completions", openai_body())[0])) for _ in range(3)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        # Three requests of 0.3 s on one slot: the last one ends no sooner than 0.9 s.
        assert results == [200, 200, 200] and time.monotonic() - t0 >= 0.85
        assert fake.capacity.stats()["peak"] == 3
