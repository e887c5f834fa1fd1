"""Workers keep their clock within tolerance of Redis, or stay out of the unacked sweep.

Why: kombu's Redis transport emulates acks with a sorted set (ours: ``unacked_messages``,
worker/transport.py; kombu's own: ``unacked_index``). A worker stamps
every message it takes with its own ``time()``, and every worker's consumer periodically
"restores" (hands out again) the messages whose stamp is older than its own ``time()`` minus the
visibility timeout. Each worker reads its own clock on both sides, so a worker whose clock runs
ahead by more than the timeout re-queues every other worker's running tasks (duplicate VLM
calls), and one that runs behind stamps its own tasks so old that everyone else re-queues them.
Celery only logs a drift warning (and only with gossip on).

What this module does, per worker process:

- At start (a consumer bootstep, :class:`ClockCheck`), the worker measures its offset from
  Redis ``TIME`` and refuses to start when it is out of tolerance, before it takes a message: a
  CRITICAL line with the skew, the tolerance, the visibility timeout and the fix, and exit code
  78 (``EX_CONFIG``).
- On every sweep (:class:`GuardedQoS`, kombu's Redis ``QoS`` with ``restore_visible``
  wrapped), it measures again, just before comparing stamps with its clock. While out of
  tolerance it skips the sweep, and it stamps the messages it takes with Redis's time (its clock
  plus the measured offset) instead of its own. Sweeps run on a timer of the consumer's event
  loop, busy or idle, so this is the periodic check too: every ``unacked_restore_interval``
  seconds (at most 10, see worker/app.py), one to three ``TIME`` round trips. A change of state
  is logged once (ERROR when the clock leaves tolerance, WARNING when it is back).

Why these hooks: every sweep, whichever channel runs it (the event loop's first sweep takes any
channel of the connection, the periodic one the task channel), goes through
``QoS.restore_visible``, and every stamp through ``QoS.append``; kombu builds each channel's QoS
from the ``Channel.QoS`` class attribute when the channel is first used. So the consumer
bootstep swaps that attribute for :class:`GuardedQoS` when the consumer is built, before any
connection exists, in worker processes only (the producer never sweeps). A custom transport
class would do the same through ``broker_transport`` but would also replace the scheme chosen
from the URL (``rediss://``, ``sentinel://``).

Measuring: the offset is Redis's time minus the middle of the round trip (NTP's assumption),
so it is right within half the round trip; the best of three readings (the shortest round trip)
is kept. The clock is out of tolerance only when even the most favourable reading of the
interval is (``|offset| - rtt/2 > tolerance``), and back within only when the least favourable
one is (``|offset| + rtt/2 <= tolerance``); a slow round trip in between changes nothing.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
from celery import bootsteps
from celery.exceptions import WorkerShutdown
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual as kombu_virtual

from worker.transport import PipelinedQoS

log = logging.getLogger("refexp.worker")

#: A clock off by more than this is broken time sync whatever the visibility timeout.
MAX_TOLERANCE = 60.0
#: ``TIME`` round trips per check; the one with the shortest round trip counts.
SAMPLES = 3
#: Exit code of a worker that refuses to start (sysexits' EX_CONFIG: fix the host, not the code).
EXIT_SKEWED = os.EX_CONFIG

RedisTime = Callable[[], "tuple[int, int]"]  # redis-py's ``Redis.time``: (seconds, microseconds)


class ClockSkewError(Exception):
    """This host's clock is out of tolerance with Redis's."""


def tolerance(visibility_timeout: float) -> float:
    """How far a worker's clock may be from Redis's: a quarter of the visibility timeout, at most 60 s.

    A sweeping worker re-queues a task of age ``a`` when its clock leads the clock that stamped
    the task by more than ``visibility_timeout - a``. With every worker within a quarter of the
    timeout of Redis, two workers differ by at most half of it, so a task younger than half the
    timeout (the timeout must exceed the longest task anyway) is never re-queued by mistake,
    and the round trip's uncertainty has room on top. The 60 s cap: NTP keeps hosts within
    milliseconds, so a minute off is broken time sync, to be fixed before it grows; the default
    one-hour timeout alone would let 15 minutes through silently.
    """
    return min(visibility_timeout / 4, MAX_TOLERANCE)


@dataclass(frozen=True)
class Reading:
    """One comparison with Redis: ``offset`` is Redis's time minus ours (positive: we are behind),
    right within ``rtt / 2``."""

    offset: float
    rtt: float

    @property
    def least(self) -> float:
        """The smallest skew this reading allows."""
        return max(0.0, abs(self.offset) - self.rtt / 2)

    @property
    def most(self) -> float:
        """The largest skew this reading allows."""
        return abs(self.offset) + self.rtt / 2

    def describe(self) -> str:
        way = "behind" if self.offset > 0 else "ahead of"
        return f"{abs(self.offset):.3f} s {way} Redis (round trip {self.rtt * 1000:.1f} ms)"


def reading(wall_sent: float, rtt: float, server: float) -> Reading:
    """The offset when we sent ``TIME`` at ``wall_sent`` (our clock), got ``server`` back and the
    round trip took ``rtt`` (a monotonic clock, so a clock step mid-call cannot distort it)."""
    return Reading(offset=server - (wall_sent + rtt / 2), rtt=rtt)


def measure(redis_time: RedisTime, samples: int = SAMPLES) -> Reading:
    """Compare this host's clock with Redis's ``samples`` times; keep the shortest round trip."""
    readings = []
    for _ in range(samples):
        wall, start = time.time(), time.monotonic()
        seconds, micros = redis_time()
        rtt = time.monotonic() - start
        readings.append(reading(wall, rtt, seconds + micros / 1e6))
    return min(readings, key=lambda r: r.rtt)


def out_of_tolerance(r: Reading, limit: float, was: bool) -> bool:
    """Whether the clock is out of tolerance after reading ``r``; an inconclusive reading keeps ``was``."""
    if r.least > limit:
        return True
    if r.most <= limit:
        return False
    return was


class ClockGuard:
    """One worker process's view of its clock: the last offset from Redis and whether it is skewed.

    :param visibility_timeout: the broker's, in seconds; the tolerance derives from it.
    """

    def __init__(self, visibility_timeout: float) -> None:
        self.visibility_timeout = visibility_timeout
        self.tolerance = tolerance(visibility_timeout)
        self.skewed = False
        self.offset = 0.0

    def explain(self, r: Reading) -> str:
        return (f"this host's clock is {r.describe()}; the tolerance is {self.tolerance:g} s (a quarter of "
                f"the visibility timeout, REFEXP_VISIBILITY_TIMEOUT={self.visibility_timeout:g} s, at most "
                f"{MAX_TOLERANCE:g} s)")

    def check(self, redis_time: RedisTime) -> Reading:
        """Measure, update the state, and log a change of state once."""
        r = measure(redis_time)
        was, self.offset = self.skewed, r.offset
        self.skewed = out_of_tolerance(r, self.tolerance, was)
        if self.skewed and not was:
            log.error("clock skew: %s. Not re-queueing other workers' unacked tasks, and stamping the tasks "
                      "taken with Redis's time, until the clock is back within tolerance: fix this host's "
                      "time sync (NTP: timedatectl status, chronyc tracking).", self.explain(r))
        elif was and not self.skewed:
            log.warning("clock back within tolerance: %s. Re-queueing unacked tasks of dead workers again.",
                        self.explain(r))
        return r

    def startup(self, redis_time: RedisTime) -> Reading:
        """The check at start: raises :class:`ClockSkewError` when out of tolerance."""
        r = measure(redis_time)
        self.offset = r.offset
        self.skewed = out_of_tolerance(r, self.tolerance, False)
        if self.skewed:
            raise ClockSkewError(
                f"refusing to start: {self.explain(r)}. A worker this far off would hand other workers' "
                f"running tasks out again (duplicate VLM calls), or have its own handed out. Fix this host's "
                f"time sync (NTP: timedatectl status, chronyc tracking) and start the worker again.")
        log.info("clock: %s; tolerance %g s", r.describe(), self.tolerance)
        return r

    def stamp(self) -> float | None:
        """The time to stamp a taken message with while skewed (Redis's, by the last offset), else None."""
        return time.time() + self.offset if self.skewed else None


class GuardedQoS(PipelinedQoS):
    """kombu's Redis QoS that sweeps only while the process's clock is within tolerance, and
    stamps with Redis's time while it is not (see the module docstring). Its receipt and ack
    are one command each (worker/transport.py).

    It also keeps the worker alive when Redis refuses writes (``maxmemory`` with ``noeviction``,
    a read-only replica) or drops the connection at the wrong moment. kombu takes a message with
    BRPOP (a read: allowed on a full Redis), then records it as unacked (a write: refused), and
    the refusal used to escape into the consumer's event loop and kill the worker ("Unrecoverable
    error: OutOfMemoryError"), with the message popped and recorded nowhere. Here the message runs
    anyway, tracked in memory only: its task settles itself as usual (worker/tasks.py); if this
    worker died before that, no message would remain, and `producer wait`'s reconciler puts the
    image back. A sweep that Redis refuses is skipped until the next one, and an ack it refuses
    (a stalled Redis times out) leaves the message to be handed out again and skipped as done.
    """

    guard: ClockGuard | None = None  # set by install(); None behaves exactly as kombu

    def restore_visible(self, *args, **kwargs):
        guard = self.guard
        try:
            if guard is not None:
                with self.channel.conn_or_acquire() as client:
                    guard.check(client.time)
                if guard.skewed:
                    return None
            return super().restore_visible(*args, **kwargs)
        except redis.exceptions.RedisError as exc:
            log.warning("unacked sweep skipped: Redis refused it (%s: %s)", type(exc).__name__, exc)
            return None

    def ack(self, delivery_tag):
        try:
            super().ack(delivery_tag)
        except redis.exceptions.RedisError as exc:
            # The task is settled; its message stays in the unacked set until the visibility
            # timeout hands it out again, and then the done check skips it. Not worth a crash.
            log.warning("could not acknowledge a finished task (%s: %s); Redis hands it out again later and "
                        "it is skipped as done", type(exc).__name__, exc)
            kombu_virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag, requeue=False):
        try:
            super().reject(delivery_tag, requeue=requeue)
        except redis.exceptions.RedisError as exc:
            # A task gives its message back (worker/tasks.py) when Redis refuses writes; the
            # requeue is refused for the same reason. The message stays in Redis's unacked set
            # until the visibility timeout hands it out again; forget it here so its prefetch
            # slot is not leaked (and the event loop is not killed).
            log.warning("could not give a task back to the queue (%s: %s); Redis hands it out again after the "
                        "visibility timeout", type(exc).__name__, exc)
            kombu_virtual.QoS.ack(self, delivery_tag)

    def append(self, message, delivery_tag):
        """The receipt's ``ZADD`` (worker/transport.py), stamped with Redis's time while this clock
        is skewed: in the same write, so no other worker's sweep ever sees a stamp from the wrong
        clock (restamping it afterwards left a round trip in which a clock an hour behind made the
        task look an hour old to everyone)."""
        stamp = self.guard.stamp() if self.guard is not None else None
        try:
            super().append(message, delivery_tag, stamp=stamp)
        except redis.exceptions.RedisError as exc:
            task_id = (getattr(message, "headers", None) or {}).get("id", "?")
            log.error("task %s taken from the queue could not be recorded as unacked (%s: %s); running it "
                      "anyway (should this worker die before it settles, `producer wait` puts its image "
                      "back)", task_id, type(exc).__name__, exc)
            kombu_virtual.QoS.append(self, message, delivery_tag)


