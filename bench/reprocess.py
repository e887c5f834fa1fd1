"""What ``workflow.reprocess: changed`` costs: a re-run that checks every record against the spec.

One finished run of N images made by ``producer run`` against the fake endpoint (OpenAI
protocol, L = 0, structured output), then, each timed end to end with the fake counting calls
per step:

1. ``producer run`` again with ``reprocess: missing`` (the plain resume: nothing published);
2. again with ``reprocess: changed`` and nothing changed (every image-step published and checked:
   its first request rebuilt, the image's hash looked up, the record kept);
3. ``producer estimate --results-dir`` against a new step-3 prompt (the stale count: sinks
   merge-joined with the seed, every record checked in the producer);
4. ``producer run`` with that prompt and ``reprocess: changed`` (step 3 redone, 0-2 kept).

The difference between 2 and 1 over 4N is the check's cost per image-step, everything included
(a message, a task, the sink reads, the hash, a prompt render, the Redis script that marks it).

    .venv/bin/python -m bench.reprocess                 # 1000 images
    .venv/bin/python -m bench.reprocess --images 300
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from bench.common import Deadline, banner, emit_json, fake_vlm, make_dataset, producer_run, spec_args

P = "image_referring_expression"
STEPS = ("region_expr", "image_caption", "grounding_expr", "double_check")


def _env() -> dict[str, str]:
    """``producer run`` brings its own Redis: no REDIS_URL, no API keys."""
    drop = ("REDIS_URL", "GOOGLE_API_KEY", "GEMINI_API_KEY", "OPENAI_API_KEY", "NVIDIA_API_KEY",
            "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "REFEXP_STATE_URL")
    return {k: v for k, v in os.environ.items() if k not in drop} | {"PYTHONUNBUFFERED": "1"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--fmt", default="small", choices=("jpg", "png", "small"))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/refexp-bench"))
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    deadline = Deadline(a.timeout)
    m = banner("bench.reprocess: what a `changed` re-run costs", images=a.images, fmt=a.fmt)
    images, labels = make_dataset(a.workdir / f"data-{a.fmt}-{a.images}", a.images, fmt=a.fmt)
    results = a.workdir / f"results-reprocess-{a.images}"
    prompts = a.workdir / "reprocess-prompts.yaml"
    from worker.steps.prompts import STRUCTURED_TEMPLATES

    prompts.write_text(json.dumps({"double_check_structured": "Be strict about colours.\n"
                                   + STRUCTURED_TEMPLATES["double_check_structured"]}))
    env = _env()
    rows: dict[str, dict] = {}
    ok = True
    with fake_vlm(0.0) as fake:
        def timed(label: str, command: str, *extra: str, fresh: bool = False) -> None:
            nonlocal ok
            if deadline.left() < 20:
                print(f"-- {label}: skipped (time bound)")
                ok = False
                return
            if fresh:
                shutil.rmtree(results, ignore_errors=True)
            fake.reset()
            args = spec_args(backend="openai", fake=fake, results=results, images=images, labels=labels,
                             extra=extra)
            if command == "estimate":
                args.append("--json")
            t = time.monotonic()
            out = producer_run(env, command, *args, timeout=max(20, deadline.left()))
            secs = time.monotonic() - t
            by_step = fake.stats().get("calls_by_step", {})
            row: dict = {"seconds": round(secs, 2), "calls": {s: by_step.get(s, 0) for s in STEPS}}
            if command == "estimate":
                stale = json.loads(out.stdout)["stale"]
                row["stale"] = {s["step"]: s["stale"] for s in stale["steps"]}
            rows[label] = row
            extra_txt = f", stale per step {row['stale']}" if "stale" in row else ""
            print(f"-- {label}: {secs:.2f} s, calls per step {row['calls']}{extra_txt}")

        timed("first run", "run", fresh=True)
        timed("re-run, reprocess: missing", "run")
        timed("re-run, reprocess: changed, nothing changed", "run", f"{P}.workflow.reprocess=changed")
        timed("estimate --results-dir, new step-3 prompt", "estimate", f"{P}.workflow.prompts_file={prompts}")
        timed("re-run, reprocess: changed, new step-3 prompt", "run", f"{P}.workflow.reprocess=changed",
              f"{P}.workflow.prompts_file={prompts}")
    base = rows.get("re-run, reprocess: missing", {}).get("seconds")
    checked = rows.get("re-run, reprocess: changed, nothing changed", {}).get("seconds")
    if base is not None and checked is not None:
        per = (checked - base) / (4 * a.images) * 1000
        print(f"-- the check: {per:.2f} ms per image-step end to end ({checked:.2f} s - {base:.2f} s over "
              f"{4 * a.images} image-steps, one `producer run` worker)")
        rows["check_ms_per_image_step"] = {"ms": round(per, 3)}
        if any(rows["re-run, reprocess: changed, nothing changed"]["calls"].values()):
            print("-- MISSES: a changed re-run with nothing changed made calls")
            ok = False
    est = rows.get("estimate --results-dir, new step-3 prompt")
    if est:
        print(f"-- stale count: {a.images / est['seconds']:.0f} images/s (whole estimate command)")
    emit_json(a.json, {"bench": "reprocess", "machine": m, "params": vars(a) | {"workdir": str(a.workdir)}, **rows})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
