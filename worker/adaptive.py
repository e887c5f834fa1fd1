"""``vlm.max_concurrency: auto``: one controller for the fleet finds the endpoint's capacity.

Why a controller: the right number of calls in flight is what the endpoint serves at its base
latency. Below it a GPU server or a paid quota idles; above it a self-hosted server queues and
preempts (latency grows, then timeouts) and a hosted API answers 429. It moves during a run.

**Signals** (docs/architecture.md, "Adaptive concurrency", says why this design): each worker
process adds up what its calls saw (``Sampler``), per step since steps differ in latency: calls
answered and the sum of their latencies, 429s, 503s, timeouts, the longest Retry-After. Once a
second at most, on the way out of a call, a process pushes that sum to a Redis list in the same
script that asks whether an update is due; the process that finds it due holds the update until
the next one is (a lease of one interval, an epoch guards the write), folds every process's
samples and writes the new state. Nothing is sent per call.

**The rule** (``decide``), a gradient limiter in the manner of Netflix's Gradient2 and TCP
Vegas, with AIMD's cut for explicit overload:

- the latency floor of each step is the lowest interval mean seen, drifting slowly towards what
  is seen now (so a genuinely slower endpoint is not read as queueing for ever);
- ``ratio`` = latency / floor, averaged over steps weighted by calls; ``queued`` = Vegas's
  estimate of the calls waiting at the server, ``in flight x (1 - 1 / ratio)``;
- 429, 503 or a timeout: cut to 0.7 (AIMD's multiplicative decrease); a stated Retry-After also
  pauses the fleet's new calls until then;
- ``queued`` above beta (30 % of the limit, at least 1.5 calls): the limit becomes ``limit / ratio``,
  the concurrency at which the endpoint answers at its floor (Gradient2's ``limit x
  gradient``), plus alpha, at most halving it;
- ``queued`` below alpha (10 % of the limit, at least 0.5 calls) and the limit in use (calls waited for
  a slot, or the answered ones kept 80 % of it busy): grow, doubling while no congestion was
  seen yet (slow start), else by ``sqrt(limit) / 2``;
- after a change nothing is decided on latency until the calls started under the new limit
  have come back (``settle``: a latency and an interval), so one queue is not cut twice;
- for a minute after a 429 or 503 (a quota's window is a minute) the limit grows by one at a
  time up to the quota's concurrency: 0.9 x the rate the endpoint accepted over the last minute
  (an average over about a minute of answered calls per second) x the latency (Little's law),
  so the fleet runs under a per-minute quota instead of walking back into it;
- the limit moves in whole calls, and latency is read over at least 3 answers: at a small limit
  (K = 4) one queued call is the whole band between growing and cutting.

**The request rate** (``decide_rate``): a per-minute quota is a rate, which a concurrency limit
does not keep to. The controller keeps one, enforced by the budget's acquire script: the quota
the endpoint states (OpenAI's ``x-ratelimit-limit-requests`` on every answer, Gemini's
``QuotaFailure`` in a 429) at 0.95 of it; else, from the first 429, 0.9 of the calls the
endpoint accepted over the last minute (under a per-minute quota, the quota itself).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field

import redis

log = logging.getLogger("refexp.worker")

#: Seconds between a process's sample pushes, and between two updates of the fleet's limit.
INTERVAL = 1.0
#: Where ``auto`` starts: low, so the first latencies seen are the floor and not a queue.
INITIAL_LIMIT = 4.0
# Calls queued at the server (Vegas's estimate: in flight x (1 - floor / latency)): below alpha
# the limit grows, above beta it is cut, between them it stays. A few queued calls keep a batch
# server full across the gap between one call's answer and the next call's arrival.
# The minimums sit half-way between whole calls: at a small limit the estimate is a whole number
# of calls give or take the noise of a few answers, so K + 1 in flight (one queued) holds, K
# grows and K + 2 is cut back, instead of a band two calls wide that the limit crossed both ways.
ALPHA, ALPHA_MIN = 0.10, 0.5  # of the limit, at least
BETA, BETA_MIN = 0.30, 1.5
USED_TO_GROW = 0.8  # the limit grows only while it is in use
CUT = 0.7  # multiplicative decrease on 429 / 503 / timeouts
QUOTA_MEMORY = 60.0  # seconds a refusal (429 / 503) caps the growth
QUOTA_MARGIN = 0.9  # of the rate the endpoint accepted
RATE_WINDOW = 60.0  # seconds of the accepted-rate average (a quota's window)
MAX_STEP_CUT = 0.5  # a latency-driven cut keeps at least this much of the limit
FLOOR_DRIFT = 0.002  # per update, towards the latency seen (about 11 % a minute)
MIN_CALLS_FOR_FLOOR = 3
MIN_CALLS_TO_DECIDE = 3  # answers (summed over intervals) before latency may move the limit
# The request rate (``rate_limit``, enforced in the budget's acquire script): a stated quota is
# kept to within this margin; one learned from 429s is this share of the calls the endpoint
# accepted over the last minute (a quota's window); a learned rate nothing has refused for
# RATE_PROBE_AFTER seconds, and in use, is raised by RATE_PROBE_STEP (up to a stated quota).
RATE_MARGIN_STATED = 0.95
RATE_MARGIN_LEARNED = 0.9
RATE_MAX_CUT = 0.2  # of a rate already kept to, per refusal
RATE_SETTLE = 10.0  # seconds after a rate change before 429s may lower it again
RATE_PROBE_AFTER = 60.0  # a quota's window: what others used of it has left by then
RATE_PROBE_STEP = 1.1
STATE_TTL = 86_400  # the learned state outlives a quiet day, not a forgotten endpoint


@dataclass
class Sample:
    """What one process's calls saw since its last push (or, folded, the fleet's in an interval)."""

    steps: dict[str, list[float]] = field(default_factory=dict)  # step -> [calls answered, latency sum]
    r429: int = 0
    r503: int = 0
    timeouts: int = 0
    retry_after: float = 0.0
    waited: int = 0  # calls that found the limit reached and waited for a slot
    sent: int = 0  # calls that left for the endpoint (a slot taken)
    stated: float = 0.0  # the lowest request quota the endpoint stated (requests/s; 0 = none)

    def add(self, other: Sample) -> None:
        for step, (n, s) in other.steps.items():
            acc = self.steps.setdefault(step, [0, 0.0])
            acc[0] += n
            acc[1] += s
        self.r429 += other.r429
        self.r503 += other.r503
        self.timeouts += other.timeouts
        self.retry_after = max(self.retry_after, other.retry_after)
        self.waited += other.waited
        self.sent += other.sent
        self.stated = _lowest(self.stated, other.stated)

    def empty(self) -> bool:
        return not self.steps and not (self.r429 or self.r503 or self.timeouts or self.waited or self.sent
                                       or self.stated)

    def dumps(self) -> str:
        return json.dumps({"s": self.steps, "e": [self.r429, self.r503, self.timeouts], "ra": self.retry_after,
                           "w": self.waited, "n": self.sent, "q": self.stated}, separators=(",", ":"))

    @classmethod
    def loads(cls, raw: str | bytes) -> Sample:
        d = json.loads(raw)
        r429, r503, timeouts = d.get("e", [0, 0, 0])
        return cls(steps={k: [v[0], v[1]] for k, v in d.get("s", {}).items()}, r429=r429, r503=r503,
                   timeouts=timeouts, retry_after=float(d.get("ra") or 0.0), waited=int(d.get("w", 0)),
                   sent=int(d.get("n", 0)), stated=float(d.get("q") or 0.0))


def _lowest(a: float, b: float) -> float:
    """The lower of two stated rates, 0 meaning none stated."""
    return min(a, b) if a and b else (a or b)


class Sampler:
    """A process's running sum of its calls' outcomes (thread-safe; ``take`` empties it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._s = Sample()
        # A stated Retry-After as a deadline on this host's monotonic clock: pushed as the
        # seconds left then, so a push delayed after the 429 does not stretch the fleet's pause.
        self._retry_until = 0.0

    def answered(self, step: str, latency: float) -> None:
        with self._lock:
            acc = self._s.steps.setdefault(step, [0, 0.0])
            acc[0] += 1
            acc[1] += latency

    def waited(self) -> None:
        """A call found the limit reached: demand is above the limit."""
        with self._lock:
            self._s.waited += 1

    def sent(self) -> None:
        """A call left for the endpoint: the accepted rate is sent minus refused."""
        with self._lock:
            self._s.sent += 1

    def stated(self, rate: float | None) -> None:
        """The endpoint stated its request quota (requests per second) with an answer or a 429."""
        if rate:
            with self._lock:
                self._s.stated = _lowest(self._s.stated, float(rate))

    def overloaded(self, kind: str, retry_after: float | None = None) -> None:
        """``kind``: ``429``, ``503`` or ``timeout``."""
        with self._lock:
            if kind == "429":
                self._s.r429 += 1
            elif kind == "503":
                self._s.r503 += 1
            else:
                self._s.timeouts += 1
            if retry_after:
                self._retry_until = max(self._retry_until, time.monotonic() + float(retry_after))

    def take(self) -> Sample:
        with self._lock:
            s, self._s = self._s, Sample()
            if self._retry_until:
                s.retry_after = max(0.0, self._retry_until - time.monotonic())
                self._retry_until = 0.0
            return s


@dataclass
class State:
    """The fleet's controller state, as kept in Redis (``refexp:ep:<id>:ctl``)."""

    limit: float = INITIAL_LIMIT
    floors: dict[str, float] = field(default_factory=dict)  # step -> latency floor (s)
    slow_start: bool = True
    settle_until: float = 0.0
    pause_until: float = 0.0
    reason: str = "start"
    refused_at: float = 0.0  # when the endpoint last refused (429 / 503): a quota is near
    refused_limit: float = 0.0  # the concurrency the accepted rate allows, set at a refusal
    rate: float = 0.0  # answered calls per second, averaged over about RATE_WINDOW
    changed_at: float = 0.0
    pending: list[float] = field(default_factory=lambda: [0, 0.0])  # answers, sum of ratios, not yet decided on
    rate_limit: float = 0.0  # requests per second the fleet keeps to (0 = none)
    rate_source: str = ""  # "stated" (the endpoint said) or "learned" (from its 429s)
    rate_reason: str = ""
    rate_changed_at: float = 0.0
    rate_stated: float = 0.0  # the quota the endpoint last stated, requests per second
    accepted: list[list[float]] = field(default_factory=list)  # [when, calls sent and not refused]
    # Not kept: set when a stated rate first applies, written as the rate's next turn (``tat``,
    # which the acquire script owns), so the calls sent before the rate was known count against it.
    first_turn: float = 0.0

    def to_redis(self) -> dict[str, str]:
        return {"limit": f"{self.limit:.3f}", "floors": json.dumps(self.floors), "slow_start": int(self.slow_start),
                "settle_until": f"{self.settle_until:.3f}", "pause_until": f"{self.pause_until:.3f}",
                "reason": self.reason, "changed_at": f"{self.changed_at:.3f}",
                "refused_at": f"{self.refused_at:.3f}", "refused_limit": f"{self.refused_limit:.3f}",
                "rate": f"{self.rate:.3f}", "pending": json.dumps(self.pending),
                "rate_limit": f"{self.rate_limit:.6f}", "rate_source": self.rate_source,
                "rate_reason": self.rate_reason, "rate_changed_at": f"{self.rate_changed_at:.3f}",
                "rate_stated": f"{self.rate_stated:.6f}", "accepted": json.dumps(self.accepted),
                **({"tat": f"{self.first_turn:.6f}"} if self.first_turn else {})}

    @classmethod
    def from_redis(cls, h: dict) -> State:
        g = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
             for k, v in h.items()}
        if "limit" not in g:
            return cls()
        return cls(limit=float(g["limit"]), floors=json.loads(g.get("floors") or "{}"),
                   slow_start=g.get("slow_start", "1") == "1", settle_until=float(g.get("settle_until") or 0),
                   pause_until=float(g.get("pause_until") or 0), reason=g.get("reason", ""),
                   changed_at=float(g.get("changed_at") or 0), refused_at=float(g.get("refused_at") or 0),
                   refused_limit=float(g.get("refused_limit") or 0), rate=float(g.get("rate") or 0),
                   pending=json.loads(g.get("pending") or "[0, 0.0]"),
                   rate_limit=float(g.get("rate_limit") or 0), rate_source=g.get("rate_source", ""),
                   rate_reason=g.get("rate_reason", ""), rate_changed_at=float(g.get("rate_changed_at") or 0),
                   rate_stated=float(g.get("rate_stated") or 0), accepted=json.loads(g.get("accepted") or "[]"))

    def floor(self) -> float:
        """The floor shown to users: the lowest of the steps' floors (0 before any call)."""
        return min(self.floors.values()) if self.floors else 0.0


