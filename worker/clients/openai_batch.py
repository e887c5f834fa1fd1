"""OpenAI's Batch API through the official ``openai`` SDK (``client.files`` + ``client.batches``).

Why this shape: ``submit`` uploads one JSONL file of ``/v1/chat/completions`` requests (purpose
``batch``, one ``custom_id`` per request) and creates a job over it with a 24-hour window;
``status`` is ``batches.retrieve``; ``results`` reads the output and error files
(``files.content``); ``cancel`` is ``batches.cancel``. Each line's body is what
``OpenAICompatClient`` sends online and each answer is read by it (``check_answer``, usage,
finish reasons), so an answer from a batch job looks exactly like an online one downstream.
Self-hosted servers (vLLM, NIM) have no batch routes: ``probe`` says so before any job is made.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence

import pydantic
from openai.types.chat import ChatCompletion

from worker.clients.base import VLMResponse
from worker.clients.batch import (
    FIND_LIMIT,
    NO_KEY,
    BatchItem,
    JobState,
    JobStatus,
    check_items,
    probe_listing,
)
from worker.clients.openai_compat import OpenAICompatClient
from worker.clients.replies import about_schema, map_status
from worker.errors import ClientError, PermanentClientError, PipelineError, RateLimited
from worker.spec import OpenAISpec

ENDPOINT = "/v1/chat/completions"
#: OpenAI's limits for one job's input file.
FILE_MAX_BYTES = 200 * 1024 * 1024
MAX_REQUESTS = 50_000
STATES: dict[str, JobState] = {
    "validating": "pending", "in_progress": "running", "finalizing": "running", "cancelling": "running",
    "completed": "succeeded", "failed": "failed", "expired": "expired", "cancelled": "cancelled",
}
_FILENAME = re.compile(r"[^A-Za-z0-9._-]+")


class OpenAIBatch(OpenAICompatClient):
    """``BatchBackend`` for OpenAI's Batch API (and servers implementing it at ``spec.base_url``)."""

    def __init__(self, spec: OpenAISpec):
        try:
            super().__init__(spec)
            self._no_key: PermanentClientError | None = None
        except PermanentClientError as exc:  # a keyed host and no key here (the producer): probe only
            super().__init__(spec.model_copy(update={"api_key": NO_KEY}))
            self._no_key = exc

    def _keyed(self) -> None:
        """Jobs need the key: without one, the error an online client raises at construction."""
        if self._no_key is not None:
            raise self._no_key

    # ------------------------------------------------------------------ BatchBackend
    def probe(self) -> None:
        """List one job: vLLM and NIM answer 404 on ``/batches``. Without a key (the producer)
        an auth error is the answer of a route that exists: the workers' key is checked when
        they submit."""
        probe_listing(self, lambda: self._client.batches.list(limit=1), expected="a list of batches",
                      asked="GET /batches")

    def submit(self, items: Sequence[BatchItem], *, display_name: str) -> str:
        self._keyed()
        check_items(items)
        if len(items) > MAX_REQUESTS:
            raise ClientError(f"{self.name}: {len(items)} requests in one job is over OpenAI's {MAX_REQUESTS}: "
                              "lower vlm.batch.max_requests_per_job")
        name = self._redact(display_name)[:200]
        lines = [json.dumps({"custom_id": item.key, "method": "POST", "url": ENDPOINT,
                             "body": self.body(item.request)}, separators=(",", ":")) for item in items]
        data = ("\n".join(lines) + "\n").encode()
        if len(data) > FILE_MAX_BYTES:
            raise ClientError(f"{self.name}: a batch input file of {len(data)} bytes is over OpenAI's "
                              f"{FILE_MAX_BYTES} bytes: lower vlm.batch.max_requests_per_job")
        filename = (_FILENAME.sub("-", name).strip("-") or "refexp-batch") + ".jsonl"
        with self.sdk_errors(expected="a file object"):
            uploaded = self._client.files.create(file=(filename, data, "application/jsonl"), purpose="batch")
        try:
            with self.sdk_errors(expected="a batch object"):
                job = self._client.batches.create(input_file_id=uploaded.id, endpoint=ENDPOINT,
                                                  completion_window="24h", metadata={"name": name})
        except PipelineError:
            self._forget(uploaded.id)
            raise
        return job.id

    def find(self, display_name: str) -> str | None:
        """Among the key's most recent ``FIND_LIMIT`` jobs (newest first), one whose
        ``metadata.name`` is ``display_name`` as ``submit`` wrote it."""
        self._keyed()
        name = self._redact(display_name)[:200]
        with self.sdk_errors(expected="a list of batches"):
            for n, job in enumerate(self._client.batches.list(limit=100)):
                if n >= FIND_LIMIT:
                    break
                if (job.metadata or {}).get("name") == name:
                    return job.id
        return None

    def status(self, job_id: str) -> JobStatus:
        job = self._retrieve(job_id)
        counts = {}
        if job.request_counts is not None:
            rc = job.request_counts
            counts = {"total": rc.total, "succeeded": rc.completed, "failed": rc.failed}
        error = ""
        if job.errors is not None and job.errors.data:
            error = "; ".join(self._redact(str(e.message or e.code or "")) for e in job.errors.data)[:500]
        elif job.status in ("failed", "expired"):
            error = f"OpenAI reported the batch {job.status}"
        return JobStatus(state=STATES.get(job.status, "running"), counts=counts, error=error)

    def results(self, job_id: str, *, expected_keys: Iterable[str] | None = None
                ) -> Iterator[tuple[str, VLMResponse | Exception]]:
        """Every answer of a finished job, keyed by ``custom_id``: the output file, then the error file.

        A key of the job that neither file holds (an expired or cancelled job's unanswered
        requests when the provider lists them nowhere) comes out as a ``ClientError``. The job's
        keys are ``expected_keys`` when the caller gives them, else the ``custom_id``s of the
        job's input file, fetched only when the files hold fewer lines than the job's requests
        (it carries every image: hundreds of megabytes for a large job).
        """
        job = self._retrieve(job_id)
        state = STATES.get(job.status, "running")
        if state not in ("succeeded", "failed", "expired", "cancelled"):
            raise ClientError(f"{self.name}: batch {job_id} is still {job.status}; its results come once it ends")
        seen: set[str] = set()
        for file_id in (job.output_file_id, job.error_file_id):
            for obj in self._lines(file_id):
                key = obj.get("custom_id")
                if isinstance(key, str) and key not in seen:
                    seen.add(key)
                    yield key, self._line_answer(obj)
        if expected_keys is not None:
            keys = list(expected_keys)
        elif job.request_counts is not None and len(seen) >= job.request_counts.total:
            keys = []  # every request answered: no need to fetch the (image-heavy) input file
        else:
            keys = [obj["custom_id"] for obj in self._lines(job.input_file_id) if isinstance(obj.get("custom_id"), str)]
        for key in keys:
            if key not in seen:
                yield key, ClientError(f"{self.name}: batch {job_id} ({job.status}) holds no answer for request {key}")

    def cancel(self, job_id: str) -> None:
        self._keyed()
        with self.sdk_errors(expected="a batch object"):
            self._client.batches.cancel(job_id)

    # ------------------------------------------------------------------ internals
    def _forget(self, file_id: str) -> None:
        """Best effort: delete an input file no job uses (OpenAI keeps files until deleted)."""
        with contextlib.suppress(Exception):  # the failure being raised matters, not this one
            self._client.files.delete(file_id)

    def _retrieve(self, job_id: str):
        self._keyed()
        with self.sdk_errors(expected="a batch object"):
            return self._client.batches.retrieve(job_id)

    def _lines(self, file_id: str | None) -> Iterator[dict]:
        if not file_id:
            return
        with self.sdk_errors(expected="a batch file's content"):
            text = self._client.files.content(file_id).text
        for line in text.splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue  # a torn line: its key is reported as missing below
            if isinstance(obj, dict):
                yield obj

    def _line_answer(self, obj: dict) -> VLMResponse | Exception:
        key = obj.get("custom_id")
        resp = obj.get("response") if isinstance(obj.get("response"), dict) else {}
        code = resp.get("status_code")
        body = resp.get("body")
        if code == 200 and isinstance(body, dict):
            try:
                return self._response(ChatCompletion.model_validate(body))
            except pydantic.ValidationError as exc:
                return ClientError(f"{self.name}: the answer for {key} is not a chat completion: "
                                   f"{str(exc).splitlines()[0]}")
            except PipelineError as exc:  # blocked, truncated, empty: as an online call raises them
                return exc
        if isinstance(code, int) and code >= 400:
            detail = body.get("error", body) if isinstance(body, dict) else body
            message = detail.get("message") if isinstance(detail, dict) else detail
            detail = self._redact(str(message or ""))[:500]
            return map_status(self._endpoint(), code, detail, schema=about_schema(detail))
        err = obj.get("error") if isinstance(obj.get("error"), dict) else {}
        what, message = str(err.get("code") or ""), self._redact(str(err.get("message") or ""))[:500]
        if "rate_limit" in what:
            return RateLimited(f"{self.name}: request {key} of the batch was rate limited ({what}): {message}",
                               status=429)
        return ClientError(f"{self.name}: request {key} of the batch was not answered ({what or 'no code'}): "
                           f"{message or 'no message'}")
