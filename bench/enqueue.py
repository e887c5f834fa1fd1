"""Target 4: one ``producer enqueue`` publishing 100k pre-seeded images, no workers running.

The 100k records come as ``data.input_annotations_jsonl`` with ``width``/``height`` given (so
seeding reads no image) and one shared tiny image file, each with three KITTI boxes. Measured:
the seeding time, images/s published (from the run's in-flight set, which the producer fills
batch by batch), the producer's RSS as the count grows (peak and at every 10k), and Redis
``used_memory`` per pending image, with the queue's messages taken apart. Then, on the same
Redis flushed, the baseline: one process publishing the same chord per image with Celery's
canvas and ``.apply_async()`` (``--plain-images``, default up to 20k), its images/s printed
beside the producer's.

    .venv/bin/python -m bench.enqueue                    # 100k images
    .venv/bin/python -m bench.enqueue --images 20000 --timeout 120
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.common import (
    PY,
    ROOT,
    Deadline,
    banner,
    children_of,
    emit_json,
    hwm_mb,
    producer_popen,
    redis_client,
    redis_server,
    run_key,
    stop_group,
    tree_pss_mb,
    tree_rss_mb,
    worker_env,
)
from worker.keys import QUEUE_LISTS, queue_list
from worker.stepdefs import STEP


def make_records(out: Path, n: int) -> Path:
    """``n`` seed records sharing one tiny PNG, width/height given."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    path = out / f"input-{n}.jsonl"
    if path.exists():
        return path
    Image.new("RGB", (8, 8), (90, 90, 90)).save(out / "tiny.png")
    boxes = [[100.0, 150.0, 220.0, 260.0, "Car"], [400.5, 160.0, 470.0, 300.0, "Pedestrian"],
             [700.0, 120.0, 980.0, 330.0, "Truck"]]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"image_id": f"img_{i:07d}", "image_path": "tiny.png", "width": 1242,
                                "height": 375, "kitti_bboxes": boxes}) + "\n")
    tmp.rename(path)
    return path


def describe_message(raw: bytes) -> list[str]:
    """One queued message, taken apart: envelope, headers, body."""
    msg = json.loads(raw)
    body = msg.get("body", "")
    props = msg.get("properties", {})
    decoded = base64.b64decode(body) if props.get("body_encoding") == "base64" else body.encode()
    body = json.dumps(body)[1:-1] if props.get("body_encoding") != "base64" else body  # as stored
    headers = msg.get("headers", {})
    lines = [f"message {len(raw)} B: body {len(body)} B as sent ({props.get('body_encoding')}; "
             f"{len(decoded)} B decoded), headers {len(json.dumps(headers))} B, properties "
             f"{len(json.dumps(props))} B; task {headers.get('task')}"]
    try:
        args, _kwargs, embed = json.loads(decoded)
        lines.append(f"  body: args {json.dumps(args)}; embed keys {sorted(embed)}; "
                     f"chord {len(json.dumps(embed.get('chord')))} B, chain {len(json.dumps(embed.get('chain')))} B")
    except (ValueError, TypeError):
        pass
    big = sorted(((k, len(json.dumps(v))) for k, v in headers.items()), key=lambda kv: -kv[1])[:8]
    lines.append("  largest headers: " + ", ".join(f"{k} {n} B" for k, n in big))
    return lines


def plain_loop(n: int) -> None:
    """The baseline, run as its own process (``--plain-loop N``): ``n`` images, each the chord
    ``producer.publish.canvas`` builds for steps 0-3, sent by ``.apply_async()`` one by one
    through the app at ``REDIS_URL``. Prints ``plain <n> <seconds>``."""
    from producer.publish import canvas

    canvas([0, 1, 2, 3], "run0:spec0", "warm", 0).apply_async()  # connections up, outside the timing
    t0 = time.perf_counter()
    for i in range(n):
        canvas([0, 1, 2, 3], "run0:spec0", f"img_{i:07d}", i * 180).apply_async()
    print(f"plain {n} {time.perf_counter() - t0:.3f}")


