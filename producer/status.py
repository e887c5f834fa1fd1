"""Run progress from Redis (cheap, live) and the final output from the sinks (the truth)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from producer.outage import redact
from producer.seed import iter_seed
from producer.summary import write_summary
from worker import stepdefs
from worker.budget import budget_stats
from worker.layout import Layout
from worker.runstate import USAGE_FIELDS, RunState
from worker.sinks import ReadStats, dumps
from worker.steps import final_record
from worker.steps.records import PIPELINE_NAMES, deterministic


class RunNotInRedis(Exception):
    """Redis holds nothing for the run: it never was enqueued on this Redis, or the Redis
    restarted empty (no persistence) or was flushed since. The results dir still holds the work
    (``gone_report`` says what, and what to run)."""

    def __init__(self, run_id: str):
        super().__init__(f"Redis holds nothing for run {run_id}")
        self.run_id = run_id


def status(state: RunState) -> dict:
    """Everything ``producer status`` shows, as one JSON-able dict; ``RunNotInRedis`` when Redis
    has no record of the run: its meta (written by the producer alone, when an enqueue starts
    seeding and once it has) is not there."""
    meta = state.meta()
    if not meta.get("steps") and not meta.get("seeding"):
        raise RunNotInRedis(state.run_id)
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
        "seeding": bool(meta.get("seeding", False)),
        "throughput_images_per_s": round(rate, 3) if rate else None,
        "eta_s": round(remaining / rate, 1) if rate else None,
        "workers": state.workers_seen(),
    }
    if meta.get("endpoint"):
        result["budget"] = {"endpoint": meta["endpoint"], **budget_stats(state.r, meta["endpoint"])}
    counted = state.usage()
    if counted:
        per_step = {}
        for s in steps:
            c = counted.get(s, {})
            per_step[s] = {"images": out_steps[str(s)]["done"], "calls": c.get("calls", 0),
                           **{f: c.get(f, 0) for f in USAGE_FIELDS},
                           "latency_s": c.get("latency_ms", 0) / 1000}
        result["usage"] = usage_summary(per_step, run_prices(state, meta))
    quality = state.quality()
    if quality:
        result["quality"] = {str(s): quality[s] for s in steps if s in quality}
    return result


def gone_report(layout: Layout, run_id: str, redis_url: str) -> dict:
    """For a run Redis holds nothing for (``RunNotInRedis``): what the results dir holds, from the
    files alone, and the commands that resume it and that finalize what is there.

    Sinks are counted in valid lines (a re-delivered task may have written a second line for an
    image): a fallback path, one read of each sink.
    """
    from producer.runs import spec_file, steps_on_disk

    seeded = sum(1 for _ in iter_seed(layout.seed)) if layout.seed.path.exists() else 0
    sinks = {str(s): {"records": sum(1 for _ in layout.sink(s).scan())} for s in steps_on_disk(layout)}
    failures = sum(1 for _ in layout.failures.scan())
    spec = spec_file(layout)
    return {
        "run_id": run_id,
        "in_redis": False,
        "redis": redact(redis_url),
        "results_dir": str(layout.root),
        "seeded": seeded,
        "steps": sinks,
        "failure_lines": failures,
        "resume": f"producer enqueue -c {spec}" if spec.exists() else None,
        "resume_local": f"producer run -c {spec}" if spec.exists() else None,
        "finalize": f"producer finalize --results-dir {layout.root}",
    }


def format_gone(rep: dict) -> str:
    held = "; ".join(f"step {s}: {c['records']} records" for s, c in rep["steps"].items()) or "no step results"
    lines = [
        f"run {rep['run_id']} ({rep['results_dir']}): Redis at {rep['redis']} holds nothing for this run: it "
        "restarted without persistence or was flushed, or the run was enqueued on another Redis.",
        f"  Nothing on disk is lost: {rep['seeded']} images seeded; {held}; "
        f"{rep['failure_lines']} lines in failures.jsonl.",
        "  To resume it (image-steps whose record is on disk are not sent again):",
    ]
    if rep["resume"]:
        lines += [f"    {rep['resume']}    (with REDIS_URL set to the fleet's Redis; add --wait to watch it)",
                  f"    {rep['resume_local']}    (on one machine, with an embedded Redis)"]
    else:
        lines.append("    run the `producer enqueue` (or `producer run`) command that started it again, with the "
                     "same spec and overrides")
    lines += ["  To write annotations.jsonl from what is on disk now:", f"    {rep['finalize']}"]
    return "\n".join(lines)


def format_quality(quality: dict) -> list[str]:
    """Per step: boxes matched, dropped and skipped, re-asks, fallbacks, the commonest repairs."""
    lines = ["  answer quality:"]
    for s, q in quality.items():
        repairs = sorted(((k.split(":", 1)[1], v) for k, v in q.items() if k.startswith("repair:")),
                         key=lambda kv: -kv[1])
        modes = ", ".join(f"{k.split(':', 1)[1]} {v}" for k, v in q.items() if k.startswith("mode:"))
        parts = [f"{q.get('images', 0)} images ({modes})" if modes else f"{q.get('images', 0)} images"]
        if q.get("boxes_returned"):
            parts.append(f"boxes matched {q.get('boxes_matched', 0)} of {q['boxes_returned']} returned "
                         f"({q.get('boxes_expected', 0)} asked about)")
        for key, label in (("hallucinated_dropped", "hallucinated dropped"), ("kitti_skipped", "skipped"),
                           ("boxes_flagged", "unmatched kept"), ("reasks", "re-asks"),
                           ("truncated", "truncated"), ("answers_cut", "answers cut to size"), ("calls", "calls")):
            if q.get(key):
                parts.append(f"{label} {q[key]}")
        fallbacks = sum(v for k, v in q.items() if k.startswith("fallback:"))
        if fallbacks:
            parts.append(f"fallbacks to text {fallbacks}")
        if repairs:
            parts.append("repairs " + ", ".join(f"{k} {v}" for k, v in repairs[:4]))
        lines.append(f"    step {s}: " + "; ".join(parts))
    return lines


def run_prices(state: RunState, meta: dict | None = None) -> dict | None:
    """The run's ``vlm.prices`` from the spec stored in Redis (None when there is none)."""
    meta = state.meta() if meta is None else meta
    spec = state.load_spec(meta["spec_hash"]) if meta.get("spec_hash") else None
    return (((spec or {}).get("image_referring_expression") or {}).get("vlm") or {}).get("prices")


