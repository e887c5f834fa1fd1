"""The error tree every layer speaks.

The task layer only needs to know one thing about an error: can trying again help? Retryable
errors (rate limits, 5xx, timeouts, unparseable answers) are re-scheduled; everything in
``PERMANENT`` fails the image-step at once and is recorded in ``failures.jsonl``.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Root of every error refexp raises on purpose."""


class ConfigError(PipelineError, ValueError):
    """A spec, an override or a path the user gave is wrong. Raised before any work starts."""


class InputError(PipelineError):
    """One image or label file cannot be used (unreadable, too large, malformed)."""


class ClientError(PipelineError):
    """A VLM call failed in a way that trying again may fix (429, 5xx, timeout, connection).

    ``stated_rate``: the request quota the endpoint stated with the error, in requests per second
    (OpenAI's ``x-ratelimit-limit-requests``, Gemini's ``QuotaFailure``); the fleet budget
    enforces it (``vlm.max_concurrency: auto``)."""

    def __init__(self, message: str, *, retry_after: float | None = None, status: int | None = None,
                 stated_rate: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status
        self.stated_rate = stated_rate


class RateLimited(ClientError):
    """HTTP 429 / RESOURCE_EXHAUSTED; ``retry_after`` holds the server's hint when it gave one."""


class TimedOut(ClientError):
    """No answer within the client's timeout. The server may still be working on the call: the
    fleet budget keeps its slot for a while and counts it as a sign of overload."""


class EmptyAnswer(ClientError):
    """The model returned no text (blocked, empty candidates); a new sample may succeed."""


class PermanentClientError(PipelineError):
    """A VLM call that will fail the same way every time: bad request, auth, unknown model."""

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.status = status


class ParseError(PipelineError):
    """The answer held nothing we could use. Retried (a new sample often parses); raw text kept."""

    def __init__(self, message: str, *, raw: str = ""):
        super().__init__(message)
        self.raw = raw


PERMANENT: tuple[type[Exception], ...] = (ConfigError, InputError, PermanentClientError)
RETRYABLE: tuple[type[Exception], ...] = (ClientError, ParseError)
