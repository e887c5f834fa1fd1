"""The batch routes of the fake VLM server: Gemini Batch Mode and OpenAI's Batch API, with the
file routes each uses, spoken as the official SDKs speak them.

Why a fake with jobs: a batch backend is only trustworthy when it is driven through the real
SDKs against the real wire shapes — Gemini's long-running-operation batches (inline requests or
a JSONL file sent with the resumable upload protocol, results inline or in a downloadable file,
per-request ``google.rpc.Status`` errors) and OpenAI's files + batches (multipart upload,
``custom_id`` lines, output and error files). Each request of a job is answered by the same
logic as an online call (``FakeVLM.answer_fn`` or the literal-minded default answerer), so
answers from a batch parse exactly like online ones.

``FakeVLM`` makes one on first use (``fake.batch``)::

    fake.batch.finish_after(2)          # new jobs report running for 2 polls, then end
    fake.batch.fail_line(1, 429)        # the next job's request #1 fails with 429
    fake.batch.block_line(2)            # ... its request #2 is withheld (SAFETY)
    fake.batch.expire_next()            # the next job expires unanswered
    fake.batch.fail_next_job()          # the next job fails whole
    fake.batch.fail_next_create(503)    # the next job creation is refused
    fake.batch.enabled = False          # no batch routes at all (vLLM, NIM): 404
    fake.batch.calls["gemini.get"]      # calls per step

A job's answers are made when it ends (on the status poll that ends it), so a job that ends
"while no worker runs" is one that ends before the next poll.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from tests.support.fake_vlm import (
    GEMINI_STATUS,
    RecordedRequest,
    default_answer,
    gemini_blocked,
    gemini_response,
    openai_completion,
    openai_error,
    parse_gemini,
    parse_openai,
    wants_schema,
)

if TYPE_CHECKING:
    from tests.support.fake_vlm import FakeVLM, Reply

# Both protocols live under /v1 (google-genai's default version there, OpenAI's only one): OpenAI
# job ids start with "batch_", Gemini's never do, and a listing is Gemini's when its caller is.
GEMINI_BATCH_CREATE = re.compile(r"^/(v1beta|v1alpha|v1)/models/([^:/]+):batchGenerateContent$")
GEMINI_BATCH = re.compile(r"^/(v1beta|v1alpha|v1)/batches/(?!batch_)([^:/]+)$")
GEMINI_BATCH_CANCEL = re.compile(r"^/(v1beta|v1alpha|v1)/batches/([^:/]+):cancel$")
GEMINI_BATCHES = re.compile(r"^/(v1beta|v1alpha|v1)/batches/?$")
GEMINI_UPLOAD = re.compile(r"^/upload/(v1beta|v1alpha|v1)/files/?$")
GEMINI_DOWNLOAD = re.compile(r"^/(v1beta|v1alpha|v1)/files/([^:/]+):download$")
GEMINI_FILE = re.compile(r"^/(v1beta|v1alpha|v1)/files/(?!file-)([^:/]+)$")
OPENAI_FILE = re.compile(r"^/v1/files/(file-[^/]+)$")
OPENAI_FILES = re.compile(r"^/v1/files/?$")
OPENAI_FILE_CONTENT = re.compile(r"^/v1/files/([^/]+)/content$")
OPENAI_BATCHES = re.compile(r"^/v1/batches/?$")
OPENAI_BATCH = re.compile(r"^/v1/batches/([^/]+)$")
OPENAI_BATCH_CANCEL = re.compile(r"^/v1/batches/([^/]+)/cancel$")

#: Our job states -> Gemini's wire names (the SDK maps BATCH_STATE_* to JOB_STATE_*).
GEMINI_STATES = {"pending": "BATCH_STATE_PENDING", "running": "BATCH_STATE_RUNNING",
                 "succeeded": "BATCH_STATE_SUCCEEDED", "failed": "BATCH_STATE_FAILED",
                 "expired": "BATCH_STATE_EXPIRED", "cancelled": "BATCH_STATE_CANCELLED"}
OPENAI_STATES = {"pending": "validating", "running": "in_progress", "succeeded": "completed",
                 "failed": "failed", "expired": "expired", "cancelled": "cancelled"}
HTTP_TO_GRPC = {400: 3, 401: 16, 403: 7, 404: 5, 409: 10, 429: 8, 499: 1, 500: 13, 501: 12, 503: 14, 504: 4}
#: What a server that predates structured output says about a schema (as FakeVLM online).
SCHEMA_REFUSALS = {
    "openai": "1 validation error for ChatCompletionRequest\nresponse_format.type\n  Input should be 'text' or "
              "'json_object' [type=literal_error, input_value='json_schema']",
    "gemini": "Invalid JSON payload received. Unknown name \"responseJsonSchema\" at 'generation_config': "
              "Cannot find field.",
}
FINAL = frozenset({"succeeded", "failed", "expired", "cancelled"})


@dataclass(frozen=True)
class LineFault:
    """What one request of the next job gets instead of the default answer."""

    status: int | None = None  # an error with this HTTP status
    message: str | None = None
    block: str | None = None  # Gemini blockReason / OpenAI content_filter
    text: str | None = None  # this answer text ...
    finish_reason: str | None = None  # ... with this finish reason
    drop: bool = False  # no line at all in the output


@dataclass
class _Plan:
    outcome: str = "succeeded"  # succeeded | expired | failed
    answered: int = 0  # expired: how many requests were answered before the window closed
    message: str = ""


@dataclass
class Job:
    """One batch job as the fake keeps it."""

    id: str
    protocol: str  # "gemini" | "openai"
    model: str
    display_name: str
    lines: list[tuple[str, dict]]  # (key, request body) in submission order
    source: str  # "inline" | "file"
    polls_left: int
    plan: _Plan
    faults: dict[int, LineFault]
    created: float = field(default_factory=time.time)
    state: str = "pending"
    polls: int = 0
    input_file_id: str = ""
    output: list[dict] = field(default_factory=list)  # protocol-shaped answer entries, in order
    errors: list[dict] = field(default_factory=list)  # OpenAI's error-file lines
    output_file_id: str = ""
    error_file_id: str = ""
    metadata: dict = field(default_factory=dict)
    bare: bool = False  # inline responses without metadata


class FakeBatch:
    """Batch and file routes of both protocols for one ``FakeVLM``; see the module docstring."""

    def __init__(self, fake: FakeVLM):
        self.fake = fake
        self.enabled = True
        #: Inline responses without their ``metadata`` (in request order only).
        self.omit_inline_metadata = False
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget jobs, files, counters, queued outcomes and line faults."""
        with self._lock:
            self.jobs: dict[str, Job] = {}
            self.files: dict[str, tuple[str, bytes]] = {}  # id -> (display name, content)
            self._uploads: dict[str, dict] = {}  # Gemini resumable sessions
            self.calls: Counter[str] = Counter()
            self.requests: list[RecordedRequest] = []  # every answered line, as the fake read it
            self.polls_to_finish = 0
            self._plans: deque[_Plan] = deque()
            self._faults: dict[int, LineFault] = {}
            self._create_failures: deque[tuple[int, str]] = deque()

    # ------------------------------------------------------------------ controls
    def finish_after(self, polls: int) -> None:
        """Jobs created from now on report running for ``polls`` status polls, then end (0: the
        first poll finds the job ended)."""
        self.polls_to_finish = polls

    def expire_next(self, n: int = 1, *, answered: int = 0) -> None:
        """The next ``n`` jobs expire, with only their first ``answered`` requests answered."""
        with self._lock:
            self._plans.extend(_Plan("expired", answered) for _ in range(n))

    def fail_next_job(self, n: int = 1, message: str = "the batch could not be processed") -> None:
        """The next ``n`` jobs fail whole (no answers)."""
        with self._lock:
            self._plans.extend(_Plan("failed", 0, message) for _ in range(n))

    def fail_next_create(self, status: int = 503, message: str | None = None) -> None:
        """The next job creation (either protocol) is refused with HTTP ``status``."""
        with self._lock:
            self._create_failures.append((status, message or f"fake error {status}"))

    def fail_line(self, index: int, status: int, message: str | None = None) -> None:
        """Request ``index`` (0-based) of the next job fails with HTTP ``status``."""
        self._fault(index, LineFault(status=status, message=message))

    def block_line(self, index: int, reason: str = "SAFETY") -> None:
        """Request ``index`` of the next job is withheld (Gemini blockReason, OpenAI content_filter)."""
        self._fault(index, LineFault(block=reason))

    def answer_line(self, index: int, text: str, *, finish_reason: str | None = None) -> None:
        """Request ``index`` of the next job is answered with ``text`` (and ``finish_reason``)."""
        self._fault(index, LineFault(text=text, finish_reason=finish_reason))

    def drop_line(self, index: int) -> None:
        """Request ``index`` of the next job is missing from its output."""
        self._fault(index, LineFault(drop=True))

    def _fault(self, index: int, fault: LineFault) -> None:
        with self._lock:
            self._faults[index] = fault

    # ------------------------------------------------------------------ dispatch
    def handle_get(self, h) -> Reply | None:
        """The reply to a GET on a batch or file route, or None when the path is not one."""
        if not self.enabled:
            return None
        split = urlsplit(h.path)
        path, query = split.path, split.query
        if m := GEMINI_BATCH.match(path):
            return self._guarded(h, "gemini", query, "gemini.get", lambda: self._gemini_get(f"batches/{m.group(2)}"))
        if GEMINI_BATCHES.match(path) and _from_genai(h, query):
            return self._guarded(h, "gemini", query, "gemini.list", self._gemini_list)
        if m := GEMINI_DOWNLOAD.match(path):
            return self._guarded(h, "gemini", query, "gemini.download", lambda: self._download(f"files/{m.group(2)}"))
        if m := OPENAI_FILE_CONTENT.match(path):
            return self._guarded(h, "openai", query, "openai.files.content", lambda: self._download(m.group(1)))
        if m := OPENAI_BATCH.match(path):
            return self._guarded(h, "openai", query, "openai.batches.retrieve", lambda: self._openai_get(m.group(1)))
        if OPENAI_BATCHES.match(path):
            return self._guarded(h, "openai", query, "openai.batches.list", self._openai_list)
        return None

    def handle_post(self, h, raw: bytes) -> Reply | None:
        """The reply to a POST on a batch or file route, or None when the path is not one."""
        if not self.enabled:
            return None
        split = urlsplit(h.path)
        path, query = split.path, split.query
        if m := GEMINI_BATCH_CREATE.match(path):
            return self._guarded(h, "gemini", query, "gemini.create", lambda: self._gemini_create(m.group(2), raw))
        if m := GEMINI_BATCH_CANCEL.match(path):
            return self._guarded(h, "gemini", query, "gemini.cancel", lambda: self._cancel(f"batches/{m.group(2)}"))
        if GEMINI_UPLOAD.match(path):
            step = "gemini.upload_start" if "upload_id" not in parse_qs(query) else "gemini.upload"
            return self._guarded(h, "gemini", query, step, lambda: self._gemini_upload(h, query, raw))
        if OPENAI_FILES.match(path):
            return self._guarded(h, "openai", query, "openai.files.create", lambda: self._openai_file(h, raw))
        if m := OPENAI_BATCH_CANCEL.match(path):
            return self._guarded(h, "openai", query, "openai.batches.cancel", lambda: self._cancel(m.group(1)))
        if OPENAI_BATCHES.match(path):
            return self._guarded(h, "openai", query, "openai.batches.create", lambda: self._openai_create(raw))
        return None

    def handle_delete(self, h) -> Reply | None:
        """The reply to a DELETE of a file (both protocols), or None when the path is not one."""
        if not self.enabled:
            return None
        split = urlsplit(h.path)
        if m := GEMINI_FILE.match(split.path):
            return self._guarded(h, "gemini", split.query, "gemini.files.delete",
                                 lambda: self._delete(f"files/{m.group(2)}", "gemini"))
        if m := OPENAI_FILE.match(split.path):
            return self._guarded(h, "openai", split.query, "openai.files.delete",
                                 lambda: self._delete(m.group(1), "openai"))
        return None

    def _delete(self, file_id: str, protocol: str) -> Reply:
        if self.files.pop(file_id, None) is None:
            return _not_found(file_id, protocol)
        if protocol == "openai":
            return 200, {"id": file_id, "object": "file", "deleted": True}, None
        return 200, {}, None

    def _guarded(self, h, protocol: str, query: str, step: str, serve) -> Reply:
        with self._lock:
            self.calls[step] += 1
        denied = self.fake._auth_error(h, protocol, query)
        if denied is not None and not (step == "gemini.upload" and "upload_id" in parse_qs(query)):
            return denied
        with self._lock:
            return serve()

    # ------------------------------------------------------------------ jobs
    def _new_job(self, protocol: str, model: str, display_name: str, lines: list[tuple[str, dict]],
                 source: str) -> Job:
        plan = self._plans.popleft() if self._plans else _Plan()
        prefix = "batches/" if protocol == "gemini" else "batch_"
        job = Job(id=prefix + uuid.uuid4().hex[:20], protocol=protocol, model=model, display_name=display_name,
                  lines=lines, source=source, polls_left=self.polls_to_finish, plan=plan, faults=self._faults,
                  bare=self.omit_inline_metadata)
        self._faults = {}
        self.jobs[job.id] = job
        return job

    def _poll(self, job: Job) -> None:
        """One status poll: the job runs for its polls, then ends as planned."""
        job.polls += 1
        if job.state in FINAL:
            return
        if job.state == "cancelling":
            job.state = "cancelled"
            return
        if job.polls_left > 0:
            job.polls_left -= 1
            job.state = "running"
            return
        self._finish(job)

    def _finish(self, job: Job) -> None:
        job.state = job.plan.outcome
        if job.plan.outcome == "failed":
            return
        for i, (key, body) in enumerate(job.lines):
            if job.plan.outcome == "expired" and i >= job.plan.answered:
                if job.protocol == "openai":
                    job.errors.append(_openai_line(key, None, {
                        "code": "batch_expired",
                        "message": "This request could not be executed before the completion window expired."}))
                continue
            fault = job.faults.get(i)
            if fault is not None and fault.drop:
                continue
            self._answer(job, key, body, fault)
        if job.protocol == "openai":
            job.output_file_id = self._store("batch_output.jsonl", _jsonl(job.output)) if job.output else ""
            job.error_file_id = self._store("batch_errors.jsonl", _jsonl(job.errors)) if job.errors else ""
        elif job.source == "file":
            job.output_file_id = self._store("batch-results.jsonl", _jsonl(job.output), prefix="files/batch-")

    def _answer(self, job: Job, key: str, body: dict, fault: LineFault | None) -> None:
        protocol = job.protocol
        parsed = parse_openai(body) if protocol == "openai" else parse_gemini(body)
        model = str(body.get("model", "")) if protocol == "openai" else job.model
        image, mime = parsed.images[0] if parsed.images else (None, "")
        self.requests.append(RecordedRequest(protocol, f"batch:{job.id}", model, parsed.prompt, image, mime,
                                             parsed.params, {}, body, len(parsed.images)))
        status, message = None, None
        if fault is not None and fault.status is not None:
            status, message = fault.status, fault.message or f"fake error {fault.status}"
        elif self.fake.models is not None and model not in self.fake.models:
            status, message = 404, f"model {model} not found"
        elif self.fake.reject_json_schema and wants_schema(protocol, parsed.params):
            status, message = 400, SCHEMA_REFUSALS[protocol]
        if status is not None:
            if protocol == "openai":
                job.errors.append(_openai_line(key, {"status_code": status, "request_id": uuid.uuid4().hex,
                                                     "body": openai_error(status, message)}, None))
            else:
                error = {"code": HTTP_TO_GRPC.get(status, 2), "message": message}
                job.output.append(_gemini_entry(job, key, error=error))
            return
        if fault is not None and fault.block is not None:
            if protocol == "openai":
                completion = openai_completion(model, parsed.prompt, None, "content_filter")
            else:
                completion = gemini_blocked(model, parsed.prompt, fault.block)
        else:
            if fault is not None and fault.text is not None:
                text, reason = fault.text, fault.finish_reason
            else:
                text, reason = (self.fake.answer_fn or default_answer)(parsed.prompt, image, protocol), None
            if protocol == "openai":
                completion = openai_completion(model, parsed.prompt, text, reason or "stop")
            else:
                completion = gemini_response(model, parsed.prompt, text, reason or "STOP")
        if protocol == "openai":
            job.output.append(_openai_line(key, {"status_code": 200, "request_id": uuid.uuid4().hex,
                                                 "body": completion}, None))
        else:
            job.output.append(_gemini_entry(job, key, response=completion))

    def _cancel(self, job_id: str) -> Reply:
        job = self.jobs.get(job_id)
        if job is None:
            return _not_found(job_id, "openai" if job_id.startswith("batch_") else "gemini")
        if job.state not in FINAL:
            job.state = "cancelling" if job.protocol == "openai" else "cancelled"
        return (200, self._openai_job(job), None) if job.protocol == "openai" else (200, {}, None)

    def _store(self, name: str, data: bytes, prefix: str = "file-") -> str:
        file_id = prefix + uuid.uuid4().hex[:24]
        self.files[file_id] = (name, data)
        return file_id

    def _download(self, file_id: str) -> Reply:
        if file_id not in self.files:
            return _not_found(file_id, "gemini" if file_id.startswith("files/") else "openai")
        return 200, self.files[file_id][1], {"Content-Type": "application/octet-stream"}

    # ------------------------------------------------------------------ Gemini
    def _gemini_create(self, model: str, raw: bytes) -> Reply:
        if self._create_failures:
            status, message = self._create_failures.popleft()
            return status, {"error": {"code": status, "message": message,
                                      "status": GEMINI_STATUS.get(status, "UNKNOWN")}}, None
        body = json.loads(raw or b"{}")
        batch = body.get("batch") or {}
        source = batch.get("inputConfig") or batch.get("input_config") or {}
        if "fileName" in source or "file_name" in source:
            name = source.get("fileName") or source.get("file_name")
            if name not in self.files:
                return 400, {"error": {"code": 400, "message": f"file {name} not found",
                                       "status": GEMINI_STATUS[400]}}, None
            lines = []
            for n, text in enumerate(self.files[name][1].decode().splitlines()):
                if text.strip():
                    line = json.loads(text)
                    lines.append((str(line.get("key", n)), line.get("request") or {}))
            kind = "file"
        else:
            requests = ((source.get("requests") or {}).get("requests")) or []
            lines = [(str((r.get("metadata") or {}).get("key", n)), r.get("request") or {})
                     for n, r in enumerate(requests)]
            kind = "inline"
        if not lines:
            return 400, {"error": {"code": 400, "message": "the batch holds no requests",
                                   "status": GEMINI_STATUS[400]}}, None
        job = self._new_job("gemini", model, str(batch.get("displayName") or batch.get("display_name") or ""),
                            lines, kind)
        return 200, self._gemini_job(job), None

    def _gemini_get(self, job_id: str) -> Reply:
        job = self.jobs.get(job_id)
        if job is None or job.protocol != "gemini":
            return _not_found(job_id, "gemini")
        self._poll(job)
        return 200, self._gemini_job(job), None

    def _gemini_list(self) -> Reply:
        jobs = [self._gemini_job(j) for j in self.jobs.values() if j.protocol == "gemini"]
        return 200, ({"operations": jobs} if jobs else {}), None

    def _gemini_job(self, job: Job) -> dict:
        done = job.state in FINAL
        answered = len(job.output)
        failed = sum(1 for e in job.output if "error" in e)
        meta: dict = {"@type": "type.googleapis.com/google.ai.generativelanguage.v1beta.GenerateContentBatch",
                      "model": f"models/{job.model}", "displayName": job.display_name, "name": job.id,
                      "createTime": _rfc3339(job.created), "updateTime": _rfc3339(time.time()),
                      "state": GEMINI_STATES.get(job.state, "BATCH_STATE_RUNNING"),
                      "batchStats": {"requestCount": str(len(job.lines)),
                                     "successfulRequestCount": str(answered - failed),
                                     "failedRequestCount": str(failed),
                                     "pendingRequestCount": str(0 if done else len(job.lines))}}
        output = None
        if job.state in ("succeeded", "expired") and job.output:
            if job.source == "inline":
                output = {"inlinedResponses": {"inlinedResponses": job.output}}
            elif job.output_file_id:
                output = {"responsesFile": job.output_file_id}
        if output is not None:
            meta["output"] = output
        out: dict = {"name": job.id, "metadata": meta}
        if done:
            out["done"] = True
            if job.state == "failed":
                out["error"] = {"code": 13, "message": job.plan.message}
            elif output is not None:
                out["response"] = {"@type": "type.googleapis.com/google.ai.generativelanguage.v1beta."
                                            "GenerateContentBatchOutput", **output}
        return out

    def _gemini_upload(self, h, query: str, raw: bytes) -> Reply:
        """The resumable upload protocol: ``start`` opens a session (its URL in
        ``X-Goog-Upload-URL``), then ``upload[, finalize]`` chunks at offsets."""
        command = (h.headers.get("X-Goog-Upload-Command") or "").lower()
        if "start" in command:
            meta = json.loads(raw or b"{}").get("file") or {}
            upload_id = uuid.uuid4().hex
            self._uploads[upload_id] = {"meta": meta, "data": bytearray()}
            url = f"{self.fake.url}{urlsplit(h.path).path}?upload_id={upload_id}&upload_protocol=resumable"
            return 200, {}, {"X-Goog-Upload-URL": url, "X-Goog-Upload-Status": "active"}
        upload_id = (parse_qs(query).get("upload_id") or [""])[0]
        session = self._uploads.get(upload_id)
        if session is None:
            return 404, {"error": {"code": 404, "message": "no such upload", "status": "NOT_FOUND"}}, None
        offset = int(h.headers.get("X-Goog-Upload-Offset") or 0)
        if offset != len(session["data"]):
            return 400, {"error": {"code": 400, "message": "wrong offset", "status": "INVALID_ARGUMENT"}}, \
                {"X-Goog-Upload-Status": "active"}
        session["data"] += raw
        if "finalize" not in command:
            return 200, {}, {"X-Goog-Upload-Status": "active"}
        del self._uploads[upload_id]
        meta = session["meta"]
        name = meta.get("name") or "files/" + uuid.uuid4().hex[:16]
        self.files[name] = (meta.get("displayName", ""), bytes(session["data"]))
        file = {"name": name, "displayName": meta.get("displayName", ""), "mimeType": meta.get("mimeType", ""),
                "sizeBytes": str(len(session["data"])), "createTime": _rfc3339(time.time()),
                "updateTime": _rfc3339(time.time()), "state": "ACTIVE", "source": "UPLOADED",
                "uri": f"{self.fake.url}/v1/{name}"}
        return 200, {"file": file}, {"X-Goog-Upload-Status": "final"}

    # ------------------------------------------------------------------ OpenAI
    def _openai_file(self, h, raw: bytes) -> Reply:
        fields = _multipart(h.headers.get("Content-Type", ""), raw)
        if "file" not in fields:
            return 400, openai_error(400, "'file' is a required property"), None
        filename, data = fields["file"]
        purpose = fields.get("purpose", ("", b""))[1].decode()
        file_id = self._store(filename or "upload.jsonl", data)
        return 200, {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                     "filename": filename, "purpose": purpose, "status": "processed"}, None

    def _openai_create(self, raw: bytes) -> Reply:
        if self._create_failures:
            status, message = self._create_failures.popleft()
            return status, openai_error(status, message), None
        body = json.loads(raw or b"{}")
        file_id = body.get("input_file_id", "")
        if file_id not in self.files:
            return 404, openai_error(404, f"No such File object: {file_id}"), None
        if body.get("endpoint") != "/v1/chat/completions" or body.get("completion_window") != "24h":
            return 400, openai_error(400, "endpoint must be /v1/chat/completions, completion_window 24h"), None
        lines = []
        for text in self.files[file_id][1].decode().splitlines():
            if text.strip():
                line = json.loads(text)
                lines.append((str(line.get("custom_id")), line.get("body") or {}))
        job = self._new_job("openai", "", "", lines, "file")
        job.input_file_id = file_id
        job.metadata = body.get("metadata") or {}
        return 200, self._openai_job(job), None

    def _openai_get(self, job_id: str) -> Reply:
        job = self.jobs.get(job_id)
        if job is None or job.protocol != "openai":
            return _not_found(job_id, "openai")
        self._poll(job)
        return 200, self._openai_job(job), None

    def _openai_list(self) -> Reply:
        jobs = [self._openai_job(j) for j in self.jobs.values() if j.protocol == "openai"]
        return 200, {"object": "list", "data": jobs, "first_id": jobs[0]["id"] if jobs else None,
                     "last_id": jobs[-1]["id"] if jobs else None, "has_more": False}, None

    def _openai_job(self, job: Job) -> dict:
        failed = len([e for e in job.errors if e.get("response")])
        errors = None
        if job.state == "failed":
            errors = {"object": "list", "data": [{"code": "invalid_request", "message": job.plan.message,
                                                  "param": None, "line": None}]}
        return {"id": job.id, "object": "batch", "endpoint": "/v1/chat/completions", "errors": errors,
                "input_file_id": job.input_file_id, "completion_window": "24h",
                "status": OPENAI_STATES.get(job.state, job.state), "output_file_id": job.output_file_id or None,
                "error_file_id": job.error_file_id or None, "created_at": int(job.created),
                "request_counts": {"total": len(job.lines), "completed": len(job.output), "failed": failed},
                "metadata": job.metadata}


