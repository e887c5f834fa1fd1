"""``vlm.max_concurrency: auto`` against fixed values, on a fake GPU batch server (issue 17).

What it drives: ``--threads`` threads in this process, each making calls in a loop through the
worker's own call path: ``worker.context.BudgetedClient`` (the fleet budget, ``FleetBudget``,
on a private redis-server) around the OpenAI client the workers build (``get_client``: the
official ``openai`` SDK over HTTP), against ``python -m tests.support.fake_capacity`` in its own
process: K requests at base latency L, the rest sharing the K slots (latency grows as n / K).
All threads share one budget object, as a worker process's threads do (the controller's samples
come from one process here; several would fold theirs in the same way).

For each K: a coarse sweep of fixed ``max_concurrency`` (8, 16, 32, 64, 96), throughput in the
last two thirds of each short run; then ``auto`` for ``--auto-seconds``, throughput in 5 s windows
(when it first reaches 0.95 of the best fixed value), 429s, and, after K halves at
``--halve-at``, how long until the p99 latency of the calls finishing in a 2 s window is back
within 2x the floor (L), and the controller's limit (min / median / max) over the 15 s before the
halving and the last 15 s.

With ``--rpm R`` the endpoint has a quota of R calls per rolling minute, stated as ``--style``
says: ``openai`` (x-ratelimit-* headers on every answer), ``gemini`` (a QuotaFailure and a
RetryInfo in the 429 body; use ``--backend gemini`` for the google-genai SDK) or ``plain`` (a
Retry-After alone); the 429 share, the rate from 60 s on against the quota and the rate the
controller ended with are printed.

    .venv/bin/python -m bench.adaptive --k 8 24 64
    .venv/bin/python -m bench.adaptive --k 64 --rpm 600 --style gemini --backend gemini --fixed 8 \
        --auto-seconds 120 --halve-at 110
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from bench.common import PY, ROOT, banner, pct, redis_client, redis_server, stop_group


@dataclass
class Call:
    start: float  # when the request left (after the budget's wait)
    end: float
    ok: bool
    status: str


class Timed:
    """The client inside the budget: notes when each request really left, so latencies are the
    endpoint's, not the budget's wait."""

    def __init__(self, inner):
        self.inner, self.name, self.sent = inner, inner.name, threading.local()

    def generate(self, request):
        self.sent.at = time.monotonic()
        return self.inner.generate(request)


class Endpoint:
    """The fake endpoint process and its stdin controls."""

    def __init__(self, k: int, latency: float, rpm: int, style: str = "openai"):
        self.proc = subprocess.Popen(
            [PY, "-m", "tests.support.fake_capacity", "--k", str(k), "--latency", str(latency), "--rpm", str(rpm),
             "--style", style],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            start_new_session=True)
        line = self.proc.stdout.readline()
        if not line.startswith("FAKE_VLM_URL="):
            raise RuntimeError(f"fake endpoint did not start: {line!r}")
        self.url = line.strip().split("=", 1)[1]

    def send(self, cmd: str) -> None:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def stats(self) -> dict:
        self.send("stats")
        return json.loads(self.proc.stdout.readline().split(" ", 1)[1])

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        stop_group(self.proc, timeout=10)


@contextlib.contextmanager
def endpoint(k: int, latency: float, rpm: int, style: str = "openai") -> Iterator[Endpoint]:
    ep = Endpoint(k, latency, rpm, style)
    try:
        yield ep
    finally:
        ep.close()


def run(redis_url: str, ep: Endpoint, *, concurrency: int | str, seconds: float, threads: int,
        timeout: float, halve_at: float | None = None, k: int = 0,
        backend: str = "openai") -> tuple[list[Call], float, dict]:
    """Calls in a loop from ``threads`` threads for ``seconds``; the calls, t0, the endpoint's stats."""
    import redis

    from worker.budget import FleetBudget
    from worker.clients.base import VLMRequest
    from worker.clients.factory import clear_cache, get_client
    from worker.context import BudgetedClient
    from worker.images import ImagePayload
    from worker.spec import VLMSpec

    clear_cache()
    if backend == "gemini":
        vlm = VLMSpec(backend="gemini", gemini={"base_url": ep.url, "model": "gemini-2.5-flash", "timeout": timeout},
                      structured_output="off", max_concurrency=concurrency)
    else:
        vlm = VLMSpec(backend="openai", openai={"base_url": ep.url + "/v1", "model_name": "fake-vl",
                                                "timeout": timeout}, structured_output="off",
                      max_concurrency=concurrency)
    key = f"{backend}|{ep.url}|fake|{time.time_ns()}"  # a fresh budget per run
    budget = FleetBudget(redis.Redis.from_url(redis_url, max_connections=threads + 8), redis_url,
                         endpoint_key=key, max_concurrency=concurrency, requests_per_minute=0,
                         lease_seconds=timeout + 30, ceiling=256)
    timed = Timed(get_client(vlm))
    client = BudgetedClient(timed, budget)
    request = VLMRequest(image=ImagePayload(b"\x89PNG\r\n\x1a\n", "image/png", 8, 8, ""),
                         prompt="Describe the image in one sentence.", step="image_caption")
    calls: list[Call] = []
    limits: list[tuple[float, int]] = []  # (s since t0, the controller's limit), every 0.25 s
    lock = threading.Lock()
    stop = threading.Event()
    t0 = time.monotonic()

    def watch() -> None:
        from worker.budget import controller_state

        r = redis.Redis.from_url(redis_url)
        while not stop.wait(0.25):
            st = controller_state(r, key)
            if st is not None:
                limits.append((time.monotonic() - t0, st["limit"]))

    def loop() -> None:
        while not stop.is_set():
            timed.sent.at = None
            status = "ok"
            try:
                client.generate(request)
            except Exception as exc:
                status = type(exc).__name__
            if timed.sent.at is None:  # never left (a pause): not a call
                continue
            with lock:
                calls.append(Call(timed.sent.at - t0, time.monotonic() - t0, status == "ok", status))

    pool = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    if concurrency == "auto":
        pool.append(threading.Thread(target=watch, daemon=True))
    for t in pool:
        t.start()
    if halve_at is not None:
        stop.wait(halve_at)
        ep.send(f"k {max(1, k // 2)}")
        stop.wait(seconds - halve_at)
    else:
        stop.wait(seconds)
    stop.set()
    for t in pool:
        t.join(timeout + 5)
    ep.send(f"k {k}")
    from worker.budget import controller_state

    return calls, t0, {**ep.stats(), "limits": limits, "state": controller_state(redis.Redis.from_url(redis_url), key)}


