"""Issue 15 goal 2: client CPU per VLM call, and how much of it is the image.

Runs every step of ``--images`` images one call at a time through our step functions and the
OpenAI SDK against the fake endpoint (its own process, no latency), and prints this process's
CPU time per call (``time.process_time``: the endpoint's decoding is not in it), split into the
image payload (read, check, convert) and the rest (prompt, SDK, HTTP, parse), with
``vlm.downscale_to_pixels`` off and at each ``--downscale`` size. Converted images are kept
under the run's results dir as the fleet keeps them, so their cost is amortised over an
image's four calls as in a run.

    .venv/bin/python -m bench.callcpu --fmt big --images 24 --downscale 0,1000000
    .venv/bin/python -m bench.callcpu --fmt png --images 64
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path

from bench.common import Deadline, banner, emit_json, fake_vlm, make_dataset
from bench.fleetrun import _DirectRun


def _measure(run: _DirectRun, options, images: list[str]) -> dict:
    """CPU s of every call of every image, in step order, and of its payload loads."""
    from importlib import import_module

    from worker.steps import input_record, run_step

    converse = import_module("worker.steps.converse")  # the package re-exports a function of that name

    payload_cpu = [0.0]
    original = converse.checked_payload

    def timed(*args, **kwargs):
        t = time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            payload_cpu[0] += time.process_time() - t

    converse.checked_payload = timed
    calls, failures = 0, 0
    t0 = time.process_time()
    w0 = time.monotonic()
    try:
        for image_id in images:
            records: dict[int, dict] = {}
            for step in (0, 1, 2, 3):
                try:
                    out = run_step(step, input_record(step, run.seeds[image_id], records), run.client,
                                   run.templates, max_pixels=run.vlm.max_image_pixels, options=options)
                except Exception as exc:  # counted and shown, the bench goes on
                    failures += 1
                    print(f"   {image_id} step {step}: {type(exc).__name__}: {exc}")
                    break
                records[step] = out.record
                calls += 1 if out.response is not None else 0
    finally:
        converse.checked_payload = original
    cpu = time.process_time() - t0
    return {"calls": calls, "failures": failures, "cpu_s": cpu, "wall_s": time.monotonic() - w0,
            "payload_cpu_s": payload_cpu[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fmt", choices=("jpg", "png", "small", "big"), default="big")
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--downscale", default="0,1000000",
                    help="comma-separated vlm.downscale_to_pixels values to measure (0 = off)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/refexp-bench"))
    ap.add_argument("--timeout", type=float, default=170)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    deadline = Deadline(a.timeout)
    m = banner("bench.callcpu: client CPU per VLM call", fmt=a.fmt, images=a.images, downscale=a.downscale)
    images_dir, labels_dir = make_dataset(a.workdir / f"data-{a.fmt}-{a.images}", a.images, fmt=a.fmt)
    sizes = sorted({p.stat().st_size for p in images_dir.iterdir()})
    print(f"-- {a.images} {a.fmt} images, {sizes[0] / 1e6:.2f}-{sizes[-1] / 1e6:.2f} MB")
    ok = True
    with fake_vlm(0.0) as fake:
        results = a.workdir / "results-callcpu"
        run = _DirectRun(fake=fake, images_dir=images_dir, labels_dir=labels_dir, results=results,
                         concurrency=1, name="callcpu")
        ids = sorted(run.seeds)
        _measure(run, run.options, ids[:2])  # warm the SDK, the imports and the page cache
        fields = {f.name for f in dataclasses.fields(run.options)}
        for pixels in (int(x) for x in a.downscale.split(",")):
            if deadline.hit:
                break
            if pixels and "downscale_to_pixels" not in fields:
                print(f"-- downscale {pixels}: this code has no vlm.downscale_to_pixels (skipped)")
                continue
            shutil.rmtree(results / ".image-cache", ignore_errors=True)
            extra = {"downscale_to_pixels": pixels, "image_cache_dir": str(results / ".image-cache")} \
                if "image_cache_dir" in fields else {}
            options = dataclasses.replace(run.options, **extra)
            r = _measure(run, options, ids)
            calls = max(1, r["calls"])
            label = f"downscale_to_pixels={pixels}" if pixels else "as they are"
            print(f"-- images sent {label}: {r['calls']} calls, {r['failures']} failures; CPU per call "
                  f"{1000 * r['cpu_s'] / calls:.1f} ms (image payload {1000 * r['payload_cpu_s'] / calls:.1f} ms, "
                  f"the rest {1000 * (r['cpu_s'] - r['payload_cpu_s']) / calls:.1f} ms); wall per call "
                  f"{1000 * r['wall_s'] / calls:.1f} ms (the endpoint decoding included)")
            emit_json(a.json, {"bench": "callcpu", "machine": m, "params": vars(a) | {"workdir": str(a.workdir)},
                               "downscale_to_pixels": pixels, "calls": r["calls"], "failures": r["failures"],
                               "cpu_ms_per_call": round(1000 * r["cpu_s"] / calls, 2),
                               "payload_cpu_ms_per_call": round(1000 * r["payload_cpu_s"] / calls, 2),
                               "wall_ms_per_call": round(1000 * r["wall_s"] / calls, 2)})
            ok = ok and not r["failures"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
