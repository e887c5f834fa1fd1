"""One budget for the fleet: concurrent calls and calls per minute per endpoint, held in Redis.

Concurrency is a lease-based counting semaphore: a sorted set of lease tokens scored by their
expiry (Redis server time, so host clocks do not matter). A worker killed mid-call cannot leak
its slot for longer than the lease. The scripts do not read ``TIME`` on every call: each process
passes its estimate of Redis's time (worker/clock.py ``RedisClock``: one ``TIME`` every 30 s,
anchored to the monotonic clock, right within about half a round trip). An estimate a few ms off
is harmless: leases (the call's timeout plus 30 s) and waiter entries (4 s) expire a few ms early
or late; a pause for a Retry-After ends a few ms early or late; and a turn under the rate less
than 5 ms away is taken at once anyway (see ``_ACQUIRE``). With no good estimate (every reading
slower than 100 ms for 90 s) the scripts read ``TIME`` themselves.

Calls are counted for ``producer status`` (calls per minute) in each process and added to the
minute's counter with one ``INCRBY`` at most about once a second: inside a later acquire (no
command of its own), or, when the process makes no call for two seconds, by a timer, and at a
worker's clean shutdown (worker/app.py). A process killed with ``kill -9`` loses the count of its
last second or two of calls (never a call, a slot or a turn). The request rate (``vlm.requests_per_minute``, or under
``auto`` the quota the endpoint states or the controller learns from its 429s) is enforced in the
same acquire script (GCRA, see ``_ACQUIRE``): no round trip of its own, and a caller is given its
turn and sleeps until it instead of polling.

A thread that finds every slot taken registers as a waiter of its call's level (the step's
message priority, so a later step's call ranks before a head step's: depth-first, as the queue
serves messages) and blocks on that level's wake list (``BLPOP``); each release pushes one token
to the first level that has waiters, so a freed slot is taken within a Redis round trip rather
than after a polling sleep, and a slot is granted only when more are free than there are
waiters ahead of the caller (a fresh head-step call cannot barge past a woken step-3 call).
Head steps wait only while later steps' calls do, and those are finite per image.

Woken waiters are what let a fleet run more threads than ``max_concurrency``: the
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
import threading
import time
import uuid
import weakref
from collections.abc import Iterator

import redis

from worker import adaptive
from worker.clients.factory import GEMINI_DEFAULT_BASE_URL, OPENAI_DEFAULT_BASE_URL
from worker.errors import ClientError, RateLimited, TimedOut
from worker.keys import PRIORITY_STEPS
from worker.keys import budget_key as _key
from worker.spec import VLMSpec
from worker.stepdefs import PRIORITY_BY_NAME, PRIORITY_HEAD

log = logging.getLogger("refexp.worker")

# Redis's time in every script: the caller's estimate when it passed one (worker/clock.py
# ``RedisClock``: one TIME per process every 30 s instead of one per call), else read here.
_CLOCK = """
local function clock(given)
  local t = tonumber(given)
  if t and t > 0 then
    return t
  end
  t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end
"""
# Waiting threads are kept per priority level (the message priorities, worker/keys.py
# PRIORITY_STEPS, lowest number first), each level with a sorted set of waiter tokens (scored by
# when the entry lapses unless refreshed) and a wake list its waiters block on. A free slot is
# owed to the waiters of better levels first: a caller gets one only if more slots are free than
# there are waiters ahead of it, and a release wakes the first level that has waiters.
# Shared Lua: whether any level has a waiter entry (one EXISTS: the scripts skip the levels when
# none has, which is every call while threads do not outnumber slots); count a level's live
# waiters (one ZCOUNT; lapsed entries, left by a killed waiter, are pruned when a waiter
# registers at that level, or go with the key a minute after the last one); wake the first
# level with waiters.
# KEYS layout of both scripts after their own keys: waiters_1..waiters_n, wake_1..wake_n.
_LEVELS = _CLOCK + """
local function waiting(k, now)
  -- Live entries only (scored by when they lapse): one ZCOUNT, no pruning on every look. A
  -- level's lapsed entries are pruned when a waiter registers there.
  return redis.call('ZCOUNT', k, '(' .. now, '+inf')
