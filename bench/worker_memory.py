"""Target 6: one worker with 32 threads stays under 300 MB RSS and does not grow.

One ``celery -A worker worker -P threads -c 32`` process works 2k images (8k tasks) against the
fake endpoint with a small latency; its RSS is sampled every ``--every`` images' worth of
finished tasks (image-steps settled / 4).

    .venv/bin/python -m bench.worker_memory                  # 2000 images, L = 0.02 s
    .venv/bin/python -m bench.worker_memory --images 4000 --fmt png
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from bench.common import (
    Deadline,
    banner,
    emit_json,
    fake_vlm,
    hwm_mb,
    make_dataset,
    producer_popen,
    redis_client,
    redis_server,
    rss_mb,
    run_id,
    settled_count,
    spec_args,
    stop_group,
    worker_env,
    workers,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--latency", type=float, default=0.02)
    ap.add_argument("--every", type=int, default=250, help="sample RSS every this many finished images")
    ap.add_argument("--fmt", choices=("jpg", "png", "small"), default="jpg")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/refexp-bench"))
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for the worker (e.g. MALLOC_ARENA_MAX=2)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    deadline = Deadline(a.timeout)
    m = banner("bench.worker_memory: one worker's RSS over a run", images=a.images, threads=a.threads,
               latency=a.latency, fmt=a.fmt)
    images, labels = make_dataset(a.workdir / f"data-{a.fmt}-{a.images}", a.images, fmt=a.fmt)
    results = a.workdir / "results-memory"
    shutil.rmtree(results, ignore_errors=True)
    samples: list[tuple[int, float, float]] = []  # (images settled, seconds, RSS MB)
    bound = False
    with redis_server() as url, fake_vlm(a.latency) as fake, \
            workers(url, 1, a.threads, a.workdir / "logs", extra_env=dict(e.split("=", 1) for e in a.env)) as ws:
        pid = ws[0].pid
        r = redis_client(url)
        rss_idle = rss_mb(pid)
        t0 = time.monotonic()
        prod = producer_popen(worker_env(url), "enqueue", *spec_args(
            backend="openai", fake=fake, results=results, images=images, labels=labels, concurrency=a.threads),
            "--max-inflight", str(10 * a.images), log=a.workdir / "memory-producer.log")
        try:
            while not (results / "run.json").exists() and not deadline.hit:
                time.sleep(0.05)
            rid = run_id(results)
            next_mark = a.every
            while not deadline.hit:
                # Progress in images' worth of work: image-steps settled over all four steps / 4
                # (the queue is FIFO, so whole images finish late; work is done all along).
                settled = sum(settled_count(r, rid, s) for s in range(4)) // 4
                if settled >= next_mark or settled >= a.images:
                    samples.append((settled, time.monotonic() - t0, rss_mb(pid)))
                    next_mark = (settled // a.every + 1) * a.every
                if settled >= a.images:
                    break
                time.sleep(0.1)
            else:
                bound = True
        finally:
            if prod.poll() is None:
                stop_group(prod, timeout=10)
        peak = hwm_mb(pid)
        calls = fake.stats()["calls"]
    partial = " (PARTIAL: time bound hit)" if bound else ""
    done = samples[-1][0] if samples else 0
    print(f"-- {done}/{a.images} images, {calls} VLM calls, one worker x {a.threads} threads{partial}")
    print(f"   RSS idle (ready, before any task) {rss_idle:.0f} MB; peak (VmHWM) {peak:.0f} MB (target <= 300)")
    print("   images (image-steps / 4)  seconds  RSS MB")
    for n, t, rss in samples:
        print(f"   {n:24d}  {t:7.1f}  {rss:6.1f}")
    growth = float("nan")
    if len(samples) >= 3:
        # Growth after warm-up: from the second sample (clients built, pools full) to the last.
        growth = samples[-1][2] - samples[1][2]
        per_1k = growth / max(1, samples[-1][0] - samples[1][0]) * 1000
        print(f"   growth after warm-up ({samples[1][0]} -> {samples[-1][0]} images): {growth:+.1f} MB "
              f"({per_1k:+.2f} MB per 1000 images)")
    emit_json(a.json, {"bench": "worker_memory", "machine": m, "params": vars(a) | {"workdir": str(a.workdir)},
                       "rss_idle_mb": round(rss_idle, 1), "rss_peak_mb": round(peak, 1),
                       "samples": [(n, round(t, 1), round(x, 1)) for n, t, x in samples],
                       "growth_after_warmup_mb": round(growth, 1), "bound_hit": bound})
    return 0 if not bound and peak <= 300 and (growth != growth or growth < 10) else 1


if __name__ == "__main__":
    sys.exit(main())