def decide_rate(new: State, s: Sample, *, now: float, interval: float) -> bool:
    """Update ``new``'s request-rate limit from one interval's sample; whether it changed.

    A stated quota (OpenAI's ``x-ratelimit-limit-requests`` on every answer, Gemini's
    ``QuotaFailure`` in a 429) is kept to at once, before the first 429 where the endpoint says
    it on answers. Without one, the first 429 tells the quota by the calls the endpoint accepted
    over the last minute: under a per-minute quota that is the quota itself, whether the fleet
    reached it in seconds (slow start) or over the whole minute. Later 429s lower it the same
    way; a learned rate is probed upwards after a quiet spell, as a quota may grow.
    """
    new.accepted = [e for e in new.accepted if now - e[0] < RATE_WINDOW]
    if s.sent or s.r429:
        new.accepted.append([round(now, 3), max(0, s.sent - s.r429)])
    before = new.rate_limit
    if s.stated > 0:
        new.rate_stated = s.stated
        target = RATE_MARGIN_STATED * s.stated
        # A lower rate learned from 429s since (a quota shared with others) stands until probed.
        if ((new.rate_source != "learned" or target < new.rate_limit)
                and abs(target - new.rate_limit) > 1e-3 * target):
            new.rate_limit, new.rate_source = target, "stated"
            new.rate_reason = f"the endpoint states {s.stated * 60:g} requests/min"
    # A 429 stating the quota is explained by it; one stating nothing tells it by what was accepted.
    if s.r429 and not s.stated and (new.rate_limit <= 0 or now >= new.rate_changed_at + RATE_SETTLE):
        accepted = sum(n for _, n in new.accepted)
        learned = RATE_MARGIN_LEARNED * accepted / RATE_WINDOW
        if new.rate_limit > 0:
            # Already keeping to a rate: the last minute may hold a pause (few calls accepted,
            # not a smaller quota), so one refusal lowers it by RATE_MAX_CUT at most.
            learned = max(learned, (1 - RATE_MAX_CUT) * new.rate_limit)
        if learned > 0 and (new.rate_limit <= 0 or learned < new.rate_limit):
            new.rate_limit, new.rate_source = learned, "learned"
            new.rate_reason = (f"{s.r429} 429 after {accepted:.0f} calls accepted in the last "
                               f"{RATE_WINDOW:g} s")
    elif (new.rate_source == "learned" and not s.r429 and now - new.rate_changed_at >= RATE_PROBE_AFTER
          and now - new.refused_at >= RATE_PROBE_AFTER and s.sent >= 0.8 * new.rate_limit * interval):
        ceiling = RATE_MARGIN_STATED * new.rate_stated if new.rate_stated else math.inf
        raised = min(new.rate_limit * RATE_PROBE_STEP, ceiling)
        if raised > new.rate_limit:
            new.rate_limit = raised
            if new.rate_stated and raised >= ceiling:
                new.rate_source = "stated"
            new.rate_reason = f"no 429 for {RATE_PROBE_AFTER:g} s with the rate in use: probing"
    if before <= 0 < new.rate_limit and new.accepted:
        # The calls sent before the rate was known are in the quota's window: the first turn
        # under it comes after them, as if they had been spaced too (a sliding window holds
        # them; a token bucket, which starts full, would not need it). After a burst that
        # filled the quota this is about when the burst leaves the window, so calls resume at
        # the rate instead of a 429 whenever the window is full again (a Retry-After says only
        # when it has room for one call).
        first = min(e[0] for e in new.accepted)
        turn = first + sum(n for _, n in new.accepted) / new.rate_limit
        new.first_turn = turn if turn > now else 0.0
    if new.rate_limit != before:
        new.rate_changed_at = now
        return True
    return False


