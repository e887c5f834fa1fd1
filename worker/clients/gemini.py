"""Gemini through the official ``google-genai`` SDK.

Why the SDK and not raw HTTP: it tracks the wire format (camelCase fields, media resolution,
continuation) as Google changes it. What we add: the key from the worker's environment, the
SDK's own retries switched off (the task layer owns retries, honouring Retry-After across the
fleet), and every failure mapped onto ``worker.errors`` so the task layer knows whether trying
again can help. One client per process is shared by all threads (the SDK's httpx pool is
thread-safe); ``worker.clients.factory`` caches it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager

from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from worker import settings
from worker.clients.base import VLMRequest, VLMResponse, check_answer
from worker.clients.replies import Endpoint, map_status, not_the_api, retry_after_from_headers, strip_thinking
from worker.errors import ClientError, ConfigError, PermanentClientError, TimedOut
from worker.spec import GeminiSpec

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
KEY_ENV = settings.API_KEY_VARS["gemini"]
_RETRYABLE_4XX = frozenset({408, 409, 425, 499})
_VERSION = re.compile(r"gemini-(\d+(?:\.\d+)?)")


def _transport_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(timeouts, other transport failures) of whichever httpx flavour the SDK runs on."""
    timeouts, transport = [], []
    for name in ("httpx2", "httpx"):
        try:
            mod = __import__(name)
        except ImportError:
            continue
        timeouts.append(mod.TimeoutException)
        transport.append(mod.TransportError)
    return tuple(timeouts), tuple(transport)


_TIMEOUTS, _TRANSPORT = _transport_errors()


def resolve_key(spec: GeminiSpec) -> str:
    """GOOGLE_API_KEY, then GEMINI_API_KEY (the SDK's own order), then ``vlm.gemini.api_key``; each
    variable may instead name a file holding the key (``GOOGLE_API_KEY_FILE``, a mounted secret)."""
    for var in KEY_ENV:
        value = settings.secret(var)
        if value:
            return value
    return spec.api_key


def media_resolution(value: str) -> types.MediaResolution | None:
    """The spec's value as the SDK enum; empty means "let the server choose"."""
    if not value:
        return None
    name = value.strip().upper()
    if not name.startswith("MEDIA_RESOLUTION_"):
        name = "MEDIA_RESOLUTION_" + name
    if name not in types.MediaResolution.__members__:
        valid = ", ".join(types.MediaResolution.__members__)
        raise ConfigError(f"vlm.gemini.media_resolution = {value!r} is not one of: {valid}")
    return types.MediaResolution[name]


def thinking_config(model: str, budget: int | None) -> types.ThinkingConfig | None:
    """What to send about thinking: ``vlm.gemini.thinking_budget`` when set, else the least the
    model allows — Google advises thinking off for boxes, and thinking tokens count against
    ``max_output_tokens``.

    ========================  ===============================================
    model                     auto (``thinking_budget: null``)
    ========================  ===============================================
    gemini-2.5 flash / lite   ``thinking_budget=0`` (off)
    gemini-2.5 pro            nothing (it cannot be switched off)
    gemini-3+ flash / lite    ``thinking_level=MINIMAL``
    gemini-3+ pro             ``thinking_level=LOW`` (its least)
    older or unknown names    nothing
    ========================  ===============================================
    """
    if budget is not None:
        return types.ThinkingConfig(thinking_budget=budget)
    name = (model or "").lower()
    m = _VERSION.search(name)
    if not m:
        return None
    version = float(m.group(1))
    if version >= 3:
        level = types.ThinkingLevel.LOW if "pro" in name else types.ThinkingLevel.MINIMAL
        return types.ThinkingConfig(thinking_level=level)
    if version >= 2.5 and "pro" not in name:
        return types.ThinkingConfig(thinking_budget=0)
    return None


def retry_after_seconds(headers, details=None) -> float | None:
    """The server's wait hint: ``Retry-After`` (seconds or HTTP date), else a RetryInfo detail."""
    from_headers = retry_after_from_headers(headers)
    if from_headers is not None:
        return from_headers
    error = details.get("error", details) if isinstance(details, dict) else {}
    for d in error.get("details") or []:
        delay = d.get("retryDelay") if isinstance(d, dict) else None
        if isinstance(delay, str) and delay.endswith("s"):
            try:
                return max(0.0, float(delay[:-1]))
            except ValueError:
                pass
    return None


#: Gemini's quota ids name their window (``GenerateRequestsPerMinutePerProjectPerModel``):
#: seconds per window. A daily quota is not a rate to keep to: its 429 pauses the fleet for the
#: stated Retry-After instead.
_QUOTA_WINDOWS = (("PerSecond", 1.0), ("PerMinute", 60.0))


def stated_rate_from_details(details) -> float | None:
    """The request quota a Gemini 429 states, in requests per second: the lowest of its
    ``google.rpc.QuotaFailure`` violations whose quota id counts requests per second or minute
    (``quotaValue`` in that window). None when the body names none."""
    error = details.get("error", details) if isinstance(details, dict) else {}
    rates = []
    for d in error.get("details") or []:
        if not isinstance(d, dict) or not str(d.get("@type", "")).endswith("google.rpc.QuotaFailure"):
            continue
        for v in d.get("violations") or []:
            quota_id = str(v.get("quotaId", "")) if isinstance(v, dict) else ""
            if "Request" not in quota_id:
                continue  # input tokens per minute: not a request rate
            window = next((w for name, w in _QUOTA_WINDOWS if name in quota_id), None)
            try:
                value = float(v.get("quotaValue"))
            except (TypeError, ValueError):
                continue
            if window and value > 0:
                rates.append(value / window)
    return min(rates) if rates else None


