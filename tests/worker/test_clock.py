"""Skew maths, the guard's state and logs, and the guarded kombu QoS against a real Redis.

A wrong clock for real (libfaketime) is in tests/integration/test_clock.py; here Redis's clock
is shifted by answering ``TIME`` from our own clock plus an offset where a test needs skew.
"""

from __future__ import annotations

import logging
import time

import pytest
from kombu import Connection
from kombu.transport import redis as kombu_redis

from tests.support.fleet import wait_until
from worker.clock import (
    MAX_TOLERANCE,
    ClockGuard,
    ClockSkewError,
    GuardedQoS,
    Reading,
    RedisClock,
    measure,
    out_of_tolerance,
    reading,
    tolerance,
)
from worker.transport import split_member


def shifted_redis(shift: list[float], delays: list[float] | None = None):
    """A ``TIME`` answering this host's time plus ``shift[0]``, after ``delays`` (one per call) of round trip."""
    delays = list(delays or [])

    def redis_time() -> tuple[int, int]:
        if delays:
            time.sleep(delays.pop(0))  # a slow round trip, not a wait for anything
        now = time.time() + shift[0]
        return int(now), int((now % 1) * 1e6)

    return redis_time


def test_reading_takes_redis_time_at_the_middle_of_the_round_trip():
    r = reading(wall_sent=100.0, rtt=0.2, server=110.1)
    assert r.offset == pytest.approx(10.0)
    assert (r.least, r.most) == (pytest.approx(9.9), pytest.approx(10.1))
    behind = reading(wall_sent=100.0, rtt=0.2, server=90.1)  # we are ahead: negative offset
    assert behind.offset == pytest.approx(-10.0) and behind.least == pytest.approx(9.9)
    assert Reading(offset=0.01, rtt=0.1).least == 0.0  # within the round trip: maybe no skew at all
    assert "10.000 s behind Redis" in r.describe() and "ahead of Redis" in behind.describe()


def test_tolerance_is_a_quarter_of_the_visibility_timeout_at_most_a_minute():
    assert tolerance(6) == 1.5
    assert tolerance(5) == 1.25
    assert tolerance(240) == 60.0
    assert tolerance(3600) == MAX_TOLERANCE == 60.0


@pytest.mark.parametrize(("offset", "rtt", "was", "skewed"), [
    (2.0, 0.1, False, True),     # surely out: 1.95 s at least
    (-2.0, 0.1, False, True),    # ahead as much as behind
    (1.0, 0.1, True, False),     # surely back: 1.05 s at most
    (1.6, 0.4, False, False),    # 1.4 .. 1.8 s: inconclusive, keeps the state ...
    (1.6, 0.4, True, True),      # ... either way
    (1.4, 0.4, True, True),      # 1.2 .. 1.6 s: still inconclusive
    (1.5, 0.0, False, False),    # exactly the tolerance is within it
])
def test_out_of_tolerance_only_when_the_whole_round_trip_says_so(offset, rtt, was, skewed):
    assert out_of_tolerance(Reading(offset, rtt), 1.5, was) is skewed


def test_measure_keeps_the_reading_with_the_shortest_round_trip():
    shift = [7.0]
    r = measure(shifted_redis(shift, delays=[0.05, 0.0, 0.03]))
    assert r.rtt < 0.02 and r.offset == pytest.approx(7.0, abs=0.01)


def test_measure_against_a_real_redis_on_this_host_finds_no_skew(redis_client):
    r = measure(redis_client.time)
    assert abs(r.offset) < 0.05 and 0 < r.rtt < 0.5


def counted(redis_time):
    """``redis_time`` that counts its calls (``calls[0]``)."""
    calls = [0]

    def timed() -> tuple[int, int]:
        calls[0] += 1
        return redis_time()

    return timed, calls


def test_redis_clock_estimates_redis_time_with_one_time_per_refresh():
    """The fleet budget's scripts take Redis's time from this estimate: one TIME per process every
    ``refresh`` seconds instead of one per VLM call, and as right as the reading was."""
    shift = [7.0]  # Redis 7 s ahead of this host: the estimate is Redis's time, not ours
    redis_time, calls = counted(shifted_redis(shift))
    clock = RedisClock(redis_time, refresh=1.0)
    for _ in range(200):
        assert clock.now() == pytest.approx(time.time() + 7.0, abs=0.01)
    assert calls[0] == 1

    shift[0] = 12.0  # Redis's own clock is stepped: the next reading takes it in
    wait_until(lambda: clock.now() == pytest.approx(time.time() + 12.0, abs=0.01), 5, "the step to be taken in")
    assert calls[0] == 2


def test_redis_clock_ignores_this_hosts_wall_clock(monkeypatch):
    """Anchored to the monotonic clock: a host whose wall clock is stepped by an hour after the
    reading (NTP, an operator) still passes Redis's time."""
    redis_time = shifted_redis([0.0])
    clock = RedisClock(redis_time, refresh=3600)
    truth = clock.now()
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600.0)
    assert clock.now() == pytest.approx(truth, abs=0.05)