def served_rate(calls: list[Call], a: float, b: float) -> float:
    """Calls' worth of service per second the endpoint gave in ``[a, b)``: each answered call
    counts for the share of its time at the server that falls in the window. A fixed limit
    above K on a processor-sharing server answers in synchronised batches (every call of a
    batch ends together), which counting answers in a window would cut at random."""
    total = 0.0
    for c in calls:
        if c.ok and c.end > c.start:
            total += max(0.0, min(c.end, b) - max(c.start, a)) / (c.end - c.start)
    return total / (b - a)


def limit_spread(limits: list[tuple[float, int]], a: float, b: float) -> str:
    """min / median / max of the controller's limit sampled in ``[a, b)``."""
    xs = sorted(x for t, x in limits if a <= t < b)
    if not xs:
        return "no samples"
    return f"{xs[0]} / {xs[len(xs) // 2]} / {xs[-1]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, nargs="+", default=[8, 24, 64])
    ap.add_argument("--latency", type=float, default=1.0, help="base latency L (s)")
    ap.add_argument("--fixed", type=int, nargs="+", default=[8, 16, 32, 64, 96])
    ap.add_argument("--fixed-seconds", type=float, default=12.0)
    ap.add_argument("--auto-seconds", type=float, default=70.0)
    ap.add_argument("--halve-at", type=float, default=40.0)
    ap.add_argument("--rpm", type=int, default=0, help="the endpoint's quota (429 above it)")
    ap.add_argument("--style", choices=["openai", "gemini", "plain"], default="openai",
                    help="how the fake states its quota: x-ratelimit-* headers on every answer (openai), "
                         "QuotaFailure + RetryInfo in a 429 (gemini), a Retry-After alone (plain)")
    ap.add_argument("--backend", choices=["openai", "gemini"], default="openai", help="the client (SDK) to call with")
    ap.add_argument("--threads", type=int, default=112)
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--verbose", action="store_true", help="print every change of the auto limit")
    ap.add_argument("--settle", type=float, default=0.0,
                    help="seconds to wait after the fixed sweep, so that a quota's rolling minute holds "
                         "none of its calls when auto starts (61 for a clean window)")
    a = ap.parse_args()
    banner("adaptive concurrency", k=a.k, latency=a.latency, fixed=a.fixed, threads=a.threads, rpm=a.rpm,
           style=a.style, backend=a.backend)
    os.environ.setdefault("OPENAI_API_KEY", "bench")
    os.environ.setdefault("GOOGLE_API_KEY", "bench")
    if a.verbose:  # each change of the limit, as the worker logs it
        logging.basicConfig(format="             %(relativeCreated)8.0f ms %(message)s")
        logging.getLogger("refexp.worker").setLevel(logging.INFO)
    with redis_server() as url:
        redis_client(url).ping()
        for k in a.k:
            with endpoint(k, a.latency, a.rpm, a.style) as ep:
                print(f"\nK = {k}, L = {a.latency:g} s" + (f", quota {a.rpm}/min" if a.rpm else ""))
                fixed = {}
                for c in a.fixed:
                    calls, _, st = run(url, ep, concurrency=c, seconds=a.fixed_seconds, threads=a.threads,
                                       timeout=a.timeout, k=k, backend=a.backend)
                    half = a.fixed_seconds / 3
                    fixed[c] = served_rate(calls, half, a.fixed_seconds)
                    lat = [c_.end - c_.start for c_ in calls if c_.ok and c_.end >= half]
                    print(f"  fixed {c:>3}: {fixed[c]:6.2f} calls/s, p50 {pct(lat, 0.5):5.2f} s, "
                          f"p99 {pct(lat, 0.99):5.2f} s, server peak {st['peak']}")
                best_c = max(fixed, key=fixed.get)
                best = fixed[best_c]
                if a.settle > 0:  # a bench's pause, not a synchronisation: the quota's window empties
                    time.sleep(a.settle)
                calls, _, st = run(url, ep, concurrency="auto", seconds=a.auto_seconds, threads=a.threads,
                                   timeout=a.timeout, halve_at=a.halve_at, k=k, backend=a.backend)
                windows = [(t, served_rate(calls, t, t + 5)) for t in range(0, int(a.halve_at) - 4, 5)]
                reached = next((t + 5 for t, x in windows if x >= 0.95 * best), None)
                steady = served_rate(calls, a.halve_at - 15, a.halve_at)
                n429 = sum(1 for c_ in calls if c_.status == "RateLimited")
                cap = k / a.latency
                print(f"  auto     : {steady:6.2f} calls/s over the 15 s before the halving = "
                      f"{steady / best:.3f} of the best fixed ({best_c}: {best:.2f}), {steady / cap:.3f} of K/L; "
                      f"default 16 = {fixed.get(16, 0) / best:.3f} of the best fixed, "
                      f"{fixed.get(16, 0) / cap:.3f} of K/L")
                print(f"             >= 0.95 of best first reached in the 5 s window ending at "
                      f"{reached if reached is not None else 'never'} s; windows: "
                      + " ".join(f"{x:.1f}" for _, x in windows))
                before_halving = limit_spread(st["limits"], a.halve_at - 15, a.halve_at)
                print(f"             limit min / median / max: {before_halving} "
                      f"(K = {k}, 15 s before the halving), "
                      f"{limit_spread(st['limits'], a.auto_seconds - 15, a.auto_seconds)} "
                      f"(K = {max(1, k // 2)}, last 15 s)")
                print(f"             429s {n429} of {len(calls)} calls ({100 * n429 / max(1, len(calls)):.2f} %), "
                      f"outcomes {sorted({c_.status for c_ in calls})}")
                if a.rpm:
                    quota = a.rpm / 60
                    answered = sum(1 for c_ in calls if c_.ok)
                    late = served_rate(calls, 60, a.halve_at)
                    state = st.get("state") or {}
                    print(f"             quota {a.rpm}/min = {quota:.2f} calls/s: answered {answered} in "
                          f"{a.auto_seconds:g} s ({answered / a.auto_seconds:.2f}/s); from 60 s to the halving "
                          f"{late:.2f} calls/s = {late / quota:.3f} of the quota; rate limit at the end "
                          f"{state.get('rate_limit_per_minute', 'none')}/min ({state.get('rate_source', '')}: "
                          f"{state.get('rate_reason', '')})")
                back = None
                for t in range(int(a.halve_at), int(a.auto_seconds) - 1):
                    lat = [c_.end - c_.start for c_ in calls if c_.ok and t <= c_.end < t + 2]
                    if lat and pct(lat, 0.99) <= 2 * a.latency and back is None:
                        back = t + 2 - a.halve_at
                    elif lat and pct(lat, 0.99) > 2 * a.latency:
                        back = None
                after = served_rate(calls, a.auto_seconds - 10, a.auto_seconds)
                lat_end = [c_.end - c_.start for c_ in calls if c_.ok and c_.end >= a.auto_seconds - 10]
                print(f"             K -> {k // 2} at {a.halve_at:g} s: p99 within 2x floor from "
                      f"{back if back is not None else 'never'} s after (for good); last 10 s "
                      f"{after:.2f} calls/s (K/L = {k // 2 / a.latency:g}), p99 {pct(lat_end, 0.99):.2f} s; "
                      f"server peak {st['peak']}")


if __name__ == "__main__":
    main()