def decide(st: State, s: Sample, *, now: float, interval: float, ceiling: int) -> tuple[State, bool]:
    """The next state from the fleet's sample of one interval; and whether the limit changed.

    The limit is a whole number of calls (what the acquire script enforces): every step moves it
    by whole calls, and the Vegas estimate counts the calls really allowed in flight.
    """
    new = State(**{**st.__dict__, "floors": dict(st.floors), "pending": list(st.pending),
                   "accepted": [list(e) for e in st.accepted], "first_turn": 0.0})
    answered = sum(n for n, _ in s.steps.values())
    latency_sum = sum(t for _, t in s.steps.values())
    used = latency_sum / max(interval, 0.1)
    new.rate += (answered / max(interval, 0.1) - new.rate) * min(1.0, interval / RATE_WINDOW)
    # Latency against each step's floor, weighted by calls.
    weighted = 0.0
    for step, (n, total) in s.steps.items():
        if n <= 0:
            continue
        mean = total / n
        floor = new.floors.get(step)
        if floor is None or mean < floor:
            if floor is None or n >= MIN_CALLS_FOR_FLOOR:
                new.floors[step] = floor = mean
        elif now >= st.settle_until:
            # Not while the calls of a cut are still coming back: their queueing is known, and
            # drifting on it would leave a floor too high to see the next queue.
            new.floors[step] = floor = floor + (mean - floor) * FLOOR_DRIFT
        weighted += n * (mean / floor if floor > 0 else 1.0)
    # The latency ratio is read over at least MIN_CALLS_TO_DECIDE answers: at a small limit one
    # interval holds one or two, and their mean is noise. Answers of calls sent before the last
    # change (still settling) say nothing about the new limit and are dropped.
    ratio = None
    if now < st.settle_until:
        new.pending = [0, 0.0]
    else:
        new.pending = [new.pending[0] + answered, new.pending[1] + weighted]
        if new.pending[0] >= MIN_CALLS_TO_DECIDE:
            ratio = new.pending[1] / new.pending[0]
            new.pending = [0, 0.0]
    overload = s.r429 + s.r503 + s.timeouts
    if s.retry_after > 0:
        new.pause_until = max(new.pause_until, now + s.retry_after)
    current = max(1, math.floor(st.limit))
    limit, reason = float(current), ""
    # In use: calls waited for a slot, or the calls answered kept most of the limit busy.
    in_use = s.waited > 0 or used >= USED_TO_GROW * current
    if s.r429 or s.r503:
        new.refused_at = now
        if now >= st.settle_until:  # later refusals of calls sent before the cut keep the level
            mean = latency_sum / answered if answered else new.floor() or 1.0
            new.refused_limit = max(1.0, QUOTA_MARGIN * new.rate * mean)
    decide_rate(new, s, now=now, interval=interval)
    if (s.r429 or s.r503) and new.rate_limit > 0:
        # Under a request rate a refusal is the rate's (a window briefly full), not a sign of
        # too many calls in flight: the limit keeps what the rate needs (Little's law), or
        # cutting it would hold the fleet below the rate for the minute the refusal is kept.
        mean = latency_sum / answered if answered else new.floor() or 1.0
        new.refused_limit = max(new.refused_limit, math.ceil(new.rate_limit * mean) + 1)
    # What was in flight: the limit when in use, else what was used (a limit nobody fills says
    # nothing about the endpoint); of it, Vegas's estimate of the calls queued at the server.
    base = current if in_use else min(current, used)
    queued = base * (1 - 1 / ratio) if ratio else 0.0
    alpha = max(ALPHA_MIN, ALPHA * current)
    beta = max(BETA_MIN, BETA * current)
    if overload and now >= st.settle_until:
        parts = [f"{n} {w}" for n, w in ((s.r429, "429"), (s.r503, "503"), (s.timeouts, "timeouts")) if n]
        limit = current * CUT
        if s.r429 or s.r503:  # down to the quota's concurrency, at most halving per step
            limit = min(limit, max(new.refused_limit, current * MAX_STEP_CUT))
            if new.rate_limit > 0:  # and not below what the rate needs
                limit = min(current, max(limit, new.refused_limit))
        limit = float(max(1, round(limit)))
        reason = ", ".join(parts) + (f" (Retry-After {s.retry_after:g} s)" if s.retry_after else "")
    elif ratio is not None and queued > beta:
        # The concurrency that would see the floor (Gradient2's limit x gradient), plus alpha
        # queued to keep a batch full. At most halved per step: a few slow answers in a short
        # interval are a noisy gradient.
        limit = float(max(1, math.ceil(current * MAX_STEP_CUT), round(base / ratio + alpha)))
        reason = f"latency {ratio:.2f}x its floor (~{queued:.0f} calls queued)"
    elif ratio is not None and queued < alpha and in_use and current < ceiling:
        limit = current * 2.0 if st.slow_start else current + max(1.0, math.floor(math.sqrt(current) / 2))
        if st.refused_limit > 0 and now - st.refused_at < QUOTA_MEMORY:
            # The endpoint refused a moment ago (a quota: its window is a minute long): stay
            # within the concurrency its accepted rate allows, creeping up by one, until that
            # is forgotten; then probe again.
            limit = min(limit, current + 1.0, max(current, math.floor(st.refused_limit)))
        reason = f"latency {ratio:.2f}x its floor with the limit in use" + (" (slow start)" if st.slow_start else "")
    if limit > ceiling:  # a ceiling lowered since, or below the start value
        limit, reason = float(ceiling), reason or f"max_concurrency_ceiling {ceiling}"
    changed = int(limit) != int(st.limit)
    if reason and limit != st.limit:
        if limit < st.limit:
            new.slow_start = False
        new.limit = limit
        new.reason = reason
        new.changed_at = now
        new.pending = [0, 0.0]
        mean_latency = latency_sum / answered if answered else new.floor()
        new.settle_until = now + max(mean_latency, INTERVAL) + INTERVAL
    return new, changed


