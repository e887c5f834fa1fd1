"""Seeding, finalize, reindex and status at a million images: time, CPU and peak RSS per image.

On demand, not in CI. No VLM and no workers: the step sinks are written here as a finished
run's would be (each image once per step, 2% of them twice, spread over four writer parts;
``--layout main`` writes them into the one main file instead, as main's code wrote them), with
records of ~450 bytes. Each phase runs in a fresh child process (``--code`` picks the tree, so
the same script measures main's code as "before"), which reports its wall time, CPU time and
peak RSS (its own ``VmHWM``; the pool processes' figure is ``ru_maxrss``, an upper bound). Every
phase runs at ``--small`` and at ``--images`` images; the difference gives the
per-image slopes (bytes of RSS, µs of CPU) from which ten million is read off:

    .venv/bin/python -m bench.scale --workdir /tmp/bench-store/scale
    .venv/bin/python -m bench.scale --code /path/to/main --layout main

Phases: ``seed_jsonl`` (``write_seed`` from ``data.input_annotations_jsonl``, width/height
given: no image is opened), ``reseed_jsonl`` (the same again over an existing seed, as every
``producer enqueue`` of a resume does: each kept image's ordinal carried over), ``seed_dir``
(``write_seed`` from ``data.image_dir`` of ``--dir-images`` hard links to one 8x8 PNG,
headers read; no labels), ``finalize`` (``producer.finalize.finalize``, steps 0-3), ``reindex``
(the done index rebuilt from the sinks into a private Redis, ``producer.submit.reindex``) and
``status`` (``producer.status.status`` on that run, timed alone after the reindex).
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

from bench.common import banner, emit_json

REPO = Path(__file__).resolve().parents[1]
P = "image_referring_expression"
STEP_NAMES = {0: "step_0_region_expr", 1: "step_1_image_caption", 2: "step_2_grounding_expr",
              3: "step_3_double_check"}
PIPE = {0: "step0_region_expr", 1: "step1_image_caption", 2: "step2_grounding_expr", 3: "step3_double_check"}

_CHILD = r"""
import json, os, resource, sys, time
phase, root, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
P = "image_referring_expression"
from pathlib import Path
root = Path(root)
results = root / "results"
out = {}
if phase in ("seed_jsonl", "seed_dir", "reseed_jsonl"):
    from producer.seed import SeedReport, write_seed
    from worker.spec import load_spec
    over = [f"results_dir={results}"]
    if phase in ("seed_jsonl", "reseed_jsonl"):
        over.append(f"{P}.data.input_annotations_jsonl={root / 'input.jsonl'}")
    else:
        over.append(f"{P}.data.image_dir={root / 'images'}")
        results = root / "results-dir"
        over[0] = f"results_dir={results}"
    spec = load_spec(None, over)
    if phase == "reseed_jsonl" and not (results / "seed_annotations.jsonl").exists():
        write_seed(spec, results, SeedReport())  # the first seeding (not timed): this phase times the next
    t0, c0 = time.perf_counter(), time.process_time()
    report = SeedReport()
    write_seed(spec, results, report)
    out["images"] = report.images
elif phase == "finalize":
    from producer.finalize import finalize
    from worker.layout import Layout
    t0, c0 = time.perf_counter(), time.process_time()
    rep = finalize(Layout(results), [0, 1, 2, 3])
    out["images"] = rep.written
    out["missing"] = len(rep.missing)
