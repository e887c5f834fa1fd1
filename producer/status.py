"""``producer status``: a run's progress from Redis (cheap, live), and what to say when Redis
holds nothing for it. The final output is ``producer/finalize.py``; tokens and cost ``producer/usage.py``."""

from __future__ import annotations

import time

from producer.outage import redact
from producer.seed import iter_seed
from producer.usage import format_usage, run_prices, usage_summary
from worker.budget import budget_stats, controller_state
from worker.keys import run_key
from worker.layout import Layout
from worker.runstate import BATCH_USAGE_FIELDS, USAGE_FIELDS, RunState


class RunNotInRedis(Exception):
    """Redis holds nothing for the run: it never was enqueued on this Redis, or the Redis
    restarted empty (no persistence) or was flushed since. The results dir still holds the work
    (``gone_report`` says what, and what to run)."""

    def __init__(self, run_id: str):
        super().__init__(f"Redis holds nothing for run {run_id}")
        self.run_id = run_id


def _redis_now(state: RunState) -> float:
    """Redis's clock: the controller's times are in it, not in this host's."""
    sec, usec = state.r.time()
    return sec + usec / 1e6


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
        auto = controller_state(state.r, meta["endpoint"])
        if auto is not None:  # vlm.max_concurrency: auto has run for this endpoint
            now = _redis_now(state)
            auto["changed_s_ago"] = round(max(0.0, now - auto["changed_at"]), 1)
            if "rate_changed_at" in auto:
                auto["rate_changed_s_ago"] = round(max(0.0, now - auto["rate_changed_at"]), 1)
            result["budget"]["auto"] = auto
    counted = state.usage()
    if counted:
        per_step = {}
        for s in steps:
            c = counted.get(s, {})
            per_step[s] = {"images": out_steps[str(s)]["done"], "calls": c.get("calls", 0),
                           **{f: c.get(f, 0) for f in USAGE_FIELDS},
                           **{f: c[f] for f in BATCH_USAGE_FIELDS if c.get(f)},
                           "latency_s": c.get("latency_ms", 0) / 1000}
        result["usage"] = usage_summary(per_step, run_prices(state, meta))
    quality = state.quality()
    if quality:
        result["quality"] = {str(s): quality[s] for s in steps if s in quality}
    if meta.get("batch"):
        result["batch"] = batch_status(state)
    return result


def batch_status(state: RunState, now: float | None = None) -> dict:
    """Batch mode: the run's provider jobs by state (``submitted``: formed or accepted by the
    provider and not started; ``running``; ``done``: finished, its answers collected and sent
    back into the flow), how long the oldest unfinished one has waited, and how many
    parked requests are still being gathered into a job. One HGETALL (an entry per job)."""
    from worker.batchflow import jobs_summary

    now = time.time() if now is None else now
    jobs = jobs_summary(state.r, state.run_id)
    counts = dict.fromkeys(("submitted", "running", "done"), 0)
    waiting_since = []
    per_step: dict[str, dict[str, int]] = {}
    for j in jobs.values():
        if j["state"] in ("collected", "released"):
            kind = "done"
        elif j.get("provider_state") == "running":
            kind = "running"
        else:
            kind = "submitted"
        counts[kind] += 1
        step = per_step.setdefault(str(j["step"]), dict.fromkeys(counts, 0))
        step[kind] += 1
        if kind in ("submitted", "running"):
            waiting_since.append(j.get("submitted_at") or j.get("created") or now)
    raw = state.r.get(run_key(state.run_id, "batch", "gathering"))
    return {"jobs": counts, "steps": per_step, "requests_gathering": max(0, int(raw or 0)),
            "oldest_waiting_s": round(now - min(waiting_since), 1) if waiting_since else None,
            "requests_in_jobs": sum(int(j.get("n") or 0) for j in jobs.values() if j["state"] != "released")}


def _age(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"


def format_batch(b: dict) -> list[str]:
    j = b["jobs"]
    line = (f"  batch jobs: {j['submitted']} submitted, {j['running']} running, {j['done']} done"
            f"; {b['requests_in_jobs']} requests waiting in jobs, "
            f"{b['requests_gathering']} gathering")
    if b.get("oldest_waiting_s") is not None:
        line += f"; oldest waiting {_age(b['oldest_waiting_s'])}"
    return [line]


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
        if "auto" in b:
            a = b["auto"]
            lines.append(f"  concurrency (auto): limit {a['limit']}, latency floor {a['floor_s']:.2f} s; "
                         f"last change {a['changed_s_ago']:.0f} s ago: {a['reason']}")
            if "rate_limit_per_minute" in a:
                lines.append(f"  request rate (auto, {a['rate_source']}): {a['rate_limit_per_minute']:g} calls/min; "
                             f"set {a['rate_changed_s_ago']:.0f} s ago: {a['rate_reason']}")
    if st.get("batch"):
        lines += format_batch(st["batch"])
    if st.get("usage"):
        lines += format_usage(st["usage"])
    if st.get("quality"):
        lines += format_quality(st["quality"])
    return "\n".join(lines)