# KEYS: samples list, controller hash. ARGV: this process's sample ('' = none), interval, '1' to
# update now (the sample holds a stated Retry-After: the fleet must pause at once, not at the
# next interval). Pushes the sample; if an update is due, claims it (the claim is the lease: nobody else updates
# before `next`) and returns the samples and the state.
_PUSH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
if ARGV[1] ~= '' then
  redis.call('RPUSH', KEYS[1], ARGV[1])
  redis.call('EXPIRE', KEYS[1], 60)
end
local nxt = tonumber(redis.call('HGET', KEYS[2], 'next') or '0')
if now < nxt and ARGV[3] ~= '1' then
  return {tostring(now)}
end
local last = redis.call('HGET', KEYS[2], 'last') or tostring(now - tonumber(ARGV[2]))
local epoch = redis.call('HINCRBY', KEYS[2], 'epoch', 1)
redis.call('HSET', KEYS[2], 'next', tostring(now + tonumber(ARGV[2])), 'last', tostring(now))
local s = redis.call('LRANGE', KEYS[1], 0, -1)
redis.call('DEL', KEYS[1])
return {tostring(now), tostring(epoch), last, s, redis.call('HGETALL', KEYS[2])}
"""
# KEYS: controller hash. ARGV: epoch, TTL, then field, value pairs. Written only by the holder
# of the claim it names (a holder stalled past the next claim writes nothing). The rate's next
# turn (``tat``) is owned by the budget's acquire script, which may have given turns past the
# one this update computed (a fixed rate beside auto's, or calls since the state was read): it
# is only ever moved later, never back over turns already given.
_WRITE = """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then
  return 0
