"""Riding out a Redis that stalls, restarts or drops off the network under the producer.

The producer is a long-lived client of a Redis it does not own: the fleet's Redis may pause (a
snapshot fork on a big dataset, a paused VM, ``kill -STOP``), restart or fail over while an
enqueue publishes or a ``wait`` polls. Every command the producer sends to run state is
idempotent (HSET / HDEL of marks, HLEN, HMGET), so a command that timed out is simply sent again:
the client built here has a socket timeout (nothing blocks for ever) and redis-py's ``Retry``
with exponential backoff, for up to ``patience()`` seconds (15 min by default), with one note
when Redis stops answering and one when it answers again, instead of a traceback.

Publishing goes through kombu and the result backend, which get the same socket timeout and give
up quickly (``publishing_conf``); ``submit.submit`` then resumes the enqueue (``OUTAGE_ERRORS``)
once this client sees Redis answer again.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from urllib.parse import parse_qsl, urlencode, urlsplit

import kombu.exceptions
import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from worker import settings

#: Seconds a command may wait for its reply (redis-py 8's default): every producer command is a
#: few milliseconds of Redis work, so a reply this late means the server is not answering.
SOCKET_TIMEOUT = 5.0
CONNECT_TIMEOUT = 5.0
PATIENCE_ENV = "REFEXP_REDIS_PATIENCE"
DEFAULT_PATIENCE = 900.0

#: What a publish or a command raises once Redis has been unreachable for longer than the
#: library's own retries allow (kombu wraps the transport's errors in OperationalError).
OUTAGE_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, kombu.exceptions.OperationalError)



def patience() -> float:
    """How long the producer waits for Redis before giving up (``REFEXP_REDIS_PATIENCE`` seconds)."""
    return settings.env_seconds(PATIENCE_ENV, DEFAULT_PATIENCE, minimum=1)


_SECRET_PARAMS = frozenset({"password", "pass", "passwd"})


def redact(url: str) -> str:
    """The URL without its credentials (user info and any ``password=`` query value), for
    messages and the lock file."""
    parts = urlsplit(url)
    out = url
    if "@" in parts.netloc:
        out = out.replace(parts.netloc, "***@" + parts.netloc.rsplit("@", 1)[1], 1)
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        query = urlencode([(k, "***" if k.lower() in _SECRET_PARAMS else v) for k, v in pairs], safe="*")
        if query != parts.query:
            out = out.replace("?" + parts.query, "?" + query, 1)
    return out


def _to_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class RedisGaveUp(redis.exceptions.ConnectionError):
    """Redis did not answer within the producer's patience."""


class Outage:
    """The producer's view of one Redis: answering, or not since when. Prints one note when it
    stops answering and one when it is back, however many connections and retries see it."""

    def __init__(self, url: str, *, note: Callable[[str], None] = _to_stderr, patience_s: float | None = None):
        self.url = redact(url)
        self.note = note
        self.patience = patience() if patience_s is None else patience_s
        self._since: float | None = None
        self._lock = threading.Lock()

    def __deepcopy__(self, memo: dict) -> Outage:
        return self  # redis-py deep-copies the Retry for every connection; the outage is shared

    @property
    def down_for(self) -> float | None:
        since = self._since
        return None if since is None else time.monotonic() - since

    def down(self, exc: BaseException) -> None:
        with self._lock:
            if self._since is None:
                self._since = time.monotonic()
                self.note(f"warning: Redis at {self.url} is not answering ({type(exc).__name__}: {exc}); "
                          f"waiting for it (up to {self.patience:.0f} s, {PATIENCE_ENV})")

    def up(self) -> None:
        if self._since is None:  # the common case: no lock taken
            return
        with self._lock:
            if self._since is not None:
                self.note(f"Redis at {self.url} answers again (after {time.monotonic() - self._since:.0f} s)")
                self._since = None

    def check(self, exc: BaseException) -> None:
        """Raise ``RedisGaveUp`` once Redis has been down for longer than the patience."""
        down_for = self.down_for
        if down_for is not None and down_for > self.patience:
            raise RedisGaveUp(f"Redis at {self.url} has not answered for {down_for:.0f} s "
                              f"({type(exc).__name__}: {exc})") from exc


class PatientRetry(Retry):
    """redis-py's ``Retry`` with exponential backoff, bounded by time (the outage's patience)
    rather than by a count, and reporting to an ``Outage``.

    redis-py nests retries (a command's retry reconnects through the connection's own retry, and
    a TCP connect succeeds against a stopped server, whose kernel still accepts), so only the
    outermost call of a thread says Redis is back: when a whole command got its reply.
    """

    _depth = threading.local()

    def __init__(self, outage: Outage):
        super().__init__(ExponentialWithJitterBackoff(base=0.2, cap=5.0), retries=-1)
        self.outage = outage

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):
        self._backoff.reset()
        failures = 0
        depth = getattr(self._depth, "n", 0)
        self._depth.n = depth + 1
        try:
            while True:
                try:
                    result = do()
                except self._supported_errors as error:
                    if is_retryable and not is_retryable(error):
                        raise
                    failures += 1
                    if with_failure_count:
                        fail(error, failures)
                    else:
                        fail(error)
                    self.outage.down(error)
                    self.outage.check(error)
                    time.sleep(self._backoff.compute(failures))
                else:
                    if depth == 0:
                        self.outage.up()
                    return result
        finally:
            self._depth.n = depth


def patient_client(url: str, outage: Outage | None = None) -> redis.Redis:
    """A Redis client whose commands wait out a stall or a restart (see the module docstring)."""
    outage = outage or Outage(url)
    return redis.Redis.from_url(url, socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=CONNECT_TIMEOUT,
                                health_check_interval=30, retry=PatientRetry(outage))


def outage_of(client: redis.Redis) -> Outage | None:
    """The ``Outage`` a client built by ``patient_client`` reports to (None for other clients)."""
    retry = client.get_retry()
    return retry.outage if isinstance(retry, PatientRetry) else None


def publishing_conf(app) -> dict:
    """Celery settings for the producer's publishing (``producer enqueue`` applies them with
    ``harden_publishing``; the workers keep the app's own).

    A publish to a Redis that stopped answering must neither block for ever (kombu's default
    socket timeout is none) nor block silently for long (the result backend, which a chord
    publish goes through for its counter, waits 120 s per try, 20 tries): both get the state
    client's socket timeout, and the backend gives up at once, so the enqueue's own loop
    (``submit._enqueue_through_outages``) notes the outage, waits for Redis and goes on.
    kombu keeps Celery's default publish retry policy (three quick tries).
    """
    backend_options = dict(app.conf.result_backend_transport_options or {})
    backend_options["retry_policy"] = {**backend_options.get("retry_policy", {}), "max_retries": 0}
    return {
        "broker_transport_options": {**(app.conf.broker_transport_options or {}),
                                     "socket_timeout": SOCKET_TIMEOUT, "socket_connect_timeout": CONNECT_TIMEOUT},
        "redis_socket_timeout": SOCKET_TIMEOUT,
        "redis_socket_connect_timeout": CONNECT_TIMEOUT,
        "result_backend_transport_options": backend_options,
    }


def harden_publishing(app) -> None:
    """Apply ``publishing_conf`` to this process's app (before its first publish: the backend
    reads its settings when it is first built)."""
    app.conf.update(publishing_conf(app))