def install(guard: ClockGuard) -> None:
    """Make every kombu Redis channel this process opens from now on use ``guard``."""
    GuardedQoS.guard = guard
    kombu_redis.Channel.QoS = GuardedQoS


class ClockCheck(bootsteps.StartStopStep):
    """Consumer bootstep: installs the guard when the consumer is built and checks the clock each
    time the consumer (re)connects; the first time, a skewed clock stops the worker.

    The consumer's first sweep runs as it connects, before this step starts; the guard covers it
    too, so a worker refusing to start logs the sweep's ERROR line before the CRITICAL one.
    """

    requires = ("celery.worker.consumer.connection:Connection",)

    def __init__(self, c, **kwargs):
        super().__init__(c, **kwargs)
        options = c.app.conf.broker_transport_options or {}
        vt = options.get("visibility_timeout", kombu_redis.Channel.visibility_timeout)
        self.guard = ClockGuard(float(vt))
        self.started_once = False
        install(self.guard)

    def start(self, c):
        if not isinstance(c.connection.default_channel, kombu_redis.Channel):
            return
        with c.connection.default_channel.conn_or_acquire() as client:
            if self.started_once:
                self.guard.check(client.time)  # a reconnect: the sweeps' rules, not a refusal
                return
            try:
                self.guard.startup(client.time)
            except ClockSkewError as exc:
                log.critical("%s", exc)
                raise WorkerShutdown(EXIT_SKEWED) from exc
            self.started_once = True