def run_plain(env: dict[str, str], n: int, timeout: float) -> float:
    """images/s of ``plain_loop(n)`` in a fresh process."""
    out = subprocess.run([PY, "-m", "bench.enqueue", "--plain-loop", str(n)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("plain "))
    _, count, secs = line.split()
    return int(count) / float(secs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/refexp-bench"))
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--list-compress-depth", type=int, default=None,
                    help="Redis list-compress-depth for the bench's private server (default: as shipped, "
                         "producer.embedded.LIST_COMPRESS_DEPTH; 0 = Redis's own default, off)")
    ap.add_argument("--publishers", type=int, default=0,
                    help="producer enqueue --publishers (0 = its default: by run size and cores)")
    ap.add_argument("--plain-images", type=int, default=20_000,
                    help="images for the plain apply_async baseline (at most --images; 0 = skip it)")
    ap.add_argument("--plain-loop", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.plain_loop is not None:
        plain_loop(a.plain_loop)
        return 0
    deadline = Deadline(a.timeout)
    m = banner("bench.enqueue: one producer publishing pre-seeded images, no workers", images=a.images)
    data = a.workdir / "enqueue-data"
    jsonl = make_records(data, a.images)
    results = a.workdir / "results-enqueue"
    shutil.rmtree(results, ignore_errors=True)
    marks = list(range(10_000, a.images + 1, 10_000)) or [a.images]
    rss_at: dict[int, float] = {}
    with redis_server() as url:
        r = redis_client(url)
        if a.list_compress_depth is not None:
            r.config_set("list-compress-depth", a.list_compress_depth)
        depth = r.config_get("list-compress-depth")["list-compress-depth"]
        print(f"redis list-compress-depth {depth}")
        mem0 = int(r.info("memory")["used_memory"])
        mem_peak = mem0
        env = worker_env(url)
        p = "image_referring_expression"
        t0 = time.monotonic()
        prod = producer_popen(env, "enqueue", f"{p}.vlm.backend=offline",
                              f"{p}.data.input_annotations_jsonl={jsonl}", "--results-dir", str(results),
                              "--max-inflight", str(10 * a.images), "--publishers", str(a.publishers),
                              log=a.workdir / "enqueue-producer.log")
        rid = None
        t_first = t_last = None
        published = 0
        peak = 0.0
        n_publishers = 0
        pss_peak = 0.0
        try:
            while prod.poll() is None and not deadline.hit:
                kids = children_of(prod.pid)
                n_publishers = max(n_publishers, len(kids))
                peak = max(peak, tree_rss_mb(prod.pid), hwm_mb(prod.pid))
                pss_peak = max(pss_peak, tree_pss_mb(prod.pid))
                if rid is None and (results / "run.json").exists():
                    rid = json.loads((results / "run.json").read_text())["run_id"]
                if rid is not None:
                    published = int(r.hlen(run_key(rid, "queued")))
                    mem_peak = max(mem_peak, int(r.info("memory")["used_memory"]))
                    now = time.monotonic()
                    if published and t_first is None:
                        t_first = now
                    if published:
                        t_last = now
                    for mark in marks:
                        if mark not in rss_at and published >= mark:
                            rss_at[mark] = tree_rss_mb(prod.pid)
                time.sleep(0.05)
        finally:
            bound = prod.poll() is None
            if bound:
                stop_group(prod, timeout=10)
        elapsed = time.monotonic() - t0
        if rid is not None:
            published = int(r.hlen(run_key(rid, "queued")))
        mem1 = int(r.info("memory")["used_memory"])
        qlen = sum(int(r.llen(q)) for q in QUEUE_LISTS)  # every priority's list
        heads = queue_list(STEP[0].priority)  # chord headers wait in the head steps' priority list
        sample = r.lindex(heads, -1)  # the oldest message: a chord header
        sample_usage = {k: r.memory_usage(k) or 0 for k in (heads, run_key(rid, "queued") if rid else "")}
        keys = int(r.dbsize())
        chord_keys = sum(1 for _ in r.scan_iter(match="*chord*", count=10_000))
        chord_sizes = sum(1 for _ in r.scan_iter(match="celery-taskset-meta-*.s", count=10_000))
        plain_n = min(a.plain_images, a.images)
        plain_rate = float("nan")
        if plain_n > 0 and not bound:
            r.flushall()
            plain_rate = run_plain(env, plain_n, timeout=max(30.0, deadline.left()))

    seed_s = (t_first - t0) if t_first else float("nan")
    rate = (published - 200) / (t_last - t_first) if t_first and t_last and t_last > t_first else float("nan")
    per_image = (mem1 - mem0) / published if published else float("nan")
    partial = " (PARTIAL: time bound hit, producer stopped)" if bound else ""
    print(f"-- {published}/{a.images} images published in {elapsed:.1f} s{partial}")
    print(f"   seeding + start (launch -> first batch marked) {seed_s:.1f} s; publishing {rate:.0f} images/s "
          f"(target >= 1000); plain apply_async loop, one process, {plain_n} images: {plain_rate:.0f} images/s "
          f"(producer / plain {rate / plain_rate:.2f}x)")
    print(f"   producer RSS, its {n_publishers} child processes included: peak {peak:.0f} MB "
          f"(target <= 150; PSS, shared pages counted once: {pss_peak:.0f} MB); at " +
          ", ".join(f"{k // 1000}k {v:.0f}" for k, v in sorted(rss_at.items())) + " MB")
    if len(rss_at) >= 2:
        ks = sorted(rss_at)
        print(f"   RSS growth {ks[0] // 1000}k -> {ks[-1] // 1000}k: {rss_at[ks[-1]] - rss_at[ks[0]]:+.1f} MB")
    print(f"   Redis used_memory peak while the producer was connected +{(mem_peak - mem0) / 2**20:.1f} MB")
    per = max(published, 1)
    queued_key = run_key(rid, "queued") if rid else ""
    print(f"   Redis used_memory +{(mem1 - mem0) / 2**20:.1f} MB = {per_image:.0f} B per pending image "
          f"(target <= 2048); {qlen} messages in the queue ({qlen / per:.2f} per image), {keys} keys "
          f"({chord_keys} chord keys, {chord_sizes} chord-size keys); "
          f"queue list {sample_usage.get('refexp', 0) / per:.0f} B/image, "
          f"in-flight hash {sample_usage.get(queued_key, 0) / per:.0f} B/image")
    if sample:
        print("\n".join("   " + x for x in describe_message(sample)))
    emit_json(a.json, {"bench": "enqueue", "machine": m, "params": vars(a) | {"workdir": str(a.workdir)},
                       "published": published, "elapsed_s": round(elapsed, 1), "seed_s": round(seed_s, 1),
                       "images_per_s": round(rate), "plain_images": plain_n,
                       "plain_images_per_s": round(plain_rate) if plain_rate == plain_rate else None,
                       "rss_peak_mb": round(peak), "pss_peak_mb": round(pss_peak),
                       "child_processes": n_publishers,
                       "rss_at_mb": {k: round(v, 1) for k, v in rss_at.items()},
                       "redis_bytes_per_image": round(per_image), "list_compress_depth": int(depth),
                       "messages_per_image": round(qlen / per, 2),
                       "bound_hit": bound})
    return 0 if not bound and rate >= 1000 and peak <= 150 and per_image <= 2048 else 1


if __name__ == "__main__":
    sys.exit(main())
