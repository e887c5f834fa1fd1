"""``producer finalize``: ``annotations.jsonl`` from the sinks, one record per image, sorted.

Works from the files alone (no Redis): the final record per image is read at the offset of the
last valid line of each step sink that makes it (``stepdefs.final_steps``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from producer.seed import iter_seed
from producer.summary import write_summary
from producer.usage import usage_from_sinks
from worker import stepdefs
from worker.layout import Layout
from worker.sinks import ReadStats, dumps
from worker.steps import final_record
from worker.steps.records import deterministic


@dataclass
class FinalizeReport:
    path: Path
    written: int = 0
    failed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    bad_lines: int = 0
    usage: dict = field(default_factory=dict)
    stale_removed: list[tuple[str, int]] = field(default_factory=list)
    seed_failed: int = 0  # images that could not be seeded (not in the seed file, so not in failed)


def _failed_ids(layout: Layout, done: dict[int, dict[str, int]]) -> set[str]:
    """Images with a failure line for a step that is still not done."""
    failed = set()
    for _, rec in layout.failures.scan():
        step = rec.get("step")
        if isinstance(step, int) and rec["image_id"] in done.get(step, {}):
            continue
        failed.add(rec["image_id"])
    return failed


def finalize(layout: Layout, steps: list[int], prices: dict | None = None, *,
             seed_failed: int = 0) -> FinalizeReport:
    """Write ``annotations.jsonl``: one record per image (the last step's), sorted by image_id.

    Works from the files alone. Images that failed are listed, not emitted; images with no final
    record and no failure are reported as missing. Records keep their per-call token usage but
    not its latency (the step sinks keep that), so two runs of the same data give the same bytes.
    ``report.usage`` sums the step sinks' token usage (``prices`` adds the cost). Leaves
    ``summary.json`` (``producer/summary.py``): what ``status`` shows once a local run is gone.

    The file is written to a temp file and renamed, under a lock (``_finalize_lock``), so readers
    never see half of it; temp files a killed finalize left behind are removed first.
    """
    with _finalize_lock(layout):
        report = FinalizeReport(path=layout.final, seed_failed=seed_failed)
        report.stale_removed = remove_stale_temps(layout)
        stats = ReadStats()
        final_steps = stepdefs.final_steps(steps)
        offsets = {s: layout.sink(s).latest_offsets(stats) for s in final_steps}
        report.bad_lines = stats.bad_lines
        failed = _failed_ids(layout, offsets)
        ids = sorted(rec["image_id"] for _, rec in iter_seed(layout.seed))
        tmp = layout.root / f"{_tmp_prefix(layout)}{socket.gethostname()}-{os.getpid()}.tmp"
        sinks = {s: layout.sink(s) for s in final_steps}
        with open(tmp, "w", encoding="utf-8") as out:
            for image_id in ids:
                if any(image_id not in offsets[s] for s in final_steps):
                    (report.failed if image_id in failed else report.missing).append(image_id)
                    continue
                records = {s: sinks[s].read_at(offsets[s][image_id]) for s in final_steps}
                out.write(dumps(deterministic(final_record(steps, records))) + "\n")
                report.written += 1
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, layout.final)
    report.usage = usage_from_sinks(layout, steps, prices)
    write_summary(layout, report)
    return report


# A finalize killed mid-write (Ctrl-C, OOM, a lost host) leaves its temp file, as big as the
# output; the next finalize removes it. Finalizes take a lock on the results dir (flock, which NFS
# maps to a byte-range lock, as the sinks do), so whoever holds it knows every temp file there is
# stale, whichever host wrote it; the host name and pid in the name say who did.

def _tmp_prefix(layout: Layout) -> str:
    return f".{layout.final.name}.finalize-"


@contextlib.contextmanager
def _finalize_lock(layout: Layout) -> Iterator[None]:
    layout.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(layout.root / f".{layout.final.name}.finalize.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def remove_stale_temps(layout: Layout) -> list[tuple[str, int]]:
    """Remove the temp files earlier finalizes left in ``results_dir`` (call it holding the
    finalize lock); returns ``(name, bytes)`` of each."""
    removed = []
    prefix = _tmp_prefix(layout)
    # Finalizes before the host name was in the name left ``.annotations.jsonl.<pid>.tmp``.
    old = re.compile(rf"\.{re.escape(layout.final.name)}\.\d+\.tmp")
    for path in layout.root.iterdir():
        name = path.name
        if (name.startswith(prefix) and name.endswith(".tmp")) or old.fullmatch(name):
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            removed.append((name, size))
    return removed