def _error_reasons(details) -> set[str]:
    error = details.get("error", details) if isinstance(details, dict) else {}
    return {d.get("reason", "") for d in error.get("details") or [] if isinstance(d, dict)}


class GeminiClient:
    """``VLMClient`` for Google's Gemini API (or anything speaking it at ``spec.base_url``)."""

    def __init__(self, spec: GeminiSpec):
        key = resolve_key(spec)
        if not key:
            raise PermanentClientError(
                "GOOGLE_API_KEY is not set on this worker (nor GOOGLE_API_KEY_FILE, GEMINI_API_KEY(_FILE) or "
                "vlm.gemini.api_key): export it in the worker's environment, or point GOOGLE_API_KEY_FILE at a "
                "file holding it"
            )
        self.spec = spec
        self.model = spec.model
        self.name = f"gemini:{spec.model}"
        self.base_url = (spec.base_url or DEFAULT_BASE_URL).rstrip("/")
        self._key = key
        self._resolution = media_resolution(spec.media_resolution)
        self._thinking = thinking_config(spec.model, getattr(spec, "thinking_budget", None))
        self.structured_output = True  # Gemini has response_json_schema
        self._client = genai.Client(
            vertexai=False,  # an inherited GOOGLE_GENAI_USE_VERTEXAI must not reroute us
            api_key=key,
            http_options=types.HttpOptions(
                base_url=spec.base_url or None,
                timeout=max(1, round(spec.timeout * 1000)),  # the SDK takes milliseconds
                retry_options=types.HttpRetryOptions(attempts=1),  # one attempt: retries are ours
            ),
        )

    def _config(self, request: VLMRequest | None = None) -> types.GenerateContentConfig:
        extra: dict = {}
        if request is not None and request.response_schema is not None:
            extra = {"response_mime_type": "application/json", "response_json_schema": request.response_schema}
        return types.GenerateContentConfig(
            temperature=self.spec.temperature,
            max_output_tokens=(request.max_tokens if request is not None and request.max_tokens
                               else self.spec.max_output_tokens),
            media_resolution=self._resolution,
            thinking_config=self._thinking,
            automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
            **extra,
        )

    def contents(self, request: VLMRequest) -> list[types.Content]:
        """The one user turn: the image first, then the prompt (online and batch calls alike)."""
        return [types.Content(role="user", parts=[
            types.Part.from_bytes(data=request.image.data, mime_type=request.image.mime),
            types.Part.from_text(text=request.prompt),
        ])]

    def generate(self, request: VLMRequest) -> VLMResponse:
        with self.sdk_errors(schema=request.response_schema is not None):
            resp = self._client.models.generate_content(
                model=self.model, contents=self.contents(request), config=self._config(request))
        return self._response(resp)

    @contextmanager
    def sdk_errors(self, *, schema: bool = False, expected: str = "a generateContent response") -> Iterator[None]:
        """Turn whatever the SDK raises inside the block into ``worker.errors`` (keys redacted)."""
        try:
            yield
        except genai_errors.APIError as exc:
            raise self._map_status(exc, schema=schema) from exc
        except _TIMEOUTS as exc:
            raise TimedOut(f"{self.name}: no answer from {self.base_url} within {self.spec.timeout:g}s "
                              f"({type(exc).__name__})") from exc
        except _TRANSPORT as exc:
            raise ClientError(f"{self.name}: cannot reach {self.base_url}: "
                              f"{self._redact(str(exc)) or type(exc).__name__}") from exc
        except json.JSONDecodeError as exc:  # the SDK parses every 200 body as JSON
            raise not_the_api(
                Endpoint(self.name, self.base_url, self.model, "GOOGLE_API_KEY"), self._redact(exc.doc),
                expected=expected,
                hint="vlm.gemini.base_url is the API root, e.g. https://generativelanguage.googleapis.com, "
                     "without /v1beta") from exc

    def _response(self, resp: types.GenerateContentResponse) -> VLMResponse:
        cand = resp.candidates[0] if resp.candidates else None
        finish = getattr(cand.finish_reason, "value", cand.finish_reason) if cand else None
        finish = str(finish or "")
        parts = (cand.content.parts or []) if cand and cand.content else []
        text = strip_thinking("".join(p.text for p in parts if p.text and not p.thought))
        um = resp.usage_metadata
        usage = {}
        if um is not None:
            usage = {"input_tokens": um.prompt_token_count or 0,
                     "output_tokens": um.candidates_token_count or 0,
                     "total_tokens": um.total_token_count or 0}
            if um.thoughts_token_count:
                usage["thinking_tokens"] = um.thoughts_token_count
        block = resp.prompt_feedback.block_reason if resp.prompt_feedback else None
        block = str(getattr(block, "value", block) or "") if block else ""
        truncated = check_answer(self.name, text, finish, block)
        return VLMResponse(text=text, model=resp.model_version or self.model, finish_reason=finish,
                           truncated=truncated, usage=usage)

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _map_status(self, exc: genai_errors.APIError, *, schema: bool = False) -> Exception:
        code = int(exc.code or 0)
        headers = getattr(getattr(exc, "response", None), "headers", None)
        return map_status(
            Endpoint(self.name, self.base_url, self.model, "GOOGLE_API_KEY", _RETRYABLE_4XX), code,
            self._redact(str(exc.message or exc.status or ""))[:500], status_text=str(exc.status or ""),
            retry_after=retry_after_seconds(headers, exc.details) if code == 429 else None,
            stated_rate=stated_rate_from_details(exc.details) if code == 429 else None,
            auth=code == 400 and "API_KEY_INVALID" in _error_reasons(exc.details), schema=schema)
