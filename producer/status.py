"""Run progress from Redis (cheap, live) and the final output from the sinks (the truth)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from producer.seed import iter_seed
from worker.budget import budget_stats
from worker.layout import Layout
from worker.runstate import RunState
from worker.sinks import ReadStats, dumps
from worker.steps import final_record


def status(state: RunState) -> dict:
    """Everything ``producer status`` shows, as one JSON-able dict."""
    meta = state.meta()
    steps: list[int] = meta.get("steps", [])
    images = int(meta.get("images", 0))
    counts = state.counts(steps)
    queued = state.queued_count()
    out_steps = {}
    for s in steps:
        c = counts[s]
        out_steps[str(s)] = {**c, "pending": max(0, images - c["done"] - c["failed"] - c["blocked"])}
    settled = all(v["pending"] == 0 for v in out_steps.values())
    finished = bool(steps) and settled and queued == 0 and meta.get("enqueue_complete", False)
    started = meta.get("enqueued_at") or time.time()
    elapsed = max(time.time() - started, 1e-6)
    last = str(steps[-1]) if steps else None
    done_last = out_steps[last]["done"] if last else 0
    done_now = max(done_last - int(meta.get("done_at_start", 0)), 0)
    rate = done_now / elapsed if not finished else None
    remaining = out_steps[last]["pending"] if last else 0
    result = {
        "run_id": state.run_id,
        "images": images,
        "seed_failed": int(meta.get("seed_failed", 0)),
        "steps": out_steps,
        "in_flight_images": queued,
        "finished": finished,
        "enqueue_complete": bool(meta.get("enqueue_complete", False)),
        "throughput_images_per_s": round(rate, 3) if rate else None,
        "eta_s": round(remaining / rate, 1) if rate else None,
        "workers": state.workers_seen(),
    }
    if meta.get("endpoint"):
        result["budget"] = {"endpoint": meta["endpoint"], **budget_stats(state.r, meta["endpoint"])}
    return result


def format_status(st: dict) -> str:
    lines = [f"run {st['run_id']}: {st['images']} images"
             + (f" ({st['seed_failed']} could not be seeded)" if st["seed_failed"] else "")
             + (" — finished" if st["finished"] else "")]
    for s, c in st["steps"].items():
        lines.append(f"  step {s}: done {c['done']:>7}  failed {c['failed']:>5}  "
                     f"blocked {c['blocked']:>5}  pending {c['pending']:>7}")
    lines.append(f"  in flight: {st['in_flight_images']} images"
                 + ("" if st["enqueue_complete"] else " (enqueue not complete)"))
    if st.get("throughput_images_per_s"):
        lines.append(f"  throughput: {st['throughput_images_per_s']:.2f} images/s, ETA {st['eta_s']:.0f} s")
    lines.append(f"  workers seen (last 2 min): {len(st['workers'])} {', '.join(st['workers'])}")
    if "budget" in st:
        b = st["budget"]
        lines.append(f"  endpoint {b['endpoint']}: {b['in_flight']} calls in flight, "
                     f"{b['calls_last_minute']} calls/min, {b['rate_limited_last_minute']} 429s last minute")
    return "\n".join(lines)


@dataclass
class FinalizeReport:
    path: Path
    written: int = 0
    failed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    bad_lines: int = 0


def _failed_ids(layout: Layout, done: dict[int, dict[str, int]]) -> set[str]:
    """Images with a failure line for a step that is still not done."""
    failed = set()
    for _, rec in layout.failures.scan():
        step = rec.get("step")
        if isinstance(step, int) and rec["image_id"] in done.get(step, {}):
            continue
        failed.add(rec["image_id"])
    return failed


def finalize(layout: Layout, steps: list[int]) -> FinalizeReport:
    """Write ``annotations.jsonl``: one record per image (the last step's), sorted by image_id.

    Works from the files alone. Images that failed are listed, not emitted; images with no final
    record and no failure are reported as missing.
    """
    stats = ReadStats()
    final_steps = [max(steps)] if max(steps) >= 2 else list(steps)
    offsets = {s: layout.sink(s).latest_offsets(stats) for s in final_steps}
    report = FinalizeReport(path=layout.final, bad_lines=stats.bad_lines)
    failed = _failed_ids(layout, offsets)
    ids = sorted(rec["image_id"] for _, rec in iter_seed(layout.seed))
    tmp = layout.final.with_name(f".{layout.final.name}.{os.getpid()}.tmp")
    sinks = {s: layout.sink(s) for s in final_steps}
    with open(tmp, "w", encoding="utf-8") as out:
        for image_id in ids:
            if any(image_id not in offsets[s] for s in final_steps):
                (report.failed if image_id in failed else report.missing).append(image_id)
                continue
            records = {s: sinks[s].read_at(offsets[s][image_id]) for s in final_steps}
            out.write(dumps(final_record(steps, records)) + "\n")
            report.written += 1
    os.replace(tmp, layout.final)
    return report


def summary_json(report: FinalizeReport) -> str:
    return json.dumps({"annotations": str(report.path), "written": report.written,
                       "failed": len(report.failed), "missing": len(report.missing)})
