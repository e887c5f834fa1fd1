"""Provider batch mode: the interface a backend's batch API is driven through.

Why a separate interface from ``VLMClient``: a batch job answers within hours, so nothing may
block on it. Requests are submitted as a job, the job is polled, and its answers come back keyed
by the caller's request keys; every answer then goes through the same checks (``check_answer``)
and parsing as an online call's. Implementations: Gemini Batch Mode (``client.batches``, inline
requests or an uploaded JSONL file), OpenAI's Batch API (``client.files`` + ``client.batches``),
and the offline teacher (answers at once, for demos and tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from worker.clients.base import VLMRequest, VLMResponse
from worker.errors import ConfigError, PipelineError

JobState = Literal["pending", "running", "succeeded", "failed", "expired", "cancelled"]
FINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "expired", "cancelled"})


class BatchUnsupported(ConfigError):
    """The endpoint has no batch API (vLLM, NIM, ...): ``vlm.batch`` must be off for it."""


@dataclass(frozen=True)
class BatchItem:
    """One request of a job; ``key`` is the caller's (unique within the job) and comes back with
    its answer."""

    key: str
    request: VLMRequest


@dataclass(frozen=True)
class JobStatus:
    """What the provider says about a job. ``counts``: provider request counts when it gives them
    (e.g. {"total": 10, "succeeded": 7, "failed": 1}); ``error``: its message for a failed job."""

    state: JobState
    counts: dict = field(default_factory=dict)
    error: str = ""

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


@runtime_checkable
class BatchBackend(Protocol):
    """A backend's batch API.

    ``results`` yields ``(key, answer)`` for every request of a finished job, where ``answer`` is
    a ``VLMResponse`` (already through ``check_answer``) or the exception an online call would
    have raised for that request (``worker.errors``: ``RateLimited``, ``BlockedAnswer``,
    ``TruncatedAnswer``, ``PermanentClientError``, ...), so per-request failures are retried the
    normal way. A key of the job missing from the provider's output is yielded as a
    ``ClientError``: nothing is silently dropped.
    """

    name: str

    def probe(self) -> None:
        """Raise ``BatchUnsupported`` (with what to change) when the endpoint has no batch API."""

    def submit(self, items: Sequence[BatchItem], *, display_name: str) -> str:
        """Submit one job; return the provider's job id (kept in the ledger)."""

    def status(self, job_id: str) -> JobStatus: ...

    def results(self, job_id: str, *, expected_keys: Iterable[str] | None = None
                ) -> Iterator[tuple[str, VLMResponse | Exception]]:
        """Every request's answer; with ``expected_keys`` (the job's keys, from the caller's
        ledger) a key the output lacks is yielded as a ``ClientError``, and output lines under
        keys not asked for are left out."""

    def cancel(self, job_id: str) -> None: ...

    def find(self, display_name: str) -> str | None:
        """The id of a job this key submitted under ``display_name``, if the provider lists one
        among its recent jobs: how a coordinator that died between the provider accepting a job
        and the ledger recording its id is caught up without sending the job again."""


def check_items(items: Sequence[BatchItem]) -> None:
    """A job holds at least one request and no key twice (answers come back by key)."""
    if not items:
        raise ValueError("a batch job needs at least one request")
    keys = [item.key for item in items]
    if len(set(keys)) != len(keys):
        raise ValueError("the keys of a batch job's requests must be unique")


#: The key a batch backend is built with where there is none (the producer, which only probes:
#: keys live on the workers). Never a real key; a provider answers it with an auth error.
NO_KEY = "refexp-no-key"
#: How many of a key's most recent jobs ``find`` looks through (a job lost mid-submit is recent).
FIND_LIMIT = 500
#: What an endpoint's batch route answers a keyless probe with when the route exists.
KEYLESS_PROBE_ANSWERS = frozenset({400, 401, 403})


def probe_listing(backend: Any, list_one: Callable[[], object], *, expected: str, asked: str) -> None:
    """``BatchBackend.probe`` by listing one job through the backend's SDK client: a 404 (405,
    501) is an endpoint without a batch API (vLLM, NIM); without a key (the producer) an auth
    error is the answer of a route that exists, since the workers' key is checked when they
    submit. ``asked`` names the request in the message (``GET /batches``)."""
    try:
        with backend.sdk_errors(expected=expected):
            list_one()
    except PipelineError as exc:
        status = getattr(exc, "status", None)
        if status in (404, 405, 501):
            raise BatchUnsupported(
                f"{backend.name}: {backend.base_url} has no batch API ({asked} answered HTTP {status}; vLLM and "
                "NIM have none): set vlm.batch off for this endpoint") from exc
        if backend._no_key is not None and status in KEYLESS_PROBE_ANSWERS:
            return
        raise
