"""Target 3: the orchestration ceiling. The endpoint answers at once (L = 0), so the figure is
how many images/s (and tasks/s) Celery, Redis, the sinks and our code move through all four
steps; one worker is sampled with py-spy for the run to say where its time goes.

    .venv/bin/python -m bench.ceiling                        # 600 images, 2 workers x 16, profile on
    .venv/bin/python -m bench.ceiling --layout 1x32 --fmt small --no-profile
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.common import Deadline, banner, emit_json, fake_vlm, make_dataset, redis_server
from bench.fleetrun import print_run, run_layouts, summarize_profile


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--concurrency", type=int, default=32, help="vlm.max_concurrency (C)")
    ap.add_argument("--layout", default="2x16", help="workers x threads, comma-separated to compare several")
    ap.add_argument("--fmt", choices=("jpg", "png", "small"), default="jpg")
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="experiment: start workers with sys.setswitchinterval(S)")
    ap.add_argument("--warmup", type=int, default=16,
                    help="images through the fleet before the measured run (0 = measure a cold fleet)")
    ap.add_argument("--no-events", action="store_true",
                    help="start workers without -E (worker/app.py sets worker_send_task_events, so task events "
                         "are still sent: this changes nothing today)")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/refexp-bench"))
    ap.add_argument("--timeout", type=float, default=240)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    deadline = Deadline(a.timeout)
    m = banner("bench.ceiling: orchestration at L = 0", images=a.images, C=a.concurrency, layout=a.layout,
               fmt=a.fmt, events=not a.no_events, profile=not a.no_profile, warmup=a.warmup)
    images_dir, labels_dir = make_dataset(a.workdir / f"data-{a.fmt}-{a.images}", a.images, fmt=a.fmt)
    ok = True
    with redis_server() as url, fake_vlm(0.0, "fixed") as fake:
        for n, t, res in run_layouts(a, redis_url=url, fake=fake, images_dir=images_dir, labels_dir=labels_dir,
                                     deadline=deadline, tag="ceiling", profile_seconds=0 if a.no_profile else 8):
            if res is None:
                ok = False
                continue
            fig = print_run(f"{n} workers x {t} threads, L=0", res, concurrency=a.concurrency, latency=0.0,
                            dist="fixed")
            tasks = 4 * res.finished  # every image runs four tasks (no-box images skip the call, not the task)
            tps = tasks / res.window if res.window > 0 else float("nan")
            cpu_total = sum(res.cpu.values())
            print(f"   tasks/s {tps:.1f}; CPU per task (all processes) {1000 * cpu_total / max(tasks, 1):.1f} ms: "
                  + ", ".join(f"{k} {1000 * v / max(tasks, 1):.1f}" for k, v in res.cpu.items()))
            fig.update(tasks_per_s=round(tps, 1), cpu_ms_per_task={k: round(1000 * v / max(tasks, 1), 2)
                                                                    for k, v in res.cpu.items()})
            if res.profile:
                lines = summarize_profile(Path(res.profile))
                print("\n".join("   " + x for x in lines))
                fig["profile"] = lines
            emit_json(a.json, {"bench": "ceiling", "machine": m, "params": vars(a) | {"layout": f"{n}x{t}",
                                                                                     "workdir": str(a.workdir)},
                               **fig})
            ok = ok and not res.bound_hit
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
