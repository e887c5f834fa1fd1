"""Batch mode's two stand-in clients, and how a request and an answer are kept on disk.

A step in batch mode runs exactly as online (``worker.steps.run_step``: prompt, schema, image
downscale, token budget), with one of two clients in place of the online one:

- ``ParkingClient`` raises ``Parked`` carrying the request the conversation built, instead of
  calling: the task parks it in the ledger (``worker/ledger.py``) and lets its message go.
- ``AnswerClient`` answers the conversation's first call with the provider's answer from a
  finished job (or raises the error the provider gave for that request, which the task layer
  retries or records as any online error), and sends every later call of the conversation (a
  re-ask about missing ids, the retry of a truncated answer, the text fallback after a refused
  schema) online: they are few, and waiting a day for each would hold the image for days.

Nothing here imports Celery or Redis.
"""

from __future__ import annotations

from collections.abc import Callable

from worker.clients.base import (
    BlockedAnswer,
    EmptyText,
    StructuredOutputRejected,
    TruncatedAnswer,
    VLMClient,
    VLMRequest,
    VLMResponse,
)
from worker.errors import (
    ClientError,
    ConfigError,
    EmptyAnswer,
    InputError,
    ParseError,
    PermanentClientError,
    PipelineError,
    RateLimited,
)
from worker.images import ImagePayload


class Parked(Exception):
    """The conversation's first request, built and not sent: it goes into a batch job."""

    def __init__(self, request: VLMRequest):
        super().__init__(f"parked for a batch job: {request.step}")
        self.request = request


class BatchJobFailed(ClientError):
    """The provider job holding this request failed, expired or was cancelled as a whole: the
    request is retried like any transient error (parked again, into a new job), and after
    ``vlm.max_retries`` the image-step is recorded as failed."""


class ParkingClient:
    """Raises ``Parked`` for the first call. ``structured_output`` is the online client's, so the
    request is the one an online call would have sent."""

    def __init__(self, online: VLMClient):
        self.name = online.name
        self.structured_output = bool(getattr(online, "structured_output", False))

    def generate(self, request: VLMRequest) -> VLMResponse:
        raise Parked(request)


class AnswerClient:
    """The first call gets ``answer`` (a response, or the request's error, raised); later calls
    go to ``online``. ``used_batch`` holds the batch response once given (its tokens are billed
    at batch prices)."""

    def __init__(self, answer: VLMResponse | Exception, online: VLMClient):
        self.answer, self.online = answer, online
        self.name = online.name
        self.structured_output = bool(getattr(online, "structured_output", False))
        self.first = True
        self.used_batch: VLMResponse | None = None

    def generate(self, request: VLMRequest) -> VLMResponse:
        if not self.first:
            return self.online.generate(request)
        self.first = False
        if isinstance(self.answer, Exception):
            raise self.answer
        self.used_batch = self.answer
        return self.answer


# ------------------------------------------------------------------------- on disk (JSON)


def request_to_json(request: VLMRequest) -> dict:
    """A request without its image bytes: the image is read again (from the image cache when it
    was converted) when the job is submitted, so the ledger holds prompts, not pictures."""
    img = request.image
    return {"prompt": request.prompt, "step": request.step, "hint": request.hint,
            "response_schema": request.response_schema, "schema_name": request.schema_name,
            "max_tokens": request.max_tokens,
            "image": {"path": img.path, "width": img.width, "height": img.height}}


def request_from_json(data: dict, load: Callable[[str], ImagePayload]) -> VLMRequest:
    """The request again, its image read by ``load(path)``; ``InputError`` when the image is no
    longer the size it was when the request was built (replaced since)."""
    img = data["image"]
    payload = load(img["path"])
    if (payload.width, payload.height) != (img["width"], img["height"]):
        raise InputError(f"{img['path']}: the image is {payload.width}x{payload.height} now but was "
                         f"{img['width']}x{img['height']} when its request was parked (replaced since?)")
    return VLMRequest(image=payload, prompt=data["prompt"], step=data["step"], hint=data.get("hint") or {},
                      response_schema=data.get("response_schema"), schema_name=data.get("schema_name") or "",
                      max_tokens=data.get("max_tokens"))


#: The errors an answer may carry, by name (anything else comes back as a ``ClientError``).
_ERRORS: dict[str, type[Exception]] = {c.__name__: c for c in (
    ClientError, RateLimited, EmptyAnswer, PermanentClientError, ParseError, InputError, ConfigError,
    BlockedAnswer, TruncatedAnswer, EmptyText, StructuredOutputRejected, BatchJobFailed)}


def answer_to_json(answer: VLMResponse | Exception) -> dict:
    if isinstance(answer, VLMResponse):
        return {"text": answer.text, "model": answer.model, "finish_reason": answer.finish_reason,
                "truncated": answer.truncated, "usage": answer.usage}
    out: dict = {"error": type(answer).__name__, "message": str(answer)[:4000]}
    for attr in ("retry_after", "status", "reason", "finish_reason", "raw"):
        value = getattr(answer, attr, None)
        if value not in (None, ""):
            out[attr] = value
    return out


def answer_from_json(data: dict) -> VLMResponse | Exception:
    if "error" not in data:
        return VLMResponse(text=data.get("text") or "", model=data.get("model") or "",
                           finish_reason=data.get("finish_reason") or "", truncated=bool(data.get("truncated")),
                           usage=data.get("usage") or {})
    cls = _ERRORS.get(data["error"], ClientError)
    msg = data.get("message", "")
    exc: PipelineError
    if issubclass(cls, BlockedAnswer):
        exc = cls(msg, reason=data.get("reason", ""))
    elif issubclass(cls, EmptyText):
        exc = cls(msg, finish_reason=data.get("finish_reason", ""))
    elif issubclass(cls, ClientError):
        exc = cls(msg, retry_after=data.get("retry_after"), status=data.get("status"))
    elif issubclass(cls, PermanentClientError):
        exc = cls(msg, status=data.get("status"))
    elif issubclass(cls, ParseError):
        exc = cls(msg, raw=data.get("raw", ""))
    else:
        exc = cls(msg)
    return exc
