"""The one interface every VLM backend implements, what a call carries in and out, and the
finish-reason check every backend runs before anyone parses an answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from worker.errors import EmptyAnswer, PermanentClientError
from worker.images import ImagePayload


@dataclass(frozen=True)
class VLMRequest:
    """One call: an image and a prompt.

    ``step`` and ``hint`` carry the structured inputs the prompt was built from. Real models
    ignore them (they read the prompt); the offline teacher uses them instead of re-parsing text.

    ``response_schema`` (a JSON schema, object-rooted) asks for structured output where the
    API has it (Gemini ``response_json_schema``, OpenAI ``response_format`` json_schema);
    ``schema_name`` names it. ``max_tokens`` overrides the configured output budget for this
    call (budgets sized from the number of boxes, a retry after truncation).
    """

    image: ImagePayload
    prompt: str
    step: str = ""
    hint: dict = field(default_factory=dict)
    response_schema: dict | None = None
    schema_name: str = ""
    max_tokens: int | None = None


@dataclass(frozen=True)
class VLMResponse:
    """A model's answer and what the API said about it."""

    text: str
    model: str = ""
    finish_reason: str = ""
    truncated: bool = False
    usage: dict = field(default_factory=dict)
    #: The request quota the endpoint stated with this answer (requests per second; OpenAI's
    #: ``x-ratelimit-limit-requests``), None when it stated none. Read by the fleet budget.
    stated_rate: float | None = None


@runtime_checkable
class VLMClient(Protocol):
    """``generate(request) -> response``; raises the errors in ``worker.errors``.

    ``structured_output``: whether the client can send a response schema (Gemini's
    ``response_json_schema``, OpenAI's ``response_format``); wrappers pass their inner client's on.
    """

    name: str
    structured_output: bool

    def generate(self, request: VLMRequest) -> VLMResponse: ...


class TruncatedAnswer(EmptyAnswer):
    """The token limit cut the answer before it held any text (thinking can use it all up).

    Retryable; the step runner retries it once at once with a larger budget.
    """


class EmptyText(EmptyAnswer):
    """The model finished without text. ``finish_reason`` says how: after a clean stop, step 3
    reads it as "every box removed" (its prompt says to omit such lines)."""

    def __init__(self, message: str, *, finish_reason: str = ""):
        super().__init__(message)
        self.finish_reason = finish_reason


class BlockedAnswer(EmptyAnswer):
    """The provider withheld the answer: a blocked prompt, or a safety/recitation stop.

    Retryable as an ``EmptyAnswer`` (a new sample may pass); ``reason`` holds the API's word.
    """

    def __init__(self, message: str, *, reason: str = ""):
        super().__init__(message)
        self.reason = reason


class StructuredOutputRejected(PermanentClientError):
    """The endpoint refused a request carrying a response schema (an older server).

    The step runner then uses the text prompt for this endpoint from then on.
    """


# Finish reasons that mean "the model would not answer", as opposed to "it stopped early".
REFUSALS = frozenset({
    "SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY",
    "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION", "LANGUAGE", "MODEL_ARMOR", "content_filter",
})
TRUNCATIONS = frozenset({"MAX_TOKENS", "length", "max_tokens"})


def check_answer(name: str, text: str | None, finish_reason: str, block_reason: str = "") -> bool:
    """Raise when an answer must not be parsed; return whether it was cut by the token limit.

    Order matters: a blocked prompt or a refusal is reported as such even when some text came
    back (a safety stop mid-answer leaves a fragment we must not train on); an empty answer cut
    by the token limit is a ``TruncatedAnswer`` (the budget went to thinking); any other empty
    answer is an ``EmptyAnswer``. Non-empty truncated text is returned for the caller to use.
    """
    if block_reason:
        raise BlockedAnswer(f"{name}: the prompt was blocked (prompt_feedback.block_reason={block_reason})",
                            reason=block_reason)
    if finish_reason in REFUSALS:
        raise BlockedAnswer(f"{name}: the answer was withheld (finish_reason={finish_reason})",
                            reason=finish_reason)
    truncated = finish_reason in TRUNCATIONS
    if not (text or "").strip():
        if truncated:
            raise TruncatedAnswer(f"{name}: empty answer, cut by the token limit (finish_reason={finish_reason})")
        raise EmptyText(f"{name}: empty answer (finish_reason={finish_reason or 'none'})", finish_reason=finish_reason)
    return truncated
