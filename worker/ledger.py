"""The batch ledger: parked requests and provider jobs, on the results volume.

Batch mode keeps what waits for a provider job on disk, not in Redis or in a process, so the
number of images waiting costs neither (Redis holds one small entry per job:
``worker/batchstate.py``), and a killed worker, producer or Redis loses nothing submitted.

``results_dir/batch/``:

- ``requests/step_<N>/<host>-<pid>-<token>.jsonl``: requests parked by step tasks, one part
  file per writer process (appended whole, fsynced; no lock between writers, as the step
  sinks' parts). Each line: ``{key, image_id, seed_offset, run_ref, step, vlm_retries, t,
  request}`` (``request``: ``worker.parking.request_to_json``, no image bytes).
- ``cursors.json``: how far the coordinator has taken each part into jobs (bytes).
- ``jobs/<job_id>/requests.jsonl``: the job's requests, written before it is submitted;
  ``job.json``: its ``Job`` record (state ``formed`` -> ``submitted`` -> ``collected`` ->
  ``released``, the provider's id, times); ``answers.jsonl``: one line per request once the job
  is collected (``worker.parking.answer_to_json`` plus ``key``), which the answer tasks read at
  the offset their message carries.

Only the coordinator (one worker at a time, ``worker/coordinator.py``) writes cursors and jobs.
Nothing here imports Celery or Redis.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from worker.sinks import write_atomic

LEDGER_DIR = "batch"
#: Job states, in order. ``released``: every answer went back into the flow.
STATES = ("formed", "submitted", "collected", "released")

_TOKEN = uuid.uuid4().hex[:8]
_write_lock = threading.Lock()


@dataclass
class Job:
    """One provider job as the ledger keeps it."""

    job_id: str
    step: int
    run_ref: str
    n: int
    created: float
    state: str = "formed"
    provider_id: str = ""
    provider_state: str = ""
    submitted_at: float = 0.0
    finished_at: float = 0.0
    released_at: float = 0.0
    error: str = ""
    counts: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Parked:
    """A parked request read back by the coordinator: its part file, byte span, and line."""

    part: str
    start: int
    end: int
    entry: dict

    @property
    def key(self) -> tuple[int, str]:
        return int(self.entry["step"]), str(self.entry["image_id"])


class Ledger:
    """The ledger of one results dir."""

    def __init__(self, results_dir: str | Path):
        self.root = Path(results_dir) / LEDGER_DIR

    # -- parked requests (every worker) -----------------------------------------------------
    def part_path(self, step: int) -> Path:
        return self.root / "requests" / f"step_{step}" / f"{socket.gethostname()}-{os.getpid()}-{_TOKEN}.jsonl"

    def park(self, step: int, entry: dict) -> None:
        """Append one parked request to this process's part, whole and fsynced. A line a crash
        or a full disk tore is sealed with a newline first (readers skip it as bad JSON); an
        ``OSError`` goes up, so the task is retried and parks again."""
        path = self.part_path(step)
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        with _write_lock:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                if size:
                    with open(path, "rb") as f:
                        f.seek(size - 1)
                        if f.read(1) != b"\n":
                            line = b"\n" + line
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)

    def parts(self) -> list[Path]:
        return sorted((self.root / "requests").glob("step_*/*.jsonl"))

    def read_parked(self, positions: dict[str, int]) -> Iterator[Parked]:
        """Whole lines past ``positions[part]`` (relative part names) in every part; a line still
        being written (no newline yet) is left for the next read, a torn one is skipped."""
        for path in self.parts():
            rel = str(path.relative_to(self.root))
            start = positions.get(rel, 0)
            try:
                with open(path, "rb") as f:
                    f.seek(start)
                    data = f.read()
            except FileNotFoundError:
                continue
            pos = start
            for raw in data.splitlines(keepends=True):
                if not raw.endswith(b"\n"):
                    break
                end = pos + len(raw)
                try:
                    entry = json.loads(raw)
                except ValueError:
                    entry = None
                if isinstance(entry, dict) and "image_id" in entry:
                    yield Parked(rel, pos, end, entry)
                else:
                    yield Parked(rel, pos, end, {})  # torn: consumed, never a request
                pos = end

    def cursors(self) -> dict[str, int]:
        try:
            return {k: int(v) for k, v in json.loads((self.root / "cursors.json").read_text()).items()}
        except FileNotFoundError:
            return {}

    def save_cursors(self, cursors: dict[str, int]) -> None:
        write_atomic(self.root / "cursors.json", json.dumps(cursors, sort_keys=True))

    # -- jobs (the coordinator) ---------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    def create_job(self, step: int, run_ref: str, entries: list[dict]) -> Job:
        """A new job holding ``entries``: its requests first, then its record (a job without a
        record is a crash before it was formed, and is ignored: its requests are still parked)."""
        job = Job(job_id=f"s{step}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}",
                  step=step, run_ref=run_ref, n=len(entries), created=time.time())
        text = "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in entries)
        write_atomic(self.job_dir(job.job_id) / "requests.jsonl", text)
        self.save(job)
        return job

    def save(self, job: Job) -> None:
        write_atomic(self.job_dir(job.job_id) / "job.json", json.dumps(asdict(job), sort_keys=True))

    def claim_submit(self, job: Job, token: str, stale_after: float) -> str | None:
        """Take the right to submit ``job`` (an ``O_EXCL`` file in its folder): of two
        coordinators acting at once (a lease lost mid-tick, a Redis restarted empty), only one
        sends it. Returns ``"new"``, ``"taken over"`` or None (another holds it). A claim older
        than ``stale_after`` s whose job is still ``formed`` is a coordinator that died between
        claiming and recording the provider's id: it is taken over, and the new holder first asks
        the provider for a job under the job's name (``BatchBackend.find``) before sending it."""
        path = self.job_dir(job.job_id) / "submit.claim"
        taken_over = False
        for _ in range(2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    age = time.time() - path.stat().st_mtime
                except FileNotFoundError:
                    continue
                if age < stale_after:
                    return None
                path.unlink(missing_ok=True)
                taken_over = True
                continue
            with os.fdopen(fd, "w") as f:
                f.write(token)
            return "taken over" if taken_over else "new"
        return None

    def reload(self, job: Job) -> Job:
        """The job as its record on disk says now (another coordinator may have moved it)."""
        return Job(**json.loads((self.job_dir(job.job_id) / "job.json").read_text()))

    def jobs(self) -> list[Job]:
        out = []
        for path in sorted((self.root / "jobs").glob("*/job.json")):
            try:
                out.append(Job(**json.loads(path.read_text())))
            except (ValueError, TypeError, FileNotFoundError):
                continue
        return out

    def requests(self, job: Job) -> list[dict]:
        text = (self.job_dir(job.job_id) / "requests.jsonl").read_text()
        return [json.loads(line) for line in text.splitlines() if line]

    def write_answers(self, job: Job, answers: list[dict]) -> list[int]:
        """Every answer of a job (each with its ``key``) in one file, written whole; returns each
        line's byte offset, in order."""
        offsets, pos, lines = [], 0, []
        for a in answers:
            line = json.dumps(a, separators=(",", ":")) + "\n"
            offsets.append(pos)
            pos += len(line.encode())
            lines.append(line)
        write_atomic(self.job_dir(job.job_id) / "answers.jsonl", "".join(lines))
        return offsets

    def answers(self, job: Job) -> Iterator[tuple[int, dict]]:
        pos = 0
        with open(self.job_dir(job.job_id) / "answers.jsonl", "rb") as f:
            for raw in f:
                yield pos, json.loads(raw)
                pos += len(raw)

    def answer_at(self, job_id: str, offset: int) -> dict:
        with open(self.job_dir(job_id) / "answers.jsonl", "rb") as f:
            f.seek(offset)
            return json.loads(f.readline())
