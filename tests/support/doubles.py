"""Test doubles for the pure step layer (no HTTP): a client that answers with canned text."""

from __future__ import annotations

from worker.clients.base import VLMRequest, VLMResponse


class FakeClient:
    """Answers every call with ``text`` and records the requests (a ``VLMClient``)."""

    name = "fake"

    def __init__(self, text: str = ""):
        self.text = text
        self.requests: list[VLMRequest] = []

    def generate(self, request: VLMRequest) -> VLMResponse:
        self.requests.append(request)
        return VLMResponse(text=self.text)
