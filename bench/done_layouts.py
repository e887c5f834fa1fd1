"""Issue 16: what the done index costs Redis per image-step, in the layouts it could take.

Measured before choosing one (issue 16, "Redis O(window)"): N image-steps of one step are
written into a private redis-server in each layout, and ``used_memory`` (less client buffers)
before and after gives the bytes per image-step; status's read (HLEN, a counter or BITCOUNT) is
timed on the full index. Layouts:

- ``hash``: today's ``done:<step>`` hash, ``image_id -> sink offset`` (a hashtable past
  ``hash-max-listpack-entries`` = 128 entries);
- ``buckets``: the same pairs spread over hashes of ~``--bucket`` entries each
  (``done:<step>:<crc32(id) % B>``), so each stays listpack-encoded; status then needs a
  counter beside them (one more key, not per image);
- ``bitmap``: one bit per image-step at the image's ordinal in the seed (``SETBIT``), plus a
  window hash holding ``image_id -> offset`` for the ``--window`` images in flight only;
  status reads ``BITCOUNT``.

    .venv/bin/python -m bench.done_layouts --images 1000000
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib

from bench.common import banner, emit_json, redis_client, redis_server

BATCH = 5000


def _used(r) -> int:
    info = r.info("memory")
    return int(info["used_memory"]) - int(info.get("mem_clients_normal", 0))


def _fill(r, n: int, write) -> None:
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        write(pipe, i)
        if (i + 1) % BATCH == 0:
            pipe.execute()
    pipe.execute()


def _timed(fn, runs: int = 5) -> float:
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure(url: str, layout: str, n: int, *, id_format: str, bucket: int, window: int) -> dict:
    """Bytes per image-step of ``layout`` holding ``n`` image-steps, and its status read's time."""
    r = redis_client(url)
    r.flushall()
    before = _used(r)
    key = "refexp:run:bench:done:0"
    image = id_format.format
    if layout == "hash":
        _fill(r, n, lambda p, i: p.hset(key, image(i), i * 700))
        status = lambda: r.hlen(key)  # noqa: E731
    elif layout == "buckets":
        nb = max(1, -(-n // bucket))
        _fill(r, n, lambda p, i: p.hset(f"{key}:{zlib.crc32(image(i).encode()) % nb}", image(i), i * 700))
        r.set(f"{key}:count", n)
        status = lambda: r.get(f"{key}:count")  # noqa: E731
    elif layout == "bitmap":
        # Every image-step done: bits 0..n-1 set, written a byte at a time (the same string
        # SETBIT by SETBIT would leave, in a fraction of the round trips).
        _fill(r, -(-n // 8), lambda p, i: p.setrange(f"{key}:bits", i, b"\xff" if (i + 1) * 8 <= n
                                                      else bytes([(0xff00 >> (n - i * 8)) & 0xff])))
        _fill(r, min(window, n), lambda p, i: p.hset(f"{key}:win", image(n - 1 - i), (n - 1 - i) * 700))
        status = lambda: r.bitcount(f"{key}:bits")  # noqa: E731
    else:
        raise ValueError(layout)
    after = _used(r)
    took = _timed(status)
    if layout == "bitmap":
        assert r.bitcount(f"{key}:bits") == n
    r.flushall()
    return {"layout": layout, "image_steps": n, "bytes": after - before,
            "bytes_per_image_step": round((after - before) / n, 2), "status_read_ms": round(took * 1000, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1_000_000, help="image-steps written per layout")
    ap.add_argument("--layouts", default="hash,buckets,bitmap")
    ap.add_argument("--id-format", default="img_{:08d}", help="image ids (KITTI's are 6 digits: {:06d})")
    ap.add_argument("--bucket", type=int, default=100, help="entries per bucket hash (listpack up to 128)")
    ap.add_argument("--window", type=int, default=1000, help="images in flight (bitmap layout's window hash)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    m = banner("bench.done_layouts: Redis bytes per image-step of the done index", images=a.images,
               layouts=a.layouts, id_format=a.id_format, bucket=a.bucket, window=a.window)
    out = []
    with redis_server() as url:
        for layout in a.layouts.split(","):
            res = measure(url, layout, a.images, id_format=a.id_format, bucket=a.bucket, window=a.window)
            print(f"-- {layout}: {res['bytes_per_image_step']} B per image-step ({res['bytes']} B for "
                  f"{res['image_steps']}); status read {res['status_read_ms']} ms")
            sys.stdout.flush()
            out.append(res)
    emit_json(a.json, {"bench": "done_layouts", "machine": m, "params": vars(a), "runs": out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
