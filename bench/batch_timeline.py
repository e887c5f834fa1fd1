"""A batch-mode run's timeline and call counts: ``producer run`` with ``vlm.batch`` on and the
offline teacher's batch backend (jobs answered at the first poll), on demo road scenes.

Prints, per provider job, when it was formed, submitted, finished and released (seconds from the
first job), its step and size; then per step the calls made, how many were answered by a batch
job and how many went online (re-asks, truncation retries), and the jobs submitted to the
provider against the jobs in the ledger (a resubmitted job would show as more submits).

    .venv/bin/python -m bench.batch_timeline --images 200 --max-per-job 64
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
V = "image_referring_expression.vlm"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--max-per-job", type=int, default=64)
    ap.add_argument("--gather", type=float, default=2.0)
    ap.add_argument("--poll", type=float, default=1.0)
    ap.add_argument("--workdir", default="/tmp/refexp-bench/batch")
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()

    from producer.demo import make_demo_dataset
    from worker.clients.offline_batch import OfflineBatch
    from worker.ledger import Ledger

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    image_dir, label_dir = make_demo_dataset(work / "data", n_images=args.images, seed=11)
    results, provider = work / "results", work / "provider"
    env = {**os.environ, "REFEXP_OFFLINE_BATCH_DIR": str(provider)}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "producer.cli", "run", f"{V}.backend=offline", f"{V}.batch.enabled=true",
         f"{V}.batch.max_requests_per_job={args.max_per_job}", f"{V}.batch.gather_seconds={args.gather}",
         f"{V}.batch.poll_seconds={args.poll}", "--image-dir", str(image_dir), "--label-dir", str(label_dir),
         "--results-dir", str(results)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        print(proc.stdout, proc.stderr)
        raise SystemExit(f"producer run exited {proc.returncode}")

    ledger = Ledger(results)
    jobs = sorted(ledger.jobs(), key=lambda j: j.created)
    t0 = jobs[0].created
    print(f"{args.images} images, max {args.max_per_job} requests per job, gather {args.gather} s, "
          f"poll {args.poll} s; producer run wall {wall:.1f} s (offline teacher, os.cpu_count()={os.cpu_count()})")
    print(f"  {'job':<28}{'step':>5}{'n':>6}{'formed':>9}{'submitted':>11}{'finished':>10}{'released':>10}")
    for j in jobs:
        print(f"  {j.job_id:<28}{j.step:>5}{j.n:>6}{j.created - t0:>9.1f}{j.submitted_at - t0:>11.1f}"
              f"{j.finished_at - t0:>10.1f}{j.released_at - t0:>10.1f}")
    per_step: dict[str, dict[str, int]] = {}
    for line in (results / "annotations.jsonl").read_text().splitlines():
        for name, meta in (json.loads(line).get("meta") or {}).items():
            call = (meta or {}).get("call")
            q = (meta or {}).get("quality") or {}
            if not call:
                continue
            c = per_step.setdefault(name, {"images": 0, "calls": 0, "batch": 0, "online": 0})
            c["images"] += 1
            c["calls"] += int(q.get("calls") or 1)
            batch = 1 if call.get("batch_input_tokens") else 0
            c["batch"] += batch
            c["online"] += int(q.get("calls") or 1) - batch
    print("  calls per step (final records):")
    for name, c in sorted(per_step.items()):
        print(f"    {name:<22} {c['images']:>5} images  {c['calls']:>5} calls: {c['batch']:>5} in batch jobs, "
              f"{c['online']:>3} online")
    submits = OfflineBatch(directory=provider).submitted()
    print(f"  provider: {len(submits)} jobs submitted, {len(jobs)} jobs in the ledger, "
          f"{len(set(submits))} distinct")


if __name__ == "__main__":
    main()