elif phase == "reindex":
    import redis
    from producer.embedded import embedded_redis
    from producer.status import status
    from producer.submit import reindex
    from worker.layout import Layout
    from worker.runstate import RunState
    with embedded_redis() as url:
        state = RunState(redis.Redis.from_url(url), "scale")
        state.store_spec("h", {}, {"steps": [0, 1, 2, 3], "images": n, "enqueue_complete": True,
                                   "indexed": True, "enqueued_at": time.time()})
        t0, c0 = time.perf_counter(), time.process_time()
        import inspect
        # The run's steps, where reindex takes them: images done in every step become bits.
        with_steps = "steps" in inspect.signature(reindex).parameters
        counts = reindex(state, Layout(results), [0, 1, 2, 3]) if with_steps else reindex(state, Layout(results))
        out["images"] = min(counts.values())
        out["used_memory"] = state.r.info("memory")["used_memory"]
        out["wall_s"], out["cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
        t1, c1 = time.perf_counter(), time.process_time()
        st = status(state)
        out["status_wall_s"], out["status_cpu_s"] = time.perf_counter() - t1, time.process_time() - c1
        out["status_done"] = st["steps"]["3"]["done"]
else:
    raise SystemExit(f"unknown phase {phase}")
out.setdefault("wall_s", time.perf_counter() - t0)
kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # finalize's pool processes (and redis-server: not counted)
pool = kids.ru_utime + kids.ru_stime if phase == "finalize" else 0.0
out.setdefault("cpu_s", time.process_time() - c0 + pool)
# VmHWM, not ru_maxrss: a child started by vfork+exec inherits the starter's RSS in ru_maxrss
# (Linux keeps the larger of the old and new address space's high-water mark across exec).
out["peak_rss_kb"] = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
out["child_peak_rss_kb"] = kids.ru_maxrss if phase == "finalize" else 0
print(json.dumps(out))
"""

_TINY_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000080000000808020000004b6d29dc0000001249444154789c63"
    "f8ffff3f0329102b1832000066f90fa8cba1a4a40000000049454e44ae426082")


def _ids(n: int) -> list[str]:
    """Image ids in a shuffled order (a fixed permutation), as an unsorted input would have them."""
    return [f"img{(i * 7919) % n:08d}" for i in range(n)]


def make_input(root: Path, n: int) -> None:
    (root / "tiny.png").write_bytes(_TINY_PNG)
    with open(root / "input.jsonl", "w") as f:
        for image_id in _ids(n):
            f.write(f'{{"image_id":"{image_id}","image_path":"tiny.png","width":8,"height":8,'
                    f'"kitti_bboxes":[[1,1,5,5,"Car"],[2,2,7,7,"Pedestrian"]]}}\n')


def make_image_dir(root: Path, n: int) -> None:
    images = root / "images"
    images.mkdir()
    for i, image_id in enumerate(_ids(n)):
        source = root / f"tiny-{i // 50_000}.png"  # ext4 allows 65,000 links to one file
        if i % 50_000 == 0:
            source.write_bytes(_TINY_PNG)
        os.link(source, images / f"{image_id}.png")


def _record(step: int, image_id: str, root: Path) -> str:
    body = {0: '"regions":[{"bbox_2d":[100,120,400,500],"type":"Car","color":"red","description":"a red car"}]',
            1: '"caption":"A street with a red car parked on the right and a pedestrian crossing."',
            2: '"expressions":[{"expression_id":"x-0","text":"the red car","instances":[{"bbox_id":"b-0",'
               '"bbox":[1,1,5,5],"bbox_score":1.0}]}]',
            3: '"expressions":[{"expression_id":"x-0","text":"the red car","instances":[{"bbox_id":"b-0",'
               '"bbox":[1,1,5,5],"bbox_score":1.0}],"verified":true}]'}[step]
    return (f'{{"image_id":"{image_id}","image_path":"{root}/tiny.png","width":8,"height":8,'
            f'"kitti_bboxes":[[1,1,5,5,"Car"],[2,2,7,7,"Pedestrian"]],{body},'
            f'"source":"image_referring_expression","pipeline_steps":["{PIPE[step]}"],'
            f'"meta":{{"{PIPE[step]}":{{"call":{{"input_tokens":812,"output_tokens":64,"latency_s":0.41}}}}}}}}\n')


def make_sinks(root: Path, n: int, layout: str) -> int:
    """Each step: every image once, 2% again (a retried or forced record); bytes written."""
    results = root / "results"
    ids = _ids(n)
    total = 0
    for step, name in STEP_NAMES.items():
        folder = results / name
        folder.mkdir(parents=True, exist_ok=True)
        main = folder / "annotations.jsonl"
        main.touch()
        if layout == "parts":
            (folder / "annotations.parts").mkdir()
            files = [open(folder / "annotations.parts" / f"{k:06d}.jsonl", "w") for k in (1, 2, 3, 4)]  # noqa: SIM115
        else:
            files = [open(main, "w")]  # noqa: SIM115
        try:
            for i, image_id in enumerate(ids):
                line = _record(step, image_id, root)
                files[i % len(files)].write(line)
                total += len(line)
            for image_id in ids[::50]:
                line = _record(step, image_id, root)
                files[-1].write(line)
                total += len(line)
        finally:
            for f in files:
                f.close()
    return total


def child(code: Path, phase: str, root: Path, n: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code)}
    done = subprocess.run([sys.executable, "-c", _CHILD, phase, str(root), str(n)], cwd=code, env=env,
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"{phase} at {n}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=1_000_000)
    ap.add_argument("--small", type=int, default=100_000)
    ap.add_argument("--dir-images", type=int, default=200_000, help="images in data.image_dir (hard links)")
    ap.add_argument("--code", default=str(REPO), help="the tree whose producer is measured")
    ap.add_argument("--layout", choices=("parts", "main"), default="parts")
    ap.add_argument("--phases", default="seed_jsonl,seed_dir,finalize,reindex")
    ap.add_argument("--workdir", default="/tmp/bench-scale")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    code = Path(args.code).resolve()
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=code, capture_output=True,
                         text=True).stdout.strip()
    m = banner("scale: seeding, finalize, reindex and status", images=args.images, small=args.small,
               dir_images=args.dir_images, code=f"{code} ({rev})", layout=args.layout)
    phases = args.phases.split(",")
    rows: dict[str, dict[int, dict]] = {}
    for n, n_dir in ((args.small, args.dir_images // 10), (args.images, args.dir_images)):
        root = Path(args.workdir) / f"n{n}"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        t = time.perf_counter()
        make_input(root, n)
        if "seed_dir" in phases:
            make_image_dir(root, n_dir)
        print(f"-- {n} images: inputs made in {time.perf_counter() - t:.1f} s", flush=True)
        for phase in phases:
            if phase in ("finalize", "reindex") and not (root / "results" / STEP_NAMES[0]).exists():
                if "seed_jsonl" not in phases:
                    child(code, "seed_jsonl", root, n)
                t = time.perf_counter()
                size = make_sinks(root, n, args.layout)
                print(f"   step sinks written ({size / 1e9:.2f} GB) in {time.perf_counter() - t:.1f} s", flush=True)
            size_n = n_dir if phase == "seed_dir" else n
            r = child(code, phase, root, size_n)
            r["n"] = size_n
            rows.setdefault(phase, {})[n] = r
            rate = r["images"] / r["wall_s"] if r["wall_s"] else float("inf")
            print(f"   {phase:<10} n={size_n:>8}: {r['wall_s']:7.2f} s wall, {r['cpu_s']:7.2f} s CPU, "
                  f"{rate:>9,.0f} images/s, peak RSS {r['peak_rss_kb'] / 1024:6.0f} MB"
                  + (f" (+ largest pool process {r['child_peak_rss_kb'] / 1024:.0f} MB)"
                     if r.get("child_peak_rss_kb") else "")
                  + (f", Redis used_memory {r['used_memory'] / 2**20:.0f} MB" if "used_memory" in r else ""),
                  flush=True)
            if "status_wall_s" in r:
                print(f"   status     n={size_n:>8}: {r['status_wall_s'] * 1000:7.1f} ms wall, "
                      f"{r['status_cpu_s'] * 1000:.1f} ms CPU (done in step 3: {r['status_done']})", flush=True)
        shutil.rmtree(root, ignore_errors=True)
    print("\nper-image slopes (small -> large) and 10M read off them:")
    print(f"{'phase':<10} {'images/s':>9} {'µs CPU/img':>10} {'RSS B/img':>10} {'peak RSS':>9} {'10M: RSS':>9} "
          f"{'10M: wall':>9}")
    summary = {}
    for phase, by_n in rows.items():
        a, b = by_n[args.small], by_n[args.images]
        dn = b["n"] - a["n"]
        rss_slope = (b["peak_rss_kb"] - a["peak_rss_kb"]) * 1024 / dn if dn else 0.0
        cpu_us = b["cpu_s"] / b["n"] * 1e6
        rate = b["images"] / b["wall_s"] if b["wall_s"] else float("inf")
        rss_10m = b["peak_rss_kb"] * 1024 + rss_slope * (10_000_000 - b["n"])
        wall_10m = b["wall_s"] * 10_000_000 / b["n"]
        summary[phase] = {"rate": rate, "cpu_us_per_image": cpu_us, "rss_bytes_per_image": rss_slope,
                          "peak_rss_mb": b["peak_rss_kb"] / 1024, "rss_10m_mb": rss_10m / 2**20, "wall_10m_s": wall_10m,
                          "small": a, "large": b}
        print(f"{phase:<10} {rate:>9,.0f} {cpu_us:>10.1f} {rss_slope:>10.1f} {b['peak_rss_kb'] / 1024:>8.0f}M "
              f"{rss_10m / 2**20:>8.0f}M {wall_10m:>8.0f}s")
        if "status_wall_s" in b:
            summary["status"] = {"small_ms": a["status_wall_s"] * 1e3, "large_ms": b["status_wall_s"] * 1e3}
            print(f"{'status':<10} {a['status_wall_s'] * 1e3:.1f} ms at {a['n']:,}, {b['status_wall_s'] * 1e3:.1f} ms "
                  f"at {b['n']:,} (per call)")
    emit_json(args.json, {"machine": m, "params": vars(args), "phases": summary})


if __name__ == "__main__":
    main()