end
local fields = {}
for i = 3, #ARGV do
  fields[i - 2] = ARGV[i]
end
for i = 1, #fields - 1, 2 do
  if fields[i] == 'tat' then
    local given = redis.call('HGET', KEYS[1], 'tat')
    if given and tonumber(given) > tonumber(fields[i + 1]) then
      fields[i + 1] = given
    end
  end
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""


class Controller:
    """A process's side of the fleet's controller: push samples at most every ``interval``, and
    update the fleet's state when this process holds the update."""

    def __init__(self, client: redis.Redis, *, samples_key: str, state_key: str, ceiling: int,
                 label: str, interval: float = INTERVAL):
        self.r = client
        self.samples_key, self.state_key = samples_key, state_key
        self.ceiling, self.label, self.interval = ceiling, label, interval
        self.sampler = Sampler()
        self._push = client.register_script(_PUSH)
        self._write = client.register_script(_WRITE)
        self._flushing = threading.Lock()
        self._next = 0.0

    def force_next(self) -> None:
        """Push at the next chance, without waiting for the interval (a stated Retry-After)."""
        self._next = 0.0

    def maybe_flush(self, *, force: bool = False) -> None:
        """Push this process's sample if ``interval`` has passed (one thread at a time, the
        others go on). Errors lose the sample, never the call."""
        now = time.monotonic()
        if (now < self._next and not force) or not self._flushing.acquire(blocking=False):
            return
        try:
            self._next = now + self.interval
            self.flush()
        except redis.exceptions.RedisError as exc:
            log.warning("adaptive concurrency: could not push samples (%s: %s)", type(exc).__name__, exc)
        except Exception:  # a bug here must not cost the answer of the call that just ended
            log.exception("adaptive concurrency: the controller's update failed")
        finally:
            self._flushing.release()

    def flush(self) -> State | None:
        """Push, and update if due; the new state when this call updated it."""
        s = self.sampler.take()
        out = self._push(keys=[self.samples_key, self.state_key],
                         args=["" if s.empty() else s.dumps(), self.interval, "1" if s.retry_after > 0 else "0"])
        if len(out) == 1:
            return None
        now, epoch, last = float(out[0]), out[1], float(out[2])
        fleet = Sample()
        for raw in out[3]:
            fleet.add(Sample.loads(raw))
        h = dict(zip(out[4][::2], out[4][1::2], strict=True))
        old = State.from_redis(h)
        new, changed = decide(old, fleet, now=now, interval=min(max(now - last, 0.1), 5 * self.interval),
                              ceiling=self.ceiling)
        fields = [x for kv in new.to_redis().items() for x in kv]
        if self._write(keys=[self.state_key], args=[epoch, STATE_TTL, *fields]):
            if changed:
                log.info("vlm concurrency limit %d -> %d for %s: %s (latency floor %.2f s)",
                         int(old.limit), int(new.limit), self.label, new.reason, new.floor())
            if new.rate_limit != old.rate_limit:
                log.info("vlm request rate limit %s -> %.1f requests/min for %s: %s",
                         f"{old.rate_limit * 60:.1f}" if old.rate_limit else "none", new.rate_limit * 60,
                         self.label, new.rate_reason)
        return new


def read_state(client: redis.Redis, state_key: str) -> dict | None:
    """What ``producer status`` shows of the controller, or None when it has not run."""
    h = client.hgetall(state_key)
    if b"limit" not in h and "limit" not in h:  # nothing, or only a fixed rate's turn (``tat``)
        return None
    st = State.from_redis(h)
    out = {"limit": int(st.limit), "floor_s": round(st.floor(), 3),
           "floors_s": {k: round(v, 3) for k, v in st.floors.items()}, "reason": st.reason,
           "changed_at": st.changed_at, "paused_until": st.pause_until, "slow_start": st.slow_start}
    if st.rate_limit > 0:
        out["rate_limit_per_minute"] = round(st.rate_limit * 60, 1)
        out["rate_source"] = st.rate_source
        out["rate_reason"] = st.rate_reason
        out["rate_changed_at"] = st.rate_changed_at
    return out