#: Seconds an estimate of Redis's time (:class:`RedisClock`) serves before one ``TIME`` renews it.
ESTIMATE_REFRESH = 30.0
#: The largest error an estimate may start with: half the round trip it was measured over. A
#: slower reading is not used (the previous estimate serves, or the scripts read ``TIME``).
ESTIMATE_MAX_ERROR = 0.05
#: The oldest reading an estimate may come from (when the readings since were slow or failed).
ESTIMATE_MAX_AGE = 3 * ESTIMATE_REFRESH


class RedisClock:
    """Redis's time, estimated in this process: one ``TIME`` every ``refresh`` seconds, not one per use.

    Why: the fleet budget's acquire script scores leases, waiter entries and the request rate's
    turns by Redis's clock, so that hosts' clocks do not matter; reading ``TIME`` inside the
    script cost one command per VLM call (issue 16 counts those). Instead each process measures
    Redis's time once in a while and passes its estimate to the script.

    The estimate is anchored to ``time.monotonic()``, not to the wall clock: Redis's time at the
    middle of the round trip (NTP's assumption, :func:`reading`) minus the monotonic clock then.
    So this host's wall clock, however far off or however it is stepped, plays no part; what is
    left is half the round trip of the reading (at most ``max_error``, 50 ms; about 0.1 ms on a
    LAN) plus the monotonic clock's drift against Redis's since (crystal error, tens of ppm: a
    few µs over 30 s; NTP slews Redis's host by at most 500 ppm, 15 ms) and a step of Redis's
    own clock, which the next reading (``refresh``, 30 s) takes in. A reading whose round trip
    is longer than ``2 * max_error`` is not used: the previous estimate serves (a retry in a
    second), and after ``max_age`` (90 s) without a good one :meth:`now` returns None and the
    callers fall back to reading ``TIME`` in their scripts.
    """

    def __init__(self, redis_time: RedisTime, *, refresh: float = ESTIMATE_REFRESH,
                 max_error: float = ESTIMATE_MAX_ERROR, max_age: float = ESTIMATE_MAX_AGE) -> None:
        self._time = redis_time
        self.refresh, self.max_error, self.max_age = refresh, max_error, max_age
        self._anchor: float | None = None  # Redis's time minus time.monotonic()
        self._measured = 0.0  # time.monotonic() of the reading behind the anchor
        self._next = 0.0  # when to measure again
        self._lock = threading.Lock()

    def now(self) -> float | None:
        """Redis's time now by the estimate (measured first when due, by one thread while the
        others use the previous estimate), or None when there is no good one."""
        if time.monotonic() >= self._next and self._lock.acquire(blocking=False):
            try:
                self._measure()
            finally:
                self._lock.release()
        anchor, measured = self._anchor, self._measured
        mono = time.monotonic()
        if anchor is None or mono - measured > self.max_age:
            return None
        return mono + anchor

    def _measure(self) -> None:
        start = time.monotonic()
        try:
            seconds, micros = self._time()
        except redis.exceptions.RedisError:
            self._next = time.monotonic() + 1.0  # the caller's own command will say what is wrong
            return
        rtt = time.monotonic() - start
        if rtt / 2 > self.max_error:
            self._next = time.monotonic() + 1.0
            return
        r = reading(start, rtt, seconds + micros / 1e6)  # against the monotonic clock, see above
        self._anchor, self._measured = r.offset, start + rtt / 2
        self._next = self._measured + self.refresh
