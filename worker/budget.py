"""One budget for the fleet: concurrent calls and calls per minute per endpoint, held in Redis.

Concurrency is a lease-based counting semaphore: a sorted set of lease tokens scored by their
expiry (Redis server time, so host clocks do not matter). A worker killed mid-call cannot leak
its slot for longer than the lease. The per-minute rate is the ``limits`` library's sliding
window counter on the same Redis: a well-kept implementation, two small keys per endpoint, and
it answers "when may I try again" so a waiting thread sleeps exactly that long.

A thread that finds every slot taken blocks on the endpoint's wake list (``BLPOP``), and each
release pushes one token there, so a freed slot is taken within a Redis round trip rather than
after a polling sleep. That is what lets a fleet run more threads than ``max_concurrency``: the
spare threads have their next message fetched and their image read while they wait, and a
finishing call's sink write and bookkeeping no longer leave its slot idle (bench/README.md, 1).
The wait still gives up every ``wait_poll`` seconds to try again, which is how a dead holder's
expired lease is noticed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import time
import uuid
from collections.abc import Iterator

import redis
from limits import RateLimitItemPerMinute
from limits.storage import storage_from_string
from limits.strategies import SlidingWindowCounterRateLimiter

from worker.clients.factory import GEMINI_DEFAULT_BASE_URL, OPENAI_DEFAULT_BASE_URL
from worker.keys import budget_key as _key
from worker.spec import VLMSpec

log = logging.getLogger("refexp.worker")

# KEYS: leases, this minute's call counter. ARGV: lease seconds, max concurrency, token, stats TTL.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[3])
  redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1])) + 60)
  redis.call('INCR', KEYS[2])
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]))
  return 1
end
return 0
"""
# KEYS: leases, wake list. ARGV: token, max concurrency. A lease that already expired (and may
# have been reclaimed) wakes nobody: its slot was handed on when it was found expired.
_RELEASE = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[2], 1)
  redis.call('LTRIM', KEYS[2], -tonumber(ARGV[2]), -1)
  redis.call('EXPIRE', KEYS[2], 60)
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
#: Longest a waiting thread blocks before trying again: the bound on noticing an expired lease
#: of a dead holder (whole seconds: Redis before 6.0 takes only integer BLPOP timeouts).
WAIT_POLL = 1


def endpoint_key(vlm: VLMSpec) -> str:
    """``backend|base_url|model``: what fleet-wide rate and concurrency limits are counted by.

    Defaults are spelled out, so an empty ``base_url`` and the provider's URL share a budget.
    """
    if vlm.backend == "gemini":
        base = (vlm.gemini.base_url or GEMINI_DEFAULT_BASE_URL).rstrip("/")
        return f"gemini|{base}|{vlm.gemini.model}"
    if vlm.backend == "openai":
        base = vlm.openai.base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_DEFAULT_BASE_URL
        base = base.rstrip("/")
        return f"openai|{base}|{vlm.openai.model_name}"
    return f"{vlm.backend}||"


def endpoint_id(endpoint_key: str) -> str:
    """A short stable id for an endpoint (backend + base_url + model), safe in key names."""
    return hashlib.sha1(endpoint_key.encode()).hexdigest()[:16]


def _stats_key(endpoint: str, what: str) -> str:
    """This minute's counter of ``what`` (calls, 429) for the endpoint."""
    return _key(endpoint, what, int(time.time() // 60))


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
        wait_poll: int = WAIT_POLL,
    ):
        self.r = client
        self.endpoint = endpoint_id(endpoint_key)
        self.max_concurrency = max_concurrency
        self.lease_seconds = lease_seconds
        self.wait_poll = wait_poll
        self._leases = _key(self.endpoint, "leases")
        self._wake = _key(self.endpoint, "wake")
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
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
        while not self._acquire(keys=[self._leases, _stats_key(self.endpoint, "calls")],
                                args=[self.lease_seconds, self.max_concurrency, token, STATS_TTL]):
            # A token left by a release nobody waited for wakes us at once: one more try, no harm.
            self.r.blpop([self._wake], timeout=self.wait_poll)
        try:
            yield
        finally:
            try:
                self._release(keys=[self._leases, self._wake], args=[token, self.max_concurrency])
            except redis.exceptions.RedisError as exc:
                # The call is made and paid for: its answer must not be lost because Redis is
                # unusable right now. The slot frees itself when its lease runs out.
                log.warning("could not release a budget slot (%s: %s); it frees itself within %.0f s",
                            type(exc).__name__, exc, self.lease_seconds)

    def _wait_rate(self) -> None:
        if self._limiter is None:
            return
        while not self._limiter.hit(self._rate, self.endpoint):
            reset, _ = self._limiter.get_window_stats(self._rate, self.endpoint)
            time.sleep(min(max(reset - time.time(), 0.05), 5.0) * (0.5 + random.random()))

    def _count(self, what: str) -> None:
        """Count one event for ``producer status``; a Redis that refuses it must not replace the
        error being counted (a 429 counted during an outage stays a 429)."""
        key = _stats_key(self.endpoint, what)
        pipe = self.r.pipeline()
        pipe.incr(key)
        pipe.expire(key, STATS_TTL)
        with contextlib.suppress(redis.exceptions.RedisError):
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
