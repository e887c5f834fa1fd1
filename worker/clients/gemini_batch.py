"""Gemini Batch Mode through the official ``google-genai`` SDK (``client.batches``).

Why this shape: a job is cheap to make and slow to answer, so nothing here waits. ``submit``
sends the requests inline when they fit under Google's limit for one create call (20 MB) and as
an uploaded JSONL file (``client.files.upload``) above it; ``status`` asks ``batches.get``;
``results`` reads the inline responses or downloads the result file; ``cancel`` asks
``batches.cancel``. Every request is built by ``GeminiClient`` (the same contents, generation
config, schema, thinking and token budget as an online call) and every answer is read by it
(``check_answer``, usage, finish reasons), so an answer from a batch job looks exactly like an
online one downstream. The API key is sent by the SDK as a header and redacted from every
message; it never goes into a display name or a file.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Iterable, Iterator, Sequence

from google.genai import types

from worker.clients.base import VLMRequest, VLMResponse
from worker.clients.batch import (
    FIND_LIMIT,
    NO_KEY,
    BatchItem,
    JobState,
    JobStatus,
    check_items,
    probe_listing,
)
from worker.clients.gemini import _RETRYABLE_4XX, GeminiClient
from worker.clients.replies import Endpoint, about_schema, map_status
from worker.errors import ClientError, PermanentClientError, PipelineError
from worker.spec import GeminiSpec

#: Google: inline requests suit jobs whose whole create request stays under 20 MB. We switch to
#: a file a little below that, since our size is an estimate of the JSON the SDK will send.
INLINE_MAX_BYTES = 19_000_000
#: Google's limit for one uploaded input file.
FILE_MAX_BYTES = 2_000_000_000
#: The generation settings a request line carries (``GeminiClient._config`` sets these; anything
#: else in the config is the SDK's own, such as automatic function calling).
GENERATION_FIELDS = frozenset({"temperature", "max_output_tokens", "media_resolution", "thinking_config",
                               "response_mime_type", "response_json_schema"})
STATES: dict[str, JobState] = {
    "JOB_STATE_UNSPECIFIED": "pending", "JOB_STATE_QUEUED": "pending", "JOB_STATE_PENDING": "pending",
    "JOB_STATE_RUNNING": "running", "JOB_STATE_CANCELLING": "running", "JOB_STATE_UPDATING": "running",
    "JOB_STATE_PAUSED": "running", "JOB_STATE_SUCCEEDED": "succeeded", "JOB_STATE_PARTIALLY_SUCCEEDED": "succeeded",
    "JOB_STATE_FAILED": "failed", "JOB_STATE_CANCELLED": "cancelled", "JOB_STATE_EXPIRED": "expired",
}
#: google.rpc.Code -> the HTTP status the same failure has online (per-request errors of a job
#: are google.rpc.Status objects, whose ``code`` is the gRPC one).
GRPC_TO_HTTP = {1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429, 9: 400, 10: 409, 11: 400,
                12: 501, 13: 500, 14: 503, 15: 500, 16: 401}


def rest_request(contents: Sequence[types.Content], config: types.GenerateContentConfig) -> dict:
    """One ``GenerateContentRequest`` as the REST JSON a batch input file line carries."""
    return {
        "contents": [c.model_dump(mode="json", by_alias=True, exclude_none=True) for c in contents],
        "generationConfig": config.model_dump(mode="json", by_alias=True, exclude_none=True,
                                              include=set(GENERATION_FIELDS)),
    }


def estimated_bytes(request: VLMRequest) -> int:
    """What one request adds to an inline create call: the base64 image, the prompt, the schema."""
    schema = len(json.dumps(request.response_schema)) if request.response_schema is not None else 0
    return 4 * math.ceil(len(request.image.data) / 3) + len(request.prompt.encode()) + schema + 1024


class GeminiBatch(GeminiClient):
    """``BatchBackend`` for the Gemini Developer API (or anything speaking it at ``spec.base_url``).

    :param spec: the ``vlm.gemini`` section, as for the online client.
    :param inline_max_bytes: jobs estimated above this go as an uploaded file (tests lower it).
    """

    def __init__(self, spec: GeminiSpec, *, inline_max_bytes: int = INLINE_MAX_BYTES):
        try:
            super().__init__(spec)
            self._no_key: PermanentClientError | None = None
        except PermanentClientError as exc:  # no key in this process (the producer): probe only
            super().__init__(spec.model_copy(update={"api_key": NO_KEY}))
            self._no_key = exc
        self.inline_max_bytes = inline_max_bytes

    def _keyed(self) -> None:
        """Jobs need the key: without one, the error an online client raises at construction."""
        if self._no_key is not None:
            raise self._no_key

    # ------------------------------------------------------------------ BatchBackend
    def probe(self) -> None:
        """List one job: an endpoint without the batch routes answers 404. Without a key (the
        producer) an auth error is the answer of a route that exists: the workers' key is
        checked when they submit."""
        probe_listing(self, lambda: self._client.batches.list(config=types.ListBatchJobsConfig(page_size=1)),
                      expected="a list of batch jobs", asked="listing batch jobs")

    def submit(self, items: Sequence[BatchItem], *, display_name: str) -> str:
        self._keyed()
        check_items(items)
        name = self._redact(display_name)[:128]
        size = sum(estimated_bytes(item.request) for item in items)
        with self.sdk_errors(expected="a batch job"):
            if size <= self.inline_max_bytes:
                src: list[types.InlinedRequest] | str = [
                    types.InlinedRequest(contents=self.contents(item.request), config=self._config(item.request),
                                         metadata={"key": item.key}) for item in items]
            else:
                src = self._upload(items, name)
            try:
                job = self._client.batches.create(model=self.model, src=src,
                                                  config=types.CreateBatchJobConfig(display_name=name))
            except Exception:
                if isinstance(src, str):
                    self._forget(src)
                raise
        if not job.name:
            raise ClientError(f"{self.name}: {self.base_url} created a batch job without a name")
        return job.name

    def find(self, display_name: str) -> str | None:
        """Among the key's most recent ``FIND_LIMIT`` batch jobs, one whose ``display_name`` is
        ``display_name`` as ``submit`` wrote it."""
        self._keyed()
        name = self._redact(display_name)[:128]
        with self.sdk_errors(expected="a list of batch jobs"):
            for n, job in enumerate(self._client.batches.list(config=types.ListBatchJobsConfig(page_size=100))):
                if n >= FIND_LIMIT:
                    break
                if job.display_name == name and job.name:
                    return job.name
        return None

    def status(self, job_id: str) -> JobStatus:
        job = self._get(job_id)
        state = _state(job)
        error = f"Gemini reported {_state_name(job)}" if state in ("failed", "expired") else ""
        if job.error is not None and job.error.message:
            error = self._redact(job.error.message)[:500]
        counts = {}
        if job.dest is not None and job.dest.inlined_responses is not None:
            done = job.dest.inlined_responses
            failed = sum(1 for r in done if r.error is not None)
            counts = {"total": len(done), "succeeded": len(done) - failed, "failed": failed}
        return JobStatus(state=state, counts=counts, error=error)

    def results(self, job_id: str, *, expected_keys: Iterable[str] | None = None
                ) -> Iterator[tuple[str, VLMResponse | Exception]]:
        """Every answer of a finished job, keyed as submitted.

        The keys come back with the answers (inline ``metadata.key``, a file line's ``key``).
        ``expected_keys`` (the job's keys in submission order, from the caller's ledger) makes a
        key missing from the output come out as a ``ClientError`` (Gemini cannot list a job's
        input afterwards), and places an inline response that came back without its metadata by
        its position (Google returns inline responses in request order).
        """
        job = self._get(job_id)
        state = _state(job)
        if state not in ("succeeded", "failed", "expired", "cancelled"):
            raise ClientError(f"{self.name}: batch job {job_id} is still {state}; its results come once it ends")
        expected = list(expected_keys) if expected_keys is not None else []
        seen: set[str] = set()
        for key, answer in self._answers(job, expected):
            seen.add(key)
            yield key, answer
        for key in expected:
            if key not in seen:
                yield key, ClientError(f"{self.name}: batch job {job_id} ({_state_name(job)}) holds no answer "
                                       f"for request {key}")

    def cancel(self, job_id: str) -> None:
        self._keyed()
        with self.sdk_errors(expected="a cancelled batch job"):
            self._client.batches.cancel(name=job_id)

    # ------------------------------------------------------------------ internals
    def _get(self, job_id: str) -> types.BatchJob:
        self._keyed()
        with self.sdk_errors(expected="a batch job"):
            return self._client.batches.get(name=job_id)

    def _upload(self, items: Sequence[BatchItem], name: str) -> str:
        lines = [json.dumps({"key": item.key, "request": rest_request(self.contents(item.request),
                                                                      self._config(item.request))},
                            separators=(",", ":")) for item in items]
        data = ("\n".join(lines) + "\n").encode()
        if len(data) > FILE_MAX_BYTES:
            raise ClientError(f"{self.name}: a batch input file of {len(data)} bytes is over Google's "
                              f"{FILE_MAX_BYTES} bytes: lower vlm.batch.max_requests_per_job")
        uploaded = self._client.files.upload(file=io.BytesIO(data),
                                             config=types.UploadFileConfig(mime_type="jsonl", display_name=name))
        if not uploaded.name:
            raise ClientError(f"{self.name}: {self.base_url} stored the batch input file without a name")
        return uploaded.name

    def _forget(self, file_name: str) -> None:
        """Best effort: delete an input file no job uses (Google would drop it after 48 hours)."""
        with contextlib.suppress(Exception):  # the failure being raised matters, not this one
            self._client.files.delete(name=file_name)

    def _answers(self, job: types.BatchJob, expected: list[str]) -> Iterator[tuple[str, VLMResponse | Exception]]:
        dest = job.dest
        if dest is None:
            return
        if dest.inlined_responses is not None:
            in_order = len(dest.inlined_responses) == len(expected)
            for i, item in enumerate(dest.inlined_responses):
                key = (item.metadata or {}).get("key") or (expected[i] if in_order else None)
                if key is None:
                    continue  # not ours to place; expected_keys reports the request as missing
                if item.error is not None:
                    yield key, self._line_error(item.error.code, item.error.message)
                else:
                    yield key, self._answer(item.response)
            return
        if dest.file_name:
            with self.sdk_errors(expected="a batch result file"):
                data = self._client.files.download(file=dest.file_name)
            for line in data.decode("utf-8", "replace").splitlines():
                yield from self._file_line(line)

    def _file_line(self, line: str) -> Iterator[tuple[str, VLMResponse | Exception]]:
        try:
            obj = json.loads(line)
        except ValueError:
            return  # a torn line: its key is reported missing when the caller names the job's keys
        if not isinstance(obj, dict) or not isinstance(obj.get("key"), str):
            return
        err = obj.get("error") or obj.get("status")
        if isinstance(err, dict) and err.get("code") not in (None, 0):
            yield obj["key"], self._line_error(err.get("code"), err.get("message"))
            return
        raw = obj.get("response")
        if not isinstance(raw, dict):
            yield obj["key"], ClientError(f"{self.name}: the result line for {obj['key']} holds no response")
            return
        try:
            resp = types.GenerateContentResponse._from_response(response=raw, kwargs={})
        except ValueError as exc:
            yield obj["key"], ClientError(f"{self.name}: unreadable result line for {obj['key']}: {exc}")
            return
        yield obj["key"], self._answer(resp)

    def _answer(self, resp: types.GenerateContentResponse | None) -> VLMResponse | Exception:
        if resp is None:
            return ClientError(f"{self.name}: a batch answer without a response")
        try:
            return self._response(resp)
        except PipelineError as exc:  # blocked, truncated, empty: as an online call raises them
            return exc

    def _line_error(self, code, message) -> Exception:
        code = int(code or 0)
        http = code if code >= 100 else GRPC_TO_HTTP.get(code, 500)
        detail = self._redact(str(message or ""))[:500]
        return map_status(Endpoint(self.name, self.base_url, self.model, "GOOGLE_API_KEY", _RETRYABLE_4XX), http,
                          detail, schema=about_schema(detail))


def _state_name(job: types.BatchJob) -> str:
    return str(getattr(job.state, "value", job.state) or "JOB_STATE_UNSPECIFIED")


def _state(job: types.BatchJob) -> JobState:
    return STATES.get(_state_name(job), "running")
