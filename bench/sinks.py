"""Sink appends/s with 1, 2, 4 and 8 writer processes: main's one locked file against parts.

"before" is main's ``worker/sinks.py`` (``git show <ref>:worker/sinks.py``, loaded by path):
every append takes the ``flock`` of the one step file, writes, fsyncs and reads the line back.
"after" is this tree's step sink (``Layout.sink``: ``parts=True``): each writer process appends
to its own part, with no lock between processes, and the same fsync and read-back per line.
Each writer appends ``--records`` records of about ``--record-bytes`` bytes (a step record is
~1-3 KB); the figure is the fleet's appends/s from the start signal to the last writer's end.
Only a local filesystem is here: on NFS/EFS every lock and fsync is a network round trip, so
"before" is bounded by one lock round trip per record fleet-wide, "after" by each writer's own
fsync round trip (see docs/architecture.md).

    .venv/bin/python -m bench.sinks --workdir /tmp/bench-store
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.common import banner, emit_json

REPO = Path(__file__).resolve().parents[1]

_WRITER = r"""
import importlib.util, os, sys, time
impl, path, n, size, go, src = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
if impl == "before":
    spec = importlib.util.spec_from_file_location("main_sinks", src)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["main_sinks"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    sink = mod.JsonlSink(path)
else:
    from worker.sinks import JsonlSink
    sink = JsonlSink(path, parts=True)
pad = "x" * size
me = os.getpid()
while not os.path.exists(go):
    time.sleep(0.0005)
for i in range(n):
    sink.append({"image_id": f"{me}-{i}", "pad": pad})
"""


def run(impl: str, writers: int, records: int, size: int, work: Path, before_src: Path) -> float:
    """Appends/s for ``writers`` processes each appending ``records`` lines."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    path, go = work / "step_0" / "annotations.jsonl", work / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, impl, str(path), str(records), str(size), str(go),
                               str(before_src)], cwd=REPO, env=env) for _ in range(writers)]
    time.sleep(1.0)  # let every interpreter start and reach its wait loop (not a sync: the go file is)
    start = time.perf_counter()
    go.touch()
    for p in procs:
        if p.wait(timeout=300) != 0:
            raise SystemExit(f"a {impl} writer failed")
    elapsed = time.perf_counter() - start
    lines = sum(f.read_bytes().count(b"\n") for f in path.parent.rglob("*.jsonl"))  # main file and parts
    if lines != writers * records:
        raise SystemExit(f"{impl}: {lines} lines on disk, expected {writers * records}")
    return writers * records / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--writers", default="1,2,4,8")
    ap.add_argument("--records", type=int, default=1500, help="appends per writer")
    ap.add_argument("--record-bytes", type=int, default=1500)
    ap.add_argument("--before-ref", default="11fe7fa", help="the commit whose worker/sinks.py is 'before'")
    ap.add_argument("--workdir", default="/tmp/bench-sinks")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    m = banner("sink appends/s by writer processes", records=args.records, record_bytes=args.record_bytes,
               before=args.before_ref)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    before_src = work / "main_sinks.py"
    before_src.write_bytes(subprocess.run(["git", "show", f"{args.before_ref}:worker/sinks.py"], cwd=REPO,
                                          check=True, capture_output=True).stdout)
    out = {"machine": m, "rows": []}
    print(f"{'writers':>8} {'before/s':>10} {'after/s':>10} {'after÷before':>13}")
    for w in (int(x) for x in args.writers.split(",")):
        before = run("before", w, args.records, args.record_bytes, work / "run", before_src)
        after = run("after", w, args.records, args.record_bytes, work / "run", before_src)
        out["rows"].append({"writers": w, "before": before, "after": after})
        print(f"{w:>8} {before:>10.0f} {after:>10.0f} {after / before:>13.2f}", flush=True)
    shutil.rmtree(work / "run", ignore_errors=True)
    emit_json(args.json, out)


if __name__ == "__main__":
    main()