end
local function anyone_waiting(base, n)
  local keys = {}
  for i = 1, n do
    keys[i] = KEYS[base + i]
  end
  return redis.call('EXISTS', unpack(keys)) > 0
end
local function wake_first(base, n, now, maxc)
  for i = 1, n do
    if waiting(KEYS[base + i], now) > 0 then
      local w = KEYS[base + n + i]
      -- The list is made by this push when it returns 1 (waiters empty it as they wake): its
      -- TTL is set then; trimmed only when it outgrows the limit.
      local len = redis.call('RPUSH', w, 1)
      if len == 1 then
        redis.call('EXPIRE', w, 60)
      elseif len > maxc then
        redis.call('LTRIM', w, -maxc, -1)
      end
      return
    end
  end
end
"""
# Adds n calls to this minute's counter (KEYS[2]). The counter is a new key each minute: the add
# that makes it (INCRBY returns n) sets its TTL, and the leases' (KEYS[1]) TTL and pruning ride on
# it (once a minute while calls are made); a lease never outlives its own expiry, so a TTL renewed
# once a minute to a lease and two minutes outlives every live one. The rate's next turn must
# outlive the calls too: under a fixed rate nothing else renews the state's (KEYS[3]) TTL (set
# when the hash was made), and a lost ``tat`` gives turns a second time.
_COUNTING = """
local function count(n, now, lease, stats_ttl, rated, state_ttl)
  if redis.call('INCRBY', KEYS[2], n) ~= n then
    return false
  end
  redis.call('EXPIRE', KEYS[2], stats_ttl)
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  redis.call('EXPIRE', KEYS[1], math.ceil(lease) + 120)
  if rated then
    redis.call('EXPIRE', KEYS[3], state_ttl)
  end
  return true
