"""OpenAI-compatible chat completions (NVIDIA NIM, vLLM, OpenAI) through the official SDK.

Why the SDK: it is what every compatible server is tested against. What we add: the key from
the worker's environment (a self-hosted server without auth works with no key at all), the
SDK's retries switched off (the task layer owns retries and honours Retry-After across the
fleet), and every failure mapped onto ``worker.errors``. One client per process is shared by
all threads (the SDK's httpx pool is thread-safe); ``worker.clients.factory`` caches it.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import openai

from worker import settings
from worker.clients.base import VLMRequest, VLMResponse, check_answer
from worker.clients.replies import (
    Endpoint,
    map_status,
    not_the_api,
    retry_after_from_headers,
    stated_rate_from_headers,
    strip_thinking,
)
from worker.errors import ClientError, EmptyAnswer, PermanentClientError, TimedOut
from worker.spec import OpenAISpec

DEFAULT_BASE_URL = "https://api.openai.com/v1"
KEY_ENV = settings.API_KEY_VARS["openai"]
# Hosted endpoints that always need a key: without one we fail at start, not on every image.
KEYED_HOSTS = {"api.openai.com": "OPENAI_API_KEY", "integrate.api.nvidia.com": "NVIDIA_API_KEY"}
# The SDK refuses to build a client without a key; self-hosted servers (vLLM, TGI, llama.cpp)
# started without --api-key ignore the header, and "EMPTY" is the value vLLM's docs use.
NO_KEY_PLACEHOLDER = "EMPTY"


def strict(schema: dict) -> dict:
    """A JSON schema with ``additionalProperties: false`` on every object (OpenAI strict mode)."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if out.get("type") == "object":
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def resolve_key(spec: OpenAISpec) -> str:
    """OPENAI_API_KEY, then NVIDIA_API_KEY, then ``vlm.openai.api_key``; "" when none is set. Each
    variable may instead name a file holding the key (``OPENAI_API_KEY_FILE``, a mounted secret)."""
    for var in KEY_ENV:
        value = settings.secret(var)
        if value:
            return value
    return spec.api_key


class OpenAICompatClient:
    """``VLMClient`` for any server implementing ``POST {base_url}/chat/completions``."""

    def __init__(self, spec: OpenAISpec):
        self.spec = spec
        self.model = spec.model_name
        self.name = f"openai:{spec.model_name}"
        self.base_url = (spec.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        key = resolve_key(spec)
        if not key:
            host = (urlsplit(self.base_url).hostname or "").lower()
            if host in KEYED_HOSTS:
                raise PermanentClientError(
                    f"{KEYED_HOSTS[host]} is not set on this worker (nor OPENAI_API_KEY/NVIDIA_API_KEY, their "
                    f"*_FILE variables naming a file that holds the key, or vlm.openai.api_key), and "
                    f"{self.base_url} requires a key"
                )
            key = NO_KEY_PLACEHOLDER
        self._key = key
        self.structured_output = True  # until the endpoint says otherwise (see worker.steps.converse)
        self._client = openai.OpenAI(base_url=spec.base_url or None, api_key=key, timeout=spec.timeout,
                                     max_retries=0)

    def body(self, request: VLMRequest) -> dict:
        """The chat-completions body for one request: what ``generate`` sends, and what a batch
        job's line carries as its ``body``, so the two never drift apart."""
        b64 = base64.b64encode(request.image.data).decode("ascii")
        content = [{"type": "image_url", "image_url": {"url": f"data:{request.image.mime};base64,{b64}"}},
                   {"type": "text", "text": request.prompt}]
        body: dict = {"model": self.model, "messages": [{"role": "user", "content": content}],
                      "temperature": self.spec.temperature,
                      "max_tokens": request.max_tokens or self.spec.max_tokens}
        if request.response_schema is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": request.schema_name or "answer", "schema": strict(request.response_schema), "strict": True}}
        return body

    def generate(self, request: VLMRequest) -> VLMResponse:
        # The raw response: its headers state the endpoint's request quota (OpenAI's
        # x-ratelimit-*), which the fleet budget enforces before any 429 (``auto``).
        with self.sdk_errors(schema=request.response_schema is not None):
            raw = self._client.chat.completions.with_raw_response.create(**self.body(request))
            resp = raw.parse()
        if isinstance(resp, str):  # the SDK hands back the text of a body that is not JSON
            raise self._not_the_api(resp)
        out = self._response(resp)
        rate = stated_rate_from_headers(raw.headers)
        return dataclasses.replace(out, stated_rate=rate) if rate else out

    @contextmanager
    def sdk_errors(self, *, schema: bool = False, expected: str = "a chat completion") -> Iterator[None]:
        """Turn whatever the SDK raises inside the block into ``worker.errors`` (keys redacted)."""
        try:
            yield
        except openai.APIStatusError as exc:
            raise self._map_status(exc, schema=schema) from exc
        except openai.APITimeoutError as exc:
            raise TimedOut(
                f"{self.name}: no answer from {self.base_url} within {self.spec.timeout:g}s") from exc
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc
            raise ClientError(f"{self.name}: cannot reach {self.base_url}: "
                              f"{self._redact(str(cause)) or type(cause).__name__}") from exc
        except json.JSONDecodeError as exc:  # a JSON content type over a body that is not JSON
            raise self._not_the_api(exc.doc, expected=expected) from exc

    def _not_the_api(self, body: str, *, expected: str = "a chat completion") -> PermanentClientError:
        return not_the_api(self._endpoint(), self._redact(body), expected=expected,
                           hint="an OpenAI-compatible base_url ends in /v1, e.g. http://host:8000/v1")

    def _endpoint(self) -> Endpoint:
        return Endpoint(self.name, self.base_url, self.model, "OPENAI_API_KEY/NVIDIA_API_KEY")

    def _response(self, resp) -> VLMResponse:
        choices = getattr(resp, "choices", None) or []
        if not choices:
            raise EmptyAnswer(f"{self.name}: the answer holds no choices")
        choice = choices[0]
        finish = str(choice.finish_reason or "")
        raw = choice.message.content if choice.message is not None else None
        text = strip_thinking(raw)
        refusal = getattr(choice.message, "refusal", None) if choice.message is not None else None
        truncated = check_answer(self.name, text, "content_filter" if refusal and not text else finish)
        usage = {}
        if resp.usage is not None:
            usage = {"input_tokens": resp.usage.prompt_tokens or 0,
                     "output_tokens": resp.usage.completion_tokens or 0,
                     "total_tokens": resp.usage.total_tokens or 0}
        return VLMResponse(text=text, model=resp.model or self.model, finish_reason=finish,
                           truncated=truncated, usage=usage)

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _detail(self, exc: openai.APIStatusError) -> str:
        body = exc.body
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            body = body["error"]  # servers that do not unwrap it the way the SDK expects
        msg = body.get("message") if isinstance(body, dict) else None
        return self._redact(str(msg or exc.message))[:500]

    def _map_status(self, exc: openai.APIStatusError, *, schema: bool = False) -> Exception:
        code = exc.status_code
        headers = exc.response.headers
        return map_status(
            self._endpoint(), code, self._detail(exc),
            retry_after=retry_after_from_headers(headers) if code == 429 else None, schema=schema,
            stated_rate=stated_rate_from_headers(headers) if code == 429 else None)
