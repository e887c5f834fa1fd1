"""The offline teacher as a provider batch API: what demos and tests drive batch mode with.

A real provider keeps its jobs on its own servers, so a job outlives every worker that submitted
or polled it; this backend keeps each job as one JSON file in a directory every process of the
fleet sees (``REFEXP_OFFLINE_BATCH_DIR``, else ``<tmp>/refexp-offline-batch``), so a job
submitted by one worker is polled by another, and one that "finished" while no worker ran is
there to collect. The answers are computed at submit (the teacher is deterministic and fast).

Knobs (environment, read at each call, for tests):

- ``REFEXP_OFFLINE_BATCH_POLLS``: status polls a job stays ``running`` before it succeeds (1:
  it succeeds on the first poll);
- ``REFEXP_OFFLINE_BATCH_END``: ``expired`` or ``failed`` makes every job end that way instead
  (a job that expires whole, no request answered), ``expired:<n>`` the first ``n`` jobs only;
- ``REFEXP_OFFLINE_BATCH_UNSUPPORTED``: the probe says there is no batch API;
- ``REFEXP_OFFLINE_BATCH_ERRORS``: ``<step>:<n>``: the first ``n`` requests of that step (counted
  across jobs, in the directory) answer with a 503 ``ClientError`` (per-request errors).

Every submit is counted in ``submits.log`` (one line per job: its id and size), which is how a
test tells a collected job from a resubmitted one.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from worker.clients.base import VLMResponse
from worker.clients.batch import BatchItem, BatchUnsupported, JobStatus
from worker.clients.offline import OfflineClient
from worker.errors import ClientError, PipelineError
from worker.sinks import write_atomic

ENV_DIR = "REFEXP_OFFLINE_BATCH_DIR"


def _count(var: str) -> int:
    """``expired:2`` -> 2 (a bare ``expired`` means every job)."""
    word, _, n = os.environ.get(var, "").partition(":")
    if not word:
        return 0
    return int(n) if n else 1 << 30


def default_dir() -> Path:
    return Path(os.environ.get(ENV_DIR) or Path(tempfile.gettempdir()) / "refexp-offline-batch")


class OfflineBatch:
    """``BatchBackend`` over the offline teacher (``worker.clients.offline.OfflineClient``).

    :param vlm_spec: the run's ``vlm`` section (unused, as for the online teacher).
    :param directory: where jobs live (default: ``default_dir()``).
    """

    name = "offline"

    def __init__(self, vlm_spec: object | None = None, *, directory: str | Path | None = None) -> None:
        self.vlm_spec = vlm_spec
        self.dir = Path(directory) if directory else default_dir()
        self.teacher = OfflineClient(vlm_spec)

    def probe(self) -> None:
        """The offline teacher has its batch API, unless ``REFEXP_OFFLINE_BATCH_UNSUPPORTED`` is
        set (tests: an endpoint without one, as vLLM or NIM)."""
        if os.environ.get("REFEXP_OFFLINE_BATCH_UNSUPPORTED"):
            raise BatchUnsupported("vlm.batch is on, but this offline endpoint has no batch API "
                                   "(REFEXP_OFFLINE_BATCH_UNSUPPORTED is set): turn vlm.batch off")

    def _path(self, job_id: str) -> Path:
        return self.dir / f"{job_id}.json"

    def _load(self, job_id: str) -> dict:
        try:
            return json.loads(self._path(job_id).read_text())
        except FileNotFoundError:
            raise ClientError(f"offline batch: no job {job_id}", status=404) from None

    def _take_error(self, step: str) -> bool:
        """Whether this request of ``step`` is one of the first n told to fail."""
        spec = os.environ.get("REFEXP_OFFLINE_BATCH_ERRORS", "")
        want, _, count = spec.partition(":")
        if not spec or want != step:
            return False
        return self._take("errors", int(count or 0))

    def _take(self, counter: str, limit: int) -> bool:
        """Whether one more of ``limit`` may be used (a counter file under a lock: jobs are polled
        by whichever worker holds the coordinator's lease)."""
        if limit <= 0:
            return False
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / f"{counter}.count", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            used = len(f.read())
            if used >= limit:
                return False
            f.write("x")
            f.flush()
            return True

    def submit(self, items: Sequence[BatchItem], *, display_name: str) -> str:
        job_id = f"offline-{uuid.uuid4().hex[:12]}"
        answers: dict[str, dict] = {}
        for item in items:
            if self._take_error(item.request.step):
                answers[item.key] = {"error": "ClientError", "message": "offline batch: 503 for this request"}
                continue
            try:
                r = self.teacher.generate(item.request)
            except PipelineError as exc:
                answers[item.key] = {"error": type(exc).__name__, "message": str(exc)}
                continue
            answers[item.key] = {"text": r.text, "model": r.model, "finish_reason": r.finish_reason,
                                 "usage": r.usage}
        write_atomic(self._path(job_id), json.dumps({"display_name": display_name, "polls": 0,
                                                     "answers": answers, "cancelled": False}))
        with open(self.dir / "submits.log", "a") as f:
            f.write(f"{job_id} {display_name} {len(items)}\n")
        return job_id

    def status(self, job_id: str) -> JobStatus:
        job = self._load(job_id)
        if job["cancelled"]:
            return JobStatus("cancelled")
        job["polls"] += 1
        write_atomic(self._path(job_id), json.dumps(job))
        n = len(job["answers"])
        if job["polls"] < int(os.environ.get("REFEXP_OFFLINE_BATCH_POLLS", "1") or 1):
            return JobStatus("running", {"total": n})
        if "end" not in job:  # decided once per job, at its first final poll
            job["end"] = "failed" if self._take("end", _count("REFEXP_OFFLINE_BATCH_END")) else "succeeded"
            if job["end"] == "failed":
                job["end"] = os.environ["REFEXP_OFFLINE_BATCH_END"].partition(":")[0]
            write_atomic(self._path(job_id), json.dumps(job))
        if job["end"] != "succeeded":
            return JobStatus(job["end"], {"total": n}, error=f"offline batch: the job {job['end']}")
        return JobStatus("succeeded", {"total": n, "succeeded": n})

    def results(self, job_id: str, *, expected_keys: Iterable[str] | None = None
                ) -> Iterator[tuple[str, VLMResponse | Exception]]:
        job = self._load(job_id)
        # A job that expired or failed here ended before answering anything (the knob's meaning:
        # the whole job is lost); a provider's expired job may hold some answers (OpenAI's does).
        answers = {} if job.get("end", "succeeded") != "succeeded" else job["answers"]
        if expected_keys is not None:
            wanted = list(expected_keys)
            missing = {"error": True, "message": f"offline batch job {job_id}: no answer for this request"}
            answers = {k: answers.get(k, missing) for k in wanted}
        for key, a in answers.items():
            if "error" in a:
                yield key, ClientError(a["message"], status=503)
            else:
                yield key, VLMResponse(text=a["text"], model=a["model"], finish_reason=a["finish_reason"],
                                       usage=a["usage"])

    def cancel(self, job_id: str) -> None:
        job = self._load(job_id)
        job["cancelled"] = True
        write_atomic(self._path(job_id), json.dumps(job))

    def find(self, display_name: str) -> str | None:
        try:
            lines = (self.dir / "submits.log").read_text().splitlines()
        except FileNotFoundError:
            return None
        found = [line.split()[0] for line in lines if line.split()[1:2] == [display_name]]
        return found[-1] if found else None

    def submitted(self) -> list[str]:
        """The job ids submitted so far, in order (tests)."""
        try:
            return [line.split()[0] for line in (self.dir / "submits.log").read_text().splitlines() if line]
        except FileNotFoundError:
            return []