def test_redis_clock_gives_no_estimate_from_a_slow_reading():
    """Half the round trip is the reading's error: a reading slower than ``2 * max_error`` is not
    used (None: the scripts read TIME), and the previous estimate serves while one is slow."""
    slow = RedisClock(shifted_redis([0.0], delays=[0.2]), max_error=0.05)
    assert slow.now() is None
    readings = iter([(0.0, 0.0), (0.2, 5.0)])  # (round trip, Redis's shift): the slow one is off by 5 s

    def redis_time() -> tuple[int, int]:
        delay, shift = next(readings)
        return shifted_redis([shift], delays=[delay])()

    good = RedisClock(redis_time, refresh=0.0, max_error=0.05, max_age=60)
    assert good.now() == pytest.approx(time.time(), abs=0.01)
    assert good.now() == pytest.approx(time.time(), abs=0.01), "the slow second reading replaced the estimate"


def test_redis_clock_against_a_real_redis(redis_client):
    clock = RedisClock(redis_client.time)
    secs, micros = redis_client.time()
    assert clock.now() == pytest.approx(secs + micros / 1e6, abs=0.05)


def test_guard_logs_each_change_once_and_stamps_with_redis_time_while_skewed(caplog):
    shift = [0.0]
    guard = ClockGuard(visibility_timeout=6)
    redis_time = shifted_redis(shift)
    caplog.set_level(logging.INFO, logger="refexp.worker")
    guard.check(redis_time)
    assert not guard.skewed and guard.stamp() is None and caplog.records == []

    shift[0] = 3600.0  # Redis an hour ahead: this host is an hour behind
    for _ in range(3):
        guard.check(redis_time)
    assert guard.skewed
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, caplog.text
    assert "3600.0" in errors[0].getMessage() and "behind Redis" in errors[0].getMessage()
    assert "tolerance is 1.5 s" in errors[0].getMessage() and "REFEXP_VISIBILITY_TIMEOUT=6 s" in errors[0].getMessage()
    assert guard.stamp() == pytest.approx(time.time() + 3600.0, abs=0.05)

    shift[0] = 0.2
    guard.check(redis_time)
    guard.check(redis_time)
    assert not guard.skewed and guard.stamp() is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "back within tolerance" in warnings[0].getMessage()
    assert len(caplog.records) == 2


def test_startup_refuses_a_skewed_clock_with_the_numbers_and_the_fix():
    guard = ClockGuard(visibility_timeout=3600)
    guard.startup(shifted_redis([30.0]))  # half a minute: within 60 s
    assert not guard.skewed
    with pytest.raises(ClockSkewError) as err:
        ClockGuard(visibility_timeout=3600).startup(shifted_redis([-90.0]))
    msg = str(err.value)
    assert "refusing to start" in msg and "90.0" in msg and "ahead of Redis" in msg
    assert "tolerance is 60 s" in msg and "REFEXP_VISIBILITY_TIMEOUT=3600 s" in msg and "NTP" in msg


@pytest.fixture
def guarded_channel(redis_url, redis_client, monkeypatch):
    """A real kombu Redis channel whose QoS is GuardedQoS with the given guard (as install() does)."""
    guard = ClockGuard(visibility_timeout=6)
    monkeypatch.setattr(kombu_redis.Channel, "QoS", GuardedQoS)
    monkeypatch.setattr(GuardedQoS, "guard", guard)
    with Connection(redis_url, transport_options={"visibility_timeout": 6}) as conn:
        channel = conn.channel()
        queue = conn.SimpleQueue("clock-test", channel=channel)
        yield guard, channel, queue
        queue.close()


def _stamps(redis_client) -> dict[str, float]:
    """delivery tag -> stamp of the unacked messages (worker/transport.py's members)."""
    return {split_member(m)[0]: score
            for m, score in redis_client.zrange("unacked_messages", 0, -1, withscores=True)}


def test_guarded_qos_restamps_a_taken_message_with_redis_time_while_skewed(guarded_channel, redis_client):
    guard, channel, queue = guarded_channel
    assert isinstance(channel.qos, GuardedQoS)
    queue.put({"n": 1})
    queue.put({"n": 2})
    first = queue.get(timeout=5)  # taken, not acked: stamped in the unacked set
    guard.skewed, guard.offset = True, -100.0  # as if this host ran 100 s ahead of Redis
    second = queue.get(timeout=5)
    stamps = _stamps(redis_client)
    now = time.time()
    assert stamps[first.delivery_tag] == pytest.approx(now, abs=2)
    assert stamps[second.delivery_tag] == pytest.approx(now - 100, abs=2)
    first.ack()
    second.ack()
    assert redis_client.zcard("unacked_messages") == 0


def test_guarded_qos_sweeps_with_a_right_clock(guarded_channel, redis_client):
    guard, channel, queue = guarded_channel
    queue.put({"n": 1})
    queue.get(timeout=5)
    (member,) = redis_client.zrange("unacked_messages", 0, -1)
    redis_client.zadd("unacked_messages", {member: time.time() - 60})  # taken a minute ago by a dead worker
    channel.qos.restore_visible(num=10, interval=1)
    assert redis_client.zcard("unacked_messages") == 0 and redis_client.llen("clock-test") == 1
    assert not guard.skewed
