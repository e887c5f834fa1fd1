"""A capacity model for the fake VLM endpoint: a GPU batch server with K slots, and a quota.

Why: a self-hosted vLLM or NIM server does not refuse work when it is full; it batches what it
can and every request in the batch gets slower (continuous batching, preemption). A fleet that
sends too much sees latency grow, then client timeouts, while the server keeps working on the
requests the clients gave up on. Hosted APIs instead state a quota and answer 429 with a
Retry-After (Gemini: a ``google.rpc.RetryInfo`` detail). The adaptive fleet budget
(worker/adaptive.py) is shown against both, so the fake must behave like both.

The server model is processor sharing over K slots: each request needs ``work`` seconds of
service (the fake's sampled latency); with ``n`` requests in the server, each progresses at
``min(1, K / n)``. So up to K requests run at their base latency, and beyond K the throughput
stays K per base latency while every request's latency grows as ``n / K`` (the queue is shared,
not FIFO, as a batch server's is). A request the client abandoned keeps its share until its
work is done: the handler thread keeps serving it, as the real server does.

``set_capacity`` changes K mid-run (other tenants, autoscaling); the quota is a sliding window
of ``rpm`` admitted requests per 60 s, refused with the seconds until the window has room. How
the quota is stated (``style``) follows the real endpoints: ``openai`` sends
``x-ratelimit-limit-requests`` / ``-remaining-requests`` / ``-reset-requests`` on every OpenAI
reply and a ``Retry-After`` on a 429; ``gemini`` answers a 429 with a ``google.rpc.QuotaFailure``
(the quota id and its value) and a ``RetryInfo``, and no header; ``plain`` states nothing but a
``Retry-After`` on a 429 (a proxy in front of a self-hosted server).
``stats()`` reports the peak number of requests in the server at once (``peak``) and the peak
since the last ``mark()`` (to show that no more started after a limit dropped).

Hooked into ``FakeVLM`` as its ``capacity`` attribute::

    fake = FakeVLM(latency=1.0)
    fake.capacity = Capacity(k=8, rpm=600)
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque

STYLES = ("openai", "gemini", "plain")


class Capacity:
    """K slots shared by every request in the server, and an optional per-minute quota.

    :param k: requests served at full speed at once (the batch size the GPU sustains).
    :param rpm: admitted requests per rolling 60 s; above it a request is refused (429). 0 = none.
    :param clock: monotonic seconds (tests may pass their own).
    """

    def __init__(self, k: int, *, rpm: int = 0, style: str = "openai", clock=time.monotonic):
        if k < 1:
            raise ValueError(f"k must be at least 1, not {k}")
        if style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, not {style!r}")
        self.style = style
        self._clock = clock
        self._cond = threading.Condition()
        self.k = k
        self.rpm = rpm
        self._n = 0  # requests in the server
        self._v = 0.0  # virtual time: service each request in the server has received since 0
        self._t = clock()  # when _v was last brought up to date
        self._window: deque[float] = deque()
        self.peak = 0
        self.peak_since_mark = 0
        self.served = 0
        self.refused = 0
        self.abandoned = 0

    # ------------------------------------------------------------------ control
    def set_capacity(self, k: int) -> None:
        """Change K now; requests in the server continue at the new rate."""
        if k < 1:
            raise ValueError(f"k must be at least 1, not {k}")
        with self._cond:
            self._advance()
            self.k = k
            self._cond.notify_all()

    def mark(self) -> None:
        """Start a new ``peak_since_mark`` from the requests in the server now."""
        with self._cond:
            self.peak_since_mark = self._n

    def stats(self) -> dict:
        with self._cond:
            return {"k": self.k, "rpm": self.rpm, "style": self.style, "in_server": self._n, "peak": self.peak,
                    "peak_since_mark": self.peak_since_mark, "served": self.served,
                    "refused": self.refused, "abandoned": self.abandoned}

    # ------------------------------------------------------------------ the request path
    def admit(self) -> float | None:
        """Take a request under the quota: None when admitted, else the seconds until the window
        has room (what Retry-After and RetryInfo say)."""
        if not self.rpm:
            return None
        with self._cond:
            now = self._clock()
            while self._window and now - self._window[0] >= 60.0:
                self._window.popleft()
            if len(self._window) >= self.rpm:
                self.refused += 1
                return float(max(1, math.ceil(60.0 - (now - self._window[0]))))
            self._window.append(now)
            return None

    def rate_headers(self) -> dict[str, str] | None:
        """OpenAI's rate-limit headers for a reply under the quota (``style`` ``openai`` only):
        the limit, what is left in the window now, and when the window is whole again."""
        if not self.rpm or self.style != "openai":
            return None
        with self._cond:
            now = self._clock()
            while self._window and now - self._window[0] >= 60.0:
                self._window.popleft()
            reset = 60.0 - (now - self._window[0]) if self._window else 0.0
            return {"x-ratelimit-limit-requests": str(self.rpm),
                    "x-ratelimit-remaining-requests": str(max(0, self.rpm - len(self._window))),
                    "x-ratelimit-reset-requests": f"{reset:.3f}s"}

    def serve(self, work: float, stopping: threading.Event | None = None,
              abandoned: threading.Event | None = None) -> None:
        """Hold the calling thread until ``work`` seconds of service are done at the shared rate.

        ``stopping`` (the server shutting down) ends the wait early; ``abandoned`` is only
        counted: the server finishes a request whose client left.
        """
        with self._cond:
            self._advance()
            self._n += 1
            self.peak = max(self.peak, self._n)
            self.peak_since_mark = max(self.peak_since_mark, self._n)
            done_at = self._v + max(work, 0.0)
            self._cond.notify_all()  # everyone's rate changed
            try:
                while not (stopping is not None and stopping.is_set()):
                    self._advance()
                    left = done_at - self._v
                    if left <= 1e-6:
                        break
                    # Wall seconds at today's rate; an arrival, a departure or a capacity change
                    # wakes every waiter to recompute.
                    self._cond.wait(min(left / self._rate(), 0.5))
            finally:
                self._advance()
                self._n -= 1
                self.served += 1
                if abandoned is not None and abandoned.is_set():
                    self.abandoned += 1
                self._cond.notify_all()

    def _rate(self) -> float:
        """Service per wall second of each request in the server."""
        return min(1.0, self.k / self._n) if self._n else 1.0

    def _advance(self) -> None:
        now = self._clock()
        self._v += (now - self._t) * self._rate()
        self._t = now


def main(argv: list[str] | None = None) -> None:
    """The fake endpoint with a capacity model in its own process (benchmarks). Prints
    ``FAKE_VLM_URL=...``, then reads commands on stdin, one a line: ``k N`` (change K now),
    ``mark`` (start ``peak_since_mark``), ``stats`` (prints ``STATS {json}``); EOF stops it."""
    import argparse
    import json
    import sys

    from tests.support.fake_vlm import FakeVLM

    p = argparse.ArgumentParser(prog="python -m tests.support.fake_capacity")
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--rpm", type=int, default=0)
    p.add_argument("--latency", type=float, default=1.0)
    p.add_argument("--style", choices=STYLES, default="openai", help="how the quota is stated")
    a = p.parse_args(argv)
    fake = FakeVLM(latency=a.latency, record=False).start()
    fake.capacity = Capacity(k=a.k, rpm=a.rpm, style=a.style)
    print(f"FAKE_VLM_URL={fake.url}", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[:1] == ["k"]:
            fake.capacity.set_capacity(int(cmd[1]))
        elif cmd[:1] == ["mark"]:
            fake.capacity.mark()
        elif cmd[:1] == ["stats"]:
            print("STATS " + json.dumps({**fake.capacity.stats(), "status_counts": fake.stats()["status_counts"]}),
                  flush=True)
    fake.stop()


if __name__ == "__main__":
    main()
