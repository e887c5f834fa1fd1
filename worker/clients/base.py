"""The one interface every VLM backend implements, and what a call carries in and out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from worker.images import ImagePayload


@dataclass(frozen=True)
class VLMRequest:
    """One call: an image and a prompt.

    ``step`` and ``hint`` carry the structured inputs the prompt was built from. Real models
    ignore them (they read the prompt); the offline teacher uses them instead of re-parsing text.
    """

    image: ImagePayload
    prompt: str
    step: str = ""
    hint: dict = field(default_factory=dict)


@dataclass(frozen=True)
class VLMResponse:
    """A model's answer and what the API said about it."""

    text: str
    model: str = ""
    finish_reason: str = ""
    truncated: bool = False
    usage: dict = field(default_factory=dict)


@runtime_checkable
class VLMClient(Protocol):
    """``generate(request) -> response``; raises the errors in ``worker.errors``."""

    name: str

    def generate(self, request: VLMRequest) -> VLMResponse: ...