end
"""
# KEYS: leases, this minute's call counter, the controller's state hash (worker/adaptive.py; it
# also holds the request rate's theoretical arrival time, ``tat``), the levels. ARGV: lease
# seconds, max concurrency (0 = auto: the controller's limit, ARGV[7] until it has one), token,
# stats TTL, the caller's level (1-based), waiter entry seconds, the initial limit, the fixed
# request rate (calls/s, 0 = none), the turn under the rate already reserved for this call
# (server seconds, '0' = none), the rate's horizon (seconds), the state's TTL, the turn's slack
# (seconds: a reserved turn the call comes back for later than this is void, see below), the
# calls to count if a slot is granted (this one and the ones the process has not counted yet,
# ``FleetBudget._take_counts``; 0: count nothing, the process keeps this call for a later add),
# Redis's time as the caller estimates it ('0': read TIME).
# Returns {code, ms}: 1 a slot; 0 wait to be woken; -1 the controller pauses the fleet for a
# stated Retry-After (ms left: the caller's reserved turn, if any, is void); -2 the rate's turns
# are reserved past the horizon (try again in ms); {2, ms, turn} a turn under the rate is
# reserved for this call in ms (come back then, with the turn).
#
# The rate is GCRA (a token bucket kept as one number): each call's turn is the previous turn
# plus 1 / rate, so calls leave spaced by 1 / rate and no window of any length sees more than
# its share, which keeps both a token-bucket quota (OpenAI) and a sliding-minute one (Gemini).
# A caller is given its turn at once and sleeps until it, one script run for the wait instead of
# polling; turns are given at most `horizon` seconds ahead, so a lowered rate applies soon. A
# turn is given only when a slot is free, and used when it comes or not at all: a call that
# found every slot taken at its turn and got one later takes a new turn, else every call that
# waited for a slot so would leave at once when slots free, beyond the rate (the turn it
# missed is lost, which errs low).
_ACQUIRE = _LEVELS + _COUNTING + """
local now = clock(ARGV[14])
local n = (#KEYS - 3) / 2
local maxc = tonumber(ARGV[2])
local me = tonumber(ARGV[5])
local rate = tonumber(ARGV[8])
local ctl = {}
if maxc == 0 or rate > 0 then
  ctl = redis.call('HMGET', KEYS[3], 'limit', 'pause_until', 'rate_limit', 'tat')
  if maxc == 0 then
    maxc = math.max(1, math.floor(tonumber(ctl[1] or ARGV[7])))
    local pause = tonumber(ctl[2] or '0')
    if pause > now then
      return {-1, math.ceil((pause - now) * 1000)}
    end
    local learned = tonumber(ctl[3] or '0')
    if learned > 0 and (rate <= 0 or learned < rate) then
      rate = learned
    end
  end
end
-- Live leases only: lapsed ones (a killed holder's) are not counted, and pruned once a minute.
local busy = redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
local free = maxc - busy
-- Nobody waiting (the usual case): one EXISTS instead of pruning and counting every level.
local anyone = anyone_waiting(3, n)
local ahead = 0
if anyone then
  for i = 1, me - 1 do
    ahead = ahead + waiting(KEYS[3 + i], now)
  end
end
local mine = KEYS[3 + me]
if free > ahead then
  -- A turn under the rate is given only to a call a slot is free for: one that waits for a
  -- slot takes no turn (waiters retrying would give the rate away), and one whose turn passed
  -- while it waited for a slot takes a new one.
  local turn = tonumber(ARGV[9])
  if rate > 0 and (turn <= 0 or now > turn + tonumber(ARGV[12])) then
    local tat = math.max(tonumber(ctl[4] or '0'), now)
    local wait = tat - now
    local horizon = tonumber(ARGV[10])
    if wait > horizon then
      return {-2, math.ceil((wait - horizon) * 1000)}
    end
    if redis.call('HSET', KEYS[3], 'tat', tostring(tat + 1 / rate)) == 1 then
      redis.call('EXPIRE', KEYS[3], tonumber(ARGV[11]))
    end
    -- A turn less than 5 ms away is taken now: the times the processes pass differ by about
    -- that much (each estimate is off by up to half a round trip, and a thread reads it a moment
    -- before its script runs), and a call that slept a few ms would only ask again. It lets a
    -- window see at most (0.005 + e) * rate calls more than its share, e being how far ahead of
    -- Redis's time a process's estimate runs: about 0.1 ms on a LAN (0.05 calls more at 10
    -- calls/s), up to 50 ms over a slow link (RedisClock uses no reading with a round trip over
    -- 100 ms), more until the next reading (30 s) after Redis's own clock is stepped.
    if wait > 0.005 then
      return {2, math.ceil(wait * 1000), tostring(tat)}
    end
  end
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[3])
  -- Calls are counted in batches (at most about once a second per process); the add that makes
  -- a minute's counter also renews the TTLs and prunes the leases (``count``). The first lease
  -- of an idle fleet renews the leases' TTL too (the set may be new).
  local calls = tonumber(ARGV[13])
  local fresh = calls > 0 and count(calls, now, tonumber(ARGV[1]), tonumber(ARGV[4]), rate > 0,
                                    tonumber(ARGV[11]))
  if busy == 0 and not fresh then
    redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1])) + 120)
  end
  if anyone then
    redis.call('ZREM', mine, ARGV[3])
    if free > 1 then
      wake_first(3, n, now, maxc)
    end
  end
  return {1, 0}
end
redis.call('ZREMRANGEBYSCORE', mine, '-inf', now)
redis.call('ZADD', mine, now + tonumber(ARGV[6]), ARGV[3])
redis.call('EXPIRE', mine, math.ceil(tonumber(ARGV[6])) + 60)
if free > 0 then
  wake_first(3, n, now, maxc)
end
return {0, 0}
"""
# KEYS: leases, the levels. ARGV: token, max concurrency (the wake lists' cap), hold seconds,
# '1' when the caller removed the lease already (``FleetBudget._free``: someone waits, wake them),
# Redis's time as the caller estimates it ('0' or none: read TIME).
# With nobody waiting, nothing is pushed (a waiter registers in the same script that refuses it,
# so a release always sees it). A lease that lapsed and was pruned wakes nobody (its slot was
# handed on when it lapsed); one that lapsed unpruned wakes a waiter that finds no slot and
# waits again. A call the client abandoned (a timeout) is not released but held `hold` seconds
# more (only while its lease is live): the server is likely still working on it.
# The usual release does not run this script: ``FleetBudget._free`` sends the ZREM and the
# EXISTS in a plain pipeline, and runs the script only to wake a waiter it found.
_RELEASE = _LEVELS + """
local n = (#KEYS - 1) / 2
local hold = tonumber(ARGV[3])
if hold > 0 then
  local now = clock(ARGV[5])
  if tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or '0') > now then
    redis.call('ZADD', KEYS[1], 'XX', now + hold, ARGV[1])
  end
  return 0
