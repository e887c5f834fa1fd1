"""One budget for the fleet: concurrent calls and calls per minute per endpoint, held in Redis.

Concurrency is a lease-based counting semaphore: a sorted set of lease tokens scored by their
expiry (Redis server time, so host clocks do not matter). A worker killed mid-call cannot leak
its slot for longer than the lease. The per-minute rate is the ``limits`` library's sliding
window counter on the same Redis: a well-kept implementation, two small keys per endpoint, and
it answers "when may I try again" so a waiting thread sleeps exactly that long.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import time
import uuid
from collections.abc import Iterator

import redis
from limits import RateLimitItemPerMinute
from limits.storage import storage_from_string
from limits.strategies import SlidingWindowCounterRateLimiter

from worker.constants import KEY_PREFIX

_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[3])
  redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1])) + 60)
  return 1
end
return 0
"""
_IN_FLIGHT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""
STATS_TTL = 600


def endpoint_id(endpoint_key: str) -> str:
    """A short stable id for an endpoint (backend + base_url + model), safe in key names."""
    return hashlib.sha1(endpoint_key.encode()).hexdigest()[:16]


def _key(endpoint: str, *parts: object) -> str:
    return ":".join((KEY_PREFIX, "ep", endpoint, *map(str, parts)))


class FleetBudget:
    """Waits for a fleet-wide slot before each VLM call and counts calls and 429s per minute."""

    def __init__(
        self,
        client: redis.Redis,
        redis_url: str,
        *,
        endpoint_key: str,
        max_concurrency: int,
        requests_per_minute: int,
        lease_seconds: float,
    ):
        self.r = client
        self.endpoint = endpoint_id(endpoint_key)
        self.max_concurrency = max_concurrency
        self.lease_seconds = lease_seconds
        self._acquire = client.register_script(_ACQUIRE)
        self._in_flight = client.register_script(_IN_FLIGHT)
        self._limiter = None
        if requests_per_minute > 0:
            self._limiter = SlidingWindowCounterRateLimiter(storage_from_string(redis_url))
            self._rate = RateLimitItemPerMinute(requests_per_minute)

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of the endpoint's concurrency slots (and one rate token) for one call."""
        self._wait_rate()
        token = uuid.uuid4().hex
        delay = 0.01
        while not self._acquire(keys=[_key(self.endpoint, "leases")],
                                args=[self.lease_seconds, self.max_concurrency, token]):
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.25)
        try:
            self._count("calls")
            yield
        finally:
            self.r.zrem(_key(self.endpoint, "leases"), token)

    def _wait_rate(self) -> None:
        if self._limiter is None:
            return
        while not self._limiter.hit(self._rate, self.endpoint):
            reset, _ = self._limiter.get_window_stats(self._rate, self.endpoint)
            time.sleep(min(max(reset - time.time(), 0.05), 5.0) * (0.5 + random.random()))

    def _count(self, what: str) -> None:
        key = _key(self.endpoint, what, int(time.time() // 60))
        pipe = self.r.pipeline()
        pipe.incr(key)
        pipe.expire(key, STATS_TTL)
        pipe.execute()

    def note_rate_limited(self) -> None:
        self._count("429")


def budget_stats(client: redis.Redis, endpoint_key: str) -> dict[str, int]:
    """In flight now, calls and 429s in the last full minute and the current one."""
    ep = endpoint_id(endpoint_key)
    minute = int(time.time() // 60)
    in_flight = int(client.eval(_IN_FLIGHT, 1, _key(ep, "leases")))
    vals = client.mget([_key(ep, w, m) for w in ("calls", "429") for m in (minute - 1, minute)])
    n = [int(v or 0) for v in vals]
    # A sliding-minute estimate from the two fixed buckets: all of this one, the part of the
    # previous one that is still within the last 60 s.
    left = 1.0 - (time.time() % 60) / 60
    return {"in_flight": in_flight, "calls_last_minute": n[0], "calls_this_minute": n[1],
            "rate_limited_last_minute": n[2], "rate_limited_this_minute": n[3],
            "calls_per_minute": round(n[1] + n[0] * left), "rate_limited_per_minute": round(n[3] + n[2] * left)}