# --------------------------------------------------------------------------- tokens and cost


def call_cost(prices: dict | None, input_tokens: int, output_tokens: int, thinking_tokens: int = 0) -> float | None:
    """What the tokens cost under ``vlm.prices``; None when there is no price table.

    Image tokens are part of ``input_tokens`` (every API counts them in the prompt), and
    thinking tokens are billed as output.
    """
    if not prices:
        return None
    pin, pout = float(prices.get("input_per_million") or 0), float(prices.get("output_per_million") or 0)
    if not pin and not pout:
        return None
    return (input_tokens * pin + (output_tokens + thinking_tokens) * pout) / 1e6


def usage_summary(per_step: dict[int, dict], prices: dict | None = None) -> dict:
    """Totals and per-image / per-call averages from ``step -> {images, calls, <tokens>, latency_s}``.

    ``images`` is how many images have a record for the step (those with no boxes made no call,
    and count with 0 tokens in the per-image average).
    """

    def finish(c: dict) -> dict:
        images, calls = c.get("images", 0), c.get("calls", 0)
        out = {"images": images, "calls": calls, **{f: c.get(f, 0) for f in USAGE_FIELDS},
               "latency_s": round(c.get("latency_s", 0.0), 3)}
        for f in ("input_tokens", "output_tokens"):
            out[f"{f}_per_image"] = round(out[f] / images, 1) if images else None
        out["latency_s_per_call"] = round(out["latency_s"] / calls, 3) if calls else None
        cost = call_cost(prices, out["input_tokens"], out["output_tokens"], out["thinking_tokens"])
        if cost is not None:
            out["cost"] = round(cost, 6)
            out["cost_per_image"] = round(cost / images, 6) if images else None
        return out

    steps = {str(s): finish(c) for s, c in sorted(per_step.items())}
    total: dict = {"images": max((c["images"] for c in steps.values()), default=0)}
    for f in ("calls", *USAGE_FIELDS, "latency_s"):
        total[f] = sum(c[f] for c in steps.values())
    return {"steps": steps, "total": finish(total)}