# --------------------------------------------------------------------------- wire shapes

def _gemini_entry(job: Job, key: str, *, response: dict | None = None, error: dict | None = None) -> dict:
    """An inline response (``metadata.key``) or a result-file line (``key``)."""
    entry: dict = {"response": response} if response is not None else {"error": error}
    if job.source == "inline":
        if not job.bare:
            entry["metadata"] = {"key": key}
    else:
        entry["key"] = key
    return entry


def _openai_line(key: str, response: dict | None, error: dict | None) -> dict:
    return {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": key, "response": response, "error": error}


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _from_genai(h, query: str) -> bool:
    """Whether a request on a route both protocols share came from a Gemini client."""
    q = parse_qs(query)
    return bool(h.headers.get("x-goog-api-key") or "key" in q or "pageSize" in q
                or "google-genai" in (h.headers.get("x-goog-api-client") or ""))


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _not_found(name: str, protocol: str) -> Reply:
    if protocol == "openai":
        return 404, openai_error(404, f"No batch or file found with id '{name}'."), None
    return 404, {"error": {"code": 404, "message": f"{name} not found", "status": "NOT_FOUND"}}, None


def _multipart(content_type: str, raw: bytes) -> dict[str, tuple[str, bytes]]:
    """``multipart/form-data`` fields as name -> (filename, bytes). Split on the boundary by hand:
    the email parser takes seconds over a job file of a hundred megabytes."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        return {}
    fields = {}
    for part in raw.split(b"--" + m.group(1).encode())[1:]:
        if part.startswith(b"--"):
            break  # the closing delimiter
        head, _, body = part.partition(b"\r\n\r\n")
        disposition = next((line for line in head.decode("utf-8", "replace").split("\r\n")
                            if line.lower().startswith("content-disposition")), "")
        name = re.search(r'[; ]name="([^"]*)"', disposition)
        filename = re.search(r'filename="([^"]*)"', disposition)
        if name:
            fields[name.group(1)] = (filename.group(1) if filename else "", body.removesuffix(b"\r\n"))
    return fields
