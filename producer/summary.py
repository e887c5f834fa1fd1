"""The final summary ``finalize`` leaves in the results dir, and what ``status`` says of a local run.

Why: ``producer run`` brings its own Redis and takes it away when it ends, so ``producer status``
on its results dir asked a Redis that never knew the run and said "0 images / enqueue not
complete". ``finalize`` now writes ``summary.json`` next to ``annotations.jsonl`` (counts, the
first failed images, token usage, the exit code), and ``status`` reads it for a local run instead
of asking Redis or scanning the sinks. ``run.json`` says which producer last held the dir.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from producer.exitcodes import for_images
from worker.layout import Layout
from worker.sinks import write_atomic


@dataclass
class FinalizeReport:
    """What a finalize wrote and found: the summary is written from it (``finalize.LISTED``
    bounds the ids kept)."""

    path: Path
    written: int = 0
    failed: list[str] = field(default_factory=list)  # the first LISTED, sorted; n_failed counts them all
    missing: list[str] = field(default_factory=list)  # the first LISTED, sorted; n_missing counts them all
    n_failed: int = 0
    n_missing: int = 0
    bad_lines: int = 0
    usage: dict = field(default_factory=dict)
    stale_removed: list[tuple[str, int]] = field(default_factory=list)
    seed_failed: int = 0  # images that could not be seeded (not in the seed file, so not in failed)
    compacted: dict[int, int] = field(default_factory=dict)  # step -> lines in its merged file


SUMMARY_FILE = "summary.json"
FAILED_LISTED = 20  # failed image ids kept in the summary (the rest: failures.jsonl)


def write_summary(layout: Layout, report: FinalizeReport) -> dict:
    """Write ``summary.json`` (atomically) from a finalize report; return what was written."""
    not_done = report.n_failed + report.n_missing + report.seed_failed
    summary = {
        "finalized_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "annotations": str(report.path),
        "images": report.written + report.n_failed + report.n_missing,
        "done": report.written,
        "failed": report.n_failed,
        "missing": report.n_missing,
        "seed_failed": report.seed_failed,
        "failed_ids": report.failed[:FAILED_LISTED],
        "exit_code": int(for_images(report.written, not_done)),
        "usage": report.usage,
    }
    write_atomic(layout.root / SUMMARY_FILE, json.dumps(summary, sort_keys=True) + "\n")
    return summary


def read_summary(layout: Layout) -> dict | None:
    """``summary.json`` as a dict, or None when there is none (or it is not ours)."""
    try:
        data = json.loads((layout.root / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass
class LocalRun:
    """A results dir whose last producer was ``producer run`` (its Redis lived and died with it)."""

    run_id: str
    producer: dict  # run.json's last_producer: command, host, pid, started
    summary: dict | None  # the summary this run's finalize left; None: it has not finalized
    alive: bool | None  # that process still runs (None: it ran on another host)

    def to_json(self) -> dict:
        return {"run_id": self.run_id, "local": True, "finished": self.summary is not None,
                "producer": self.producer, "alive": self.alive, "summary": self.summary}


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def local_run(layout: Layout) -> LocalRun | None:
    """The local run this results dir belongs to, or None when its last producer used a fleet's
    Redis (or there is no run here): then ``status`` asks Redis as usual."""
    try:
        data = json.loads(layout.run_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    last = data.get("last_producer") if isinstance(data, dict) else None
    if not isinstance(last, dict) or last.get("command") != "run":
        return None
    summary = read_summary(layout)
    if summary is not None and str(summary.get("finalized_at", "")) < str(last.get("started", "")):
        summary = None  # an earlier run's summary: this one has not finalized
    alive = _alive(last.get("pid")) if last.get("host") == socket.gethostname() else None
    return LocalRun(str(data.get("run_id", "?")), last, summary, alive)


def format_local(local: LocalRun, summary_path: str) -> str:
    """What ``producer status`` prints for a local run."""
    p = local.producer
    who = f"`producer run` (pid {p.get('pid')} on {p.get('host')}, started {p.get('started')})"
    s = local.summary
    if s is None:
        if local.alive:
            return (f"run {local.run_id}: a local run by {who}, still running. Its Redis is private to that "
                    "process, so status cannot see its progress: that process's terminal shows it. Once it "
                    "has finished, status shows its final summary.")
        return (f"run {local.run_id}: a local run by {who}, which ended before it finalized (interrupted or "
                f"killed{'' if local.alive is False else ', or still running on that host'}). Run the same "
                "`producer run` command again to finish it: done image-steps are kept.")
    lines = [f"run {local.run_id}: a local run by {who}, finished. Its Redis ended with it; this is the summary "
             f"its finalize left ({summary_path}, {s.get('finalized_at')}):",
             f"  {s.get('images', 0)} images: {s.get('done', 0)} done, {s.get('failed', 0)} failed, "
             f"{s.get('missing', 0)} missing"
             + (f"; {s['seed_failed']} could not be seeded" if s.get("seed_failed") else "")]
    if s.get("failed_ids"):
        more = s.get("failed", 0) - len(s["failed_ids"])
        lines.append(f"  failed images: {', '.join(s['failed_ids'])}{f' and {more} more' if more > 0 else ''} "
                     "(reasons in failures.jsonl)")
    lines.append(f"  annotations: {s.get('annotations')}")
    usage = s.get("usage") or {}
    if usage.get("total", {}).get("calls"):
        from producer.usage import format_usage

        lines += format_usage(usage)
    return "\n".join(lines)


def commonest_failures(layout: Layout, image_ids: set[str], limit: int = 3) -> list[str]:
    """The commonest reasons in ``failures.jsonl`` for these images' failures, as lines
    ``"<n> x <error>: <message>"``: when every image failed, it is usually for one reason (no
    key, a wrong model name, a proxy's page), and the user should not have to dig for it."""
    counts: dict[tuple[str, str], int] = {}
    for _, rec in layout.failures.scan():
        if rec.get("image_id") in image_ids:
            key = (str(rec.get("error", "Error")), str(rec.get("message", ""))[:300])
            counts[key] = counts.get(key, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:limit]
    return [f"{n} x {error}: {message}" for (error, message), n in top]