end
if (ARGV[4] == '1' or redis.call('ZREM', KEYS[1], ARGV[1]) == 1) and anyone_waiting(1, n) then
  local now = clock(ARGV[5])
  wake_first(1, n, now, tonumber(ARGV[2]))
end
return 0
"""
# KEYS: leases, this minute's call counter, the controller's state hash. ARGV: calls to add,
# Redis's time as the caller estimates it ('0': read TIME), lease seconds, stats TTL, '1' under a
# fixed rate, the state's TTL. Adds the calls a process counted but had no later acquire to add
# them with (it made no more calls for a while, or it is shutting down).
_COUNT = _CLOCK + _COUNTING + """
count(tonumber(ARGV[1]), clock(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5] == '1',
      tonumber(ARGV[6]))
return 0
"""
_IN_FLIGHT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"""
STATS_TTL = 600
#: Seconds ahead a call's turn under the request rate may be reserved: beyond it a caller
#: sleeps and asks again, so a rate lowered meanwhile governs the calls not yet given a turn.
RATE_HORIZON = 30.0
#: Seconds after its turn under the rate a call may still leave on it (a sleep's overshoot, a
#: round trip); a call later than that (it waited for a slot) takes a new turn.
RATE_TURN_SLACK = 0.25
#: Longest a waiting thread blocks before trying again: the bound on noticing an expired lease
#: of a dead holder (whole seconds: Redis before 6.0 takes only integer BLPOP timeouts).
WAIT_POLL = 1
#: Seconds a process keeps the calls it made before adding them to the minute's counter with its
#: next acquire (one ``INCRBY`` inside the script, not an ``INCR`` per call); a process that
#: makes no call for twice as long adds them with a script of its own.
COUNT_INTERVAL = 1.0
#: Seconds a process keeps trying to add calls Redis refused to count (``FleetBudget.flush_counts``).
COUNT_GIVE_UP = 60.0
#: Levels of waiting, best first: the message priorities (a later step's call is served first).
LEVELS: tuple[int, ...] = PRIORITY_STEPS