def usage_from_sinks(layout: Layout, steps: list[int], prices: dict | None = None) -> dict:
    """Token usage per step from the step sinks (the record of every call that succeeded).

    Every valid line counts as a call made (a forced re-run or a re-delivered task is a call paid
    for); ``images`` counts distinct image ids. Calls whose answer could not be parsed left no
    record and are not counted.
    """
    per_step: dict[int, dict] = {}
    for s in steps:
        name = PIPELINE_NAMES[s]
        ids: set[str] = set()
        c: dict = {"calls": 0, **dict.fromkeys(USAGE_FIELDS, 0), "latency_s": 0.0}
        for _, rec in layout.sink(s).scan():
            ids.add(rec["image_id"])
            call = ((rec.get("meta") or {}).get(name) or {}).get("call")
            if not call:
                continue
            c["calls"] += 1
            for f in USAGE_FIELDS:
                c[f] += int(call.get(f) or 0)
            c["latency_s"] += float(call.get("latency_s") or 0)
        per_step[s] = {"images": len(ids), **c}
    return usage_summary(per_step, prices)


def format_usage(usage: dict) -> list[str]:
    """Human lines for a ``usage_summary``: per step and total, tokens and per-image averages."""

    def line(label: str, c: dict) -> str:
        text = (f"  {label:<7} {c['calls']:>7} calls  in {c['input_tokens']:>11,}  out {c['output_tokens']:>10,}")
        if c["images"]:
            text += f"  per image: in {c['input_tokens_per_image']:,.0f}, out {c['output_tokens_per_image']:,.0f}"
        extras = [f"{f.split('_')[0]} {c[f]:,}" for f in ("image_tokens", "thinking_tokens") if c.get(f)]
        if c.get("latency_s_per_call") is not None and label != "total":
            extras.append(f"{c['latency_s_per_call']:.2f} s/call")
        if "cost" in c:
            extras.append(f"cost {c['cost']:,.4f}" + (f" ({c['cost_per_image']:.6f}/image)" if c.get("cost_per_image")
                                                     is not None else ""))
        return text + (f"  [{', '.join(extras)}]" if extras else "")

    lines = ["  tokens (calls that succeeded):"]
    lines += [line(f"step {s}", c) for s, c in usage["steps"].items()]
    lines.append(line("total", usage["total"]))
    return lines


def format_status(st: dict) -> str:
    lines = [f"run {st['run_id']}: {st['images']} images"
             + (f" ({st['seed_failed']} could not be seeded)" if st["seed_failed"] else "")
             + (" — finished" if st["finished"] else "")
             + (" (an enqueue is reading the images)" if st.get("seeding") else "")]
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
                     f"~{b['calls_per_minute']} calls/min, ~{b['rate_limited_per_minute']} 429s/min (last 60 s)")
    if st.get("usage"):
        lines += format_usage(st["usage"])
    if st.get("quality"):
        lines += format_quality(st["quality"])
    return "\n".join(lines)


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


def summary_json(report: FinalizeReport) -> str:
    return json.dumps({"annotations": str(report.path), "written": report.written,
                       "failed": len(report.failed), "missing": len(report.missing), "usage": report.usage})
