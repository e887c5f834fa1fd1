"""Target 5: re-running a finished 10k-image run costs no VLM call and at most 10 s.

The finished run is made quickly: our step functions with the offline teacher, in two processes,
write the four step sinks for every image (no Celery, no Redis: the sinks are the truth). Then,
with the fleet up (2 workers against the fake endpoint, L = 0, so a call would be counted):

1. ``producer enqueue ... --wait`` on a fresh Redis: the run index is rebuilt from the sinks
   (as ``producer run`` does every time, or a fleet whose Redis lost its data);
2. the same command again on the same Redis (the index is there: the everyday resume).

Each is timed end to end (seeding, index, enqueue, wait, finalize), and the fake's call count
must stay 0.

    .venv/bin/python -m bench.resume                 # 10k images
    .venv/bin/python -m bench.resume --images 2000
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import sys
import time
from pathlib import Path

from bench.common import (
    Deadline,
    banner,
    emit_json,
    fake_vlm,
    make_dataset,
    producer_run,
    redis_server,
    spec_args,
    worker_env,
    workers,
)

P = "image_referring_expression"


def _spec(images: Path, labels: Path, results: Path):
    from producer.runs import normalise
    from worker.spec import load_spec

    return normalise(load_spec(None, [f"{P}.vlm.backend=offline", f"{P}.data.image_dir={images}",
                                      f"{P}.data.kitti_label_dir={labels}", f"results_dir={results}"]))


def _finish_chunk(job: tuple[Path, Path, Path, int, int]) -> int:
    """Steps 0-3 for every ``n``-th seed record starting at ``k`` (one process of the pool)."""
    from producer.seed import iter_seed
    from worker.clients.offline import OfflineClient
    from worker.layout import Layout
    from worker.sinks import JsonlSink
    from worker.steps import StepOptions, input_record, run_step
    from worker.steps.prompts import load_prompts

    images, labels, results, k, n = job
    spec = _spec(images, labels, results)
    layout = Layout(results)
    sinks = {s: JsonlSink(layout.sink(s).path, fsync=False) for s in range(4)}
    client, templates, options = OfflineClient(spec.ire.vlm), load_prompts(""), StepOptions.from_vlm(spec.ire.vlm)
    done = 0
    for i, (_, seed) in enumerate(iter_seed(layout.seed)):
        if i % n != k:
            continue
        recs: dict[int, dict] = {}
        for step in (0, 1, 2, 3):
            rec = run_step(step, input_record(step, seed, recs), client, templates, options=options).record
            sinks[step].append(rec)
            recs[step] = rec
        done += 1
    return done


def make_finished_run(images: Path, labels: Path, results: Path, procs: int = 2) -> tuple[int, float]:
    from producer.seed import SeedReport, write_seed

    t = time.monotonic()
    shutil.rmtree(results, ignore_errors=True)
    results.mkdir(parents=True)
    write_seed(_spec(images, labels, results), results, SeedReport())
    with multiprocessing.get_context("spawn").Pool(procs) as pool:
        n = sum(pool.map(_finish_chunk, [(images, labels, results, k, procs) for k in range(procs)]))
    return n, time.monotonic() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--layout", default="2x16")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/refexp-bench"))
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    deadline = Deadline(a.timeout)
    m = banner("bench.resume: re-running a finished run", images=a.images, layout=a.layout)
    images, labels = make_dataset(a.workdir / f"data-small-{a.images}", a.images, fmt="small")
    results = a.workdir / f"results-resume-{a.images}"
    n, prep_s = make_finished_run(images, labels, results)
    print(f"-- finished run made: {n} images through the four steps (offline teacher, 2 processes) in {prep_s:.1f} s")
    ok = True
    rows = {}
    n_workers, threads = (int(x) for x in a.layout.lower().split("x"))
    with redis_server() as url, fake_vlm(0.0) as fake:
        env = worker_env(url)
        args = spec_args(backend="openai", fake=fake, results=results, images=images, labels=labels)
        with workers(url, n_workers, threads, a.workdir / "logs") as _:
            for label in ("fresh Redis (index rebuilt from the sinks)", "same Redis (index present)"):
                if deadline.left() < 15:
                    print(f"-- {label}: skipped (time bound)")
                    ok = False
                    continue
                fake.reset()
                t = time.monotonic()
                try:
                    bound = max(10, deadline.left())
                    out = producer_run(env, "enqueue", *args, "--wait", "--timeout", str(int(bound - 5)), timeout=bound)
                    text = out.stdout
                except Exception as exc:
                    text = str(exc)
                    ok = False
                secs = time.monotonic() - t
                calls = int(fake.stats()["calls"])
                enq = next((line for line in text.splitlines() if "enqueued" in line), text.strip()[-300:])
                verdict = "meets" if calls == 0 and secs <= 10 else "MISSES"
                print(f"-- {label}: {secs:.2f} s, {calls} VLM calls (target 0 calls, <= 10 s: {verdict})")
                print(f"   producer: {enq.strip()}")
                rows[label] = {"seconds": round(secs, 2), "calls": calls}
                ok = ok and calls == 0 and secs <= 10
    emit_json(a.json, {"bench": "resume", "machine": m, "params": vars(a) | {"workdir": str(a.workdir)},
                       "prepare_s": round(prep_s, 1), **rows})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