def level_of(step: str) -> int:
    """The wait level (1-based, best first) of a call made for step ``step`` (its name, as
    ``VLMRequest.step`` carries it); a call of no known step waits with the head steps."""
    priority = PRIORITY_BY_NAME.get(step, PRIORITY_HEAD)
    return 1 + max(i for i, p in enumerate(LEVELS) if p <= priority)


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
    """Waits for a fleet-wide slot before each VLM call and counts calls and 429s per minute.

    ``max_concurrency`` is a number, or ``"auto"``: the fleet's controller (worker/adaptive.py)
    sets the limit, at most ``ceiling``, from the samples every process pushes once a second.
    """

    def __init__(
        self,
        client: redis.Redis,
        redis_url: str,
        *,
        endpoint_key: str,
        max_concurrency: int | str,
        requests_per_minute: int,
        lease_seconds: float,
        wait_poll: int = WAIT_POLL,
        ceiling: int = 256,
        controller_interval: float = adaptive.INTERVAL,
        count_interval: float = COUNT_INTERVAL,
    ):
        self.r = client
        self.endpoint = endpoint_id(endpoint_key)
        self.auto = max_concurrency == "auto"
        # 0 tells the acquire script to read the controller's limit.
        self.max_concurrency = 0 if self.auto else int(max_concurrency)
        self.ceiling = ceiling
        self.lease_seconds = lease_seconds
        self.wait_poll = wait_poll
        self._leases = _key(self.endpoint, "leases")
        self._state = _key(self.endpoint, "ctl")
        self._waiters = [_key(self.endpoint, "waiters", p) for p in LEVELS]
        self._wakes = [_key(self.endpoint, "wake", p) for p in LEVELS]
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._in_flight = client.register_script(_IN_FLIGHT)
        self._add_calls = client.register_script(_COUNT)
        # Redis's time for the scripts, estimated here (one TIME every 30 s, see RedisClock).
        # Imported here: worker.clock imports Celery and kombu, which the producer's commands
        # that read the budget (``producer status``) do not need.
        from worker.clock import RedisClock

        self.clock = RedisClock(client.time)
        # Calls granted but not yet added to the minute's counter (see _take_counts).
        self.count_interval = count_interval
        self._counts_lock = threading.Lock()
        self._pending = 0
        self._pending_since = 0.0  # monotonic: when the oldest pending call was counted
        self._count_timer: threading.Timer | None = None
        _LIVE.add(self)
        self.controller: adaptive.Controller | None = None
        self._paused_until = 0.0  # monotonic: this process's pause for a stated Retry-After (auto)
        if self.auto:
            self.controller = adaptive.Controller(
                client, samples_key=_key(self.endpoint, "samples"), state_key=self._state,
                ceiling=ceiling, label=endpoint_key, interval=controller_interval)
        # Calls per second under a fixed vlm.requests_per_minute (0 = none): spaced evenly, so
        # no 60 s window holds more than the stated number.
        self.fixed_rate = requests_per_minute / 60.0
        self._stated = 0.0  # the quota this process last saw stated (auto): a change is pushed at once

    @contextlib.contextmanager
    def slot(self, step: str = "") -> Iterator[None]:
        """Hold one of the endpoint's concurrency slots (and a turn under its request rate) for one call made
        for ``step`` (a step name): while slots are short, a later step's waiting call gets the
        next free one before a head step's (the order the queue serves messages in).

        A call that times out (``TimedOut``) keeps its slot a while longer: the server is
        likely still working on it (``abandoned_hold``)."""
        token = uuid.uuid4().hex
        level = level_of(step)
        levels = [*self._waiters, *self._wakes]
        # A waiter's entry lapses unless its next try refreshes it: a waiter that died holds
        # no slot back from the levels behind it for longer than this.
        entry_seconds = 2 * self.wait_poll + 2
        waited = False
        reserved = "0"  # this call's turn under the request rate (server seconds; "0": none)
        while True:
            if self.controller is not None:
                # Waiting threads push too: a process whose every thread waits (a pause, turns
                # under the rate) would otherwise hold back the samples that decide for them.
                self.controller.maybe_flush()
            while (left := self._paused_until - time.monotonic()) > 0:
                reserved = "0"  # a 429 here paused this process: a turn given before is void
                time.sleep(min(left, self.wait_poll) * (0.5 + random.random() / 2))
                if self.controller is not None:
                    self.controller.maybe_flush()
            carried = self._take_counts()
            try:
                code, ms, *turn = self._acquire(
                    keys=[self._leases, _stats_key(self.endpoint, "calls"), self._state, *levels],
                    args=[self.lease_seconds, self.max_concurrency, token, STATS_TTL, level, entry_seconds,
                          min(adaptive.INITIAL_LIMIT, self.ceiling), self.fixed_rate, reserved, RATE_HORIZON,
                          adaptive.STATE_TTL, RATE_TURN_SLACK, carried + 1 if carried else 0, self._now_arg()])
            except BaseException:
                self._keep_counts(carried)
                raise
            if code != 1:
                self._keep_counts(carried)
            elif not carried:
                self._keep_counts(1)  # this call: added with a later acquire
            if code == 1:
                if self._paused_until <= time.monotonic():
                    break
                # Another thread's call drew a 429 while this one was being granted: the quota
                # is spent, so this call would draw one too. Hand the slot back and wait.
                self._free(token, levels, 0)
                continue
            if code == 2:  # our turn under the rate is in `ms`: sleep until then, exactly
                reserved = turn[0].decode() if isinstance(turn[0], bytes) else str(turn[0])
                time.sleep(ms / 1000)
                continue
            if code == -1:  # the fleet is paused for a Retry-After: a turn given before is void
                reserved = "0"
                time.sleep(min(ms / 1000, self.wait_poll) * (0.5 + random.random() / 2))
                continue
            if code == -2:  # turns are given out past the horizon: ask again later
                time.sleep(min(ms / 1000, RATE_HORIZON / 2) * (0.5 + random.random() / 2))
                continue
            if not waited and self.controller is not None:
                self.controller.sampler.waited()  # demand is above the limit: it may grow
            waited = True
            # A wake token left for a waiter of our level that has gone wakes us at once: one
            # more try, no harm.
            self.r.blpop([self._wakes[level - 1]], timeout=self.wait_poll)
        if self.controller is not None:
            self.controller.sampler.sent()
        started = time.monotonic()
        hold = 0.0
        try:
            yield
        except TimedOut:
            hold = self.abandoned_hold(time.monotonic() - started)
            self._note("timeout")
            raise
        except RateLimited as exc:
            self._note("429", exc.retry_after)
            self.note_stated(exc.stated_rate)
            if self.controller is not None and exc.retry_after:
                # This process stops at once; the fleet at the push below, not a second later.
                until = time.monotonic() + float(exc.retry_after)
                if until > self._paused_until + 0.5:
                    self._paused_until = until
                    self.controller.force_next()
            raise
        except ClientError as exc:
            if exc.status == 503:
                self._note("503", exc.retry_after)
            raise
        else:
            if self.controller is not None:
                self.controller.sampler.answered(step, time.monotonic() - started)
        finally:
            try:
                self._free(token, levels, hold)
            except redis.exceptions.RedisError as exc:
                # The call is made and paid for: its answer must not be lost because Redis is
                # unusable right now. The slot frees itself when its lease runs out.
                log.warning("could not release a budget slot (%s: %s); it frees itself within %.0f s",
                            type(exc).__name__, exc, self.lease_seconds)
            if self.controller is not None:
                self.controller.maybe_flush()

    def _free(self, token: str, levels: list[str], hold: float) -> None:
        """Give a slot back (or hold it ``hold`` seconds more: an abandoned call).

        Usually two commands in a plain pipeline, no script: remove the lease, then look for
        waiters (one ``EXISTS`` over the levels). Only when someone waits does a second round
        trip run the release script to wake the first level with waiters. No transaction is
        needed: Redis runs the two in order, so a waiter that registered before the ``ZREM``
        is seen by the ``EXISTS``, and one whose acquire runs after the ``ZREM`` finds the slot
        free (and takes it, or wakes the waiters ahead of it itself). It was the script's
        ``EVALSHA`` on every call (issue 16)."""
        cap = self.max_concurrency or self.ceiling
        if hold > 0:
            self._release(keys=[self._leases, *levels], args=[token, cap, hold, 0, self._now_arg()])
            return
        pipe = self.r.pipeline(transaction=False)
        pipe.zrem(self._leases, token)
        pipe.exists(*self._waiters)
        removed, waiting = pipe.execute()
        if removed and waiting:
            self._release(keys=[self._leases, *levels], args=[token, cap, 0, 1, self._now_arg()])

    def _now_arg(self) -> str:
        """Redis's time by this process's estimate, for a script's ARGV ('0': the script reads TIME)."""
        now = self.clock.now()
        return "0" if now is None else f"{now:.6f}"

    def _take_counts(self) -> int:
        """The calls this process granted but has not added to the minute's counter yet, when the
        oldest is ``count_interval`` old (the acquire adds them with its own: one ``INCRBY`` in its
        script, about once a second per process instead of an ``INCR`` per call); else 0."""
        with self._counts_lock:
            if not self._pending or time.monotonic() - self._pending_since < self.count_interval:
                return 0
            n, self._pending = self._pending, 0
            return n

    def _keep_counts(self, n: int, since: float | None = None, retry_in: float = 0.0) -> None:
        """Keep ``n`` calls for a later add (this call, or counts an acquire took but did not add:
        it was refused a slot, or Redis failed), and make sure they are added even if this process
        makes no other call: a timer adds them after twice ``count_interval``. ``since``: when
        the oldest of them was counted (monotonic; default now); ``retry_in``: the least delay
        of the timer (Redis refused to add them just now)."""
        if not n:
            return
        since = time.monotonic() if since is None else since
        with self._counts_lock:
            self._pending_since = since if not self._pending else min(self._pending_since, since)
            self._pending += n
            self._arm_count_timer(retry_in)

    def _arm_count_timer(self, least: float = 0.0) -> None:
        """(Holding the counts' lock.) One timer at a time, due when the oldest pending call is
        twice ``count_interval`` old: a busy process's acquires take the counts before that, so
        the timer adds nothing then and only re-arms."""
        if self._count_timer is not None:
            return
        delay = max(0.05, least, self._pending_since + 2 * self.count_interval - time.monotonic())
        self._count_timer = threading.Timer(delay, self._on_count_timer)
        self._count_timer.daemon = True
        self._count_timer.start()

    def _on_count_timer(self) -> None:
        with self._counts_lock:
            self._count_timer = None
            if not self._pending:
                return
            if time.monotonic() - self._pending_since < 1.5 * self.count_interval:
                self._arm_count_timer()  # an acquire took the old counts; these are newer
                return
        self.flush_counts()

    def flush_counts(self, *, retry: bool = True) -> None:
        """Add every call this process counted to the minute's counter now (one script: the idle
        timer, and a clean shutdown, ``flush_all_counts``). When Redis refuses, the timer tries
        again (``retry``) for up to ``COUNT_GIVE_UP`` seconds: calls per minute of a minute long
        past are not worth a process that keeps retrying."""
        with self._counts_lock:
            n, self._pending, since = self._pending, 0, self._pending_since
        if not n:
            return
        try:
            self._add_calls(keys=[self._leases, _stats_key(self.endpoint, "calls"), self._state],
                            args=[n, self._now_arg(), self.lease_seconds, STATS_TTL,
                                  "1" if self.fixed_rate > 0 else "0", adaptive.STATE_TTL])
        except redis.exceptions.RedisError as exc:
            again = retry and time.monotonic() - since < COUNT_GIVE_UP
            log.warning("could not add %d VLM calls to the calls-per-minute count (%s: %s)%s", n,
                        type(exc).__name__, exc, "; trying again" if again else "; they are not counted")
            if again:
                self._keep_counts(n, since, retry_in=max(1.0, 2 * self.count_interval))

    def abandoned_hold(self, elapsed: float) -> float:
        """Seconds a timed-out call keeps its slot after the client gave up.

        All we know is that the server had the call for ``elapsed`` seconds and had not
        answered: its latency is at least that. Assuming it needs as long again (doubling, the
        usual guess when only a lower bound is known) covers the common case of a queue that
        made every call somewhat slower than the timeout (the issue's 8 s calls against a 5 s
        timeout); the hold never outlasts the call's own lease.
        """
        return max(0.0, min(elapsed, self.lease_seconds - elapsed))

    def note_stated(self, rate: float | None) -> None:
        """The endpoint stated its request quota (requests per second) with an answer or a 429:
        under ``auto`` the controller keeps the fleet to it; a new value is pushed at once."""
        if self.controller is None or not rate:
            return
        self.controller.sampler.stated(rate)
        if abs(rate - self._stated) > 1e-3 * rate:
            self._stated = rate
            self.controller.force_next()

    def _note(self, kind: str, retry_after: float | None = None) -> None:
        if self.controller is not None:
            self.controller.sampler.overloaded(kind, retry_after)

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


#: Every budget of this process, for ``flush_all_counts``.
_LIVE: weakref.WeakSet[FleetBudget] = weakref.WeakSet()


def flush_all_counts() -> None:
    """Add the calls every budget of this process still holds to the minute's counters: at a
    worker's clean shutdown (worker/app.py), so ``producer status`` counts every call made. A
    process killed with ``kill -9`` loses the calls of its last second or two."""
    for budget in list(_LIVE):
        budget.flush_counts(retry=False)


def controller_state(client: redis.Redis, endpoint_key: str) -> dict | None:
    """The ``auto`` controller's limit, latency floor and last reason (None: it never ran)."""
    return adaptive.read_state(client, _key(endpoint_id(endpoint_key), "ctl"))


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
