"""Target 1: how close the fleet keeps the endpoint to its concurrency limit.

Efficiency = achieved VLM calls/s ÷ (C ÷ L), with C = ``vlm.max_concurrency`` (the fleet-wide
budget) and L the fake endpoint's latency; the window runs from the first call's start to the
last image's step-3 record. Also per-image latency (first call start -> step 3 done) p50/p99 and
the time to the first finished image.

    .venv/bin/python -m bench.efficiency                      # L=0.5 s fixed, C=32, 400 images, 2 workers x 20
    .venv/bin/python -m bench.efficiency --layout 2x16,2x20,1x32 --dist lognormal
    .venv/bin/python -m bench.efficiency --redis-rtt-ms 20   # workers reach Redis through a 10 ms-each-way proxy
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from bench.common import (
    Deadline,
    banner,
    emit_json,
    fake_vlm,
    make_dataset,
    ping_rtt_ms,
    redis_proxy,
    redis_server,
)
from bench.fleetrun import mean_latency, print_run, run_inprocess, run_layouts, summarize_profile


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--latency", type=float, default=0.5)
    ap.add_argument("--dist", choices=("fixed", "lognormal"), default="fixed")
    ap.add_argument("--concurrency", type=int, default=32, help="vlm.max_concurrency (C)")
    ap.add_argument("--layout", default="2x20",
                    help="workers x threads, comma-separated to compare several (default: 25%% more threads "
                         "than C, as README.md advises)")
    ap.add_argument("--fmt", choices=("jpg", "png", "small", "big"), default="jpg",
                    help="dataset images (bench.common)")
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="experiment: start workers with sys.setswitchinterval(S)")
    ap.add_argument("--profile", type=float, default=0, help="py-spy one worker for this many s (0 = off)")
    ap.add_argument("--baseline", action="store_true",
                    help="also run the same images through C threads in one process, no Celery, no Redis "
                         "(bench.fleetrun.run_inprocess): what the endpoint and client allow on this machine")
    ap.add_argument("--warmup", type=int, default=16,
                    help="images through the fleet before the measured run (0 = measure a cold fleet)")
    ap.add_argument("--no-events", action="store_true",
                    help="start workers without -E (worker/app.py sets worker_send_task_events, so task events "
                         "are still sent: this changes nothing today)")
    ap.add_argument("--redis-rtt-ms", type=float, default=0.0,
                    help="round trip added between the workers and Redis: a proxy process (tests/support/tcpproxy.py) "
                         "adds half of it each way. The producer and the bench's own polling reach Redis directly")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/refexp-bench"))
    ap.add_argument("--timeout", type=float, default=240, help="bound for the whole script, s")
    ap.add_argument("--json", default=None, help="append the figures as JSON lines to this file")
    ap.add_argument("--seed", type=int, default=1, help="the fake's latency sampler seed")
    ap.add_argument("--max-inflight", type=int, default=1_000_000,
                    help="the producer's window (default: no bound, every image in flight at once)")
    a = ap.parse_args(argv)
    deadline = Deadline(a.timeout)
    m = banner("bench.efficiency: VLM calls/s vs C/L", images=a.images, latency=a.latency, dist=a.dist,
               C=a.concurrency, layout=a.layout, fmt=a.fmt, events=not a.no_events, warmup=a.warmup,
               redis_rtt_ms=a.redis_rtt_ms, max_inflight=a.max_inflight)
    images_dir, labels_dir = make_dataset(a.workdir / f"data-{a.fmt}-{a.images}", a.images, fmt=a.fmt)
    ok = True
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(redis_server())
        fake = stack.enter_context(fake_vlm(a.latency, a.dist, seed=a.seed))
        worker_url, proxy_pids = url, {}
        direct = ping_rtt_ms(url)
        print(f"-- Redis PING round trip from this host: p50 {direct[0]:.2f} ms, p99 {direct[1]:.2f} ms")
        if a.redis_rtt_ms > 0:
            proxy = stack.enter_context(redis_proxy(url, a.redis_rtt_ms / 2))
            worker_url, proxy_pids = proxy.url, {"proxy": proxy.proc.pid}
            via = ping_rtt_ms(proxy.url)
            print(f"-- workers reach Redis through a proxy adding {a.redis_rtt_ms / 2:g} ms each way: PING round trip "
                  f"p50 {via[0]:.2f} ms, p99 {via[1]:.2f} ms")
        base_eff = None
        if a.baseline:
            b = run_inprocess(fake=fake, images_dir=images_dir, labels_dir=labels_dir,
                              results=a.workdir / "results-eff-inprocess", concurrency=a.concurrency, deadline=deadline)
            base_eff = b.calls / b.makespan / (a.concurrency / mean_latency(a.latency, a.dist))
            print(f"-- baseline, {a.concurrency} threads in one process, no Celery/Redis: {b.calls} calls in "
                  f"{b.makespan:.2f} s -> efficiency {base_eff:.3f}")
            emit_json(a.json, {"bench": "efficiency-baseline", "machine": m, "params": vars(a) | {
                "workdir": str(a.workdir)}, "calls": b.calls, "makespan_s": round(b.makespan, 2),
                "efficiency": round(base_eff, 3)})
        for n, t, res in run_layouts(a, redis_url=url, fake=fake, images_dir=images_dir, labels_dir=labels_dir,
                                     deadline=deadline, tag="eff", profile_seconds=a.profile,
                                     worker_redis_url=worker_url, other_pids=proxy_pids):
            if res is None:
                ok = False
                continue
            rtt = f", Redis RTT +{a.redis_rtt_ms:g} ms" if a.redis_rtt_ms else ""
            fig = print_run(f"{n} workers x {t} threads, C={a.concurrency}, L={a.latency} {a.dist}{rtt}", res,
                            concurrency=a.concurrency, latency=a.latency, dist=a.dist)
            if res.profile:
                print("\n".join("   " + x for x in summarize_profile(Path(res.profile))))
            if base_eff:
                print(f"   relative to the in-process baseline: {fig['efficiency'] / base_eff:.3f}")
                fig["relative_to_baseline"] = round(fig["efficiency"] / base_eff, 3)
            if a.dist == "fixed":
                verdict = "meets" if fig["efficiency"] >= 0.95 else "MISSES"
                print(f"   target efficiency >= 0.95: {verdict}")
                ok = ok and fig["efficiency"] >= 0.95
            emit_json(a.json, {"bench": "efficiency", "machine": m, "params": vars(a) | {"layout": f"{n}x{t}",
                                                                                        "workdir": str(a.workdir)},
                               **fig})
            ok = ok and not res.bound_hit
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
