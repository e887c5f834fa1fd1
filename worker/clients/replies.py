"""How every HTTP backend reads an endpoint's replies: the server's wait hint, reasoning tags, and one mapping of an
HTTP status onto ``worker.errors`` (with messages that say what to fix, and no key in them)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from worker.clients.base import StructuredOutputRejected
from worker.errors import ClientError, PermanentClientError, RateLimited

THINK = re.compile(r"<think>.*?</think>", re.S)
_HTML = re.compile(r"<\s*(?:!doctype\s+html|html|head|body|title)\b", re.I)
_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.I | re.S)


def strip_thinking(text: str | None) -> str:
    """The answer without ``<think>...</think>`` blocks some reasoning models emit."""
    return THINK.sub("", text or "").strip()


def retry_after_from_headers(headers) -> float | None:
    """``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date), in seconds."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


#: A Go-style duration, as ``x-ratelimit-reset-requests`` gives it: "1s", "6m0s", "2m59.56s", "120ms".
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _duration_seconds(text: str) -> float | None:
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        return None
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def stated_rate_from_headers(headers) -> float | None:
    """The request quota an OpenAI-style endpoint states on every reply, in requests per second:
    ``x-ratelimit-limit-requests`` is the requests allowed per minute (OpenAI's RPM; the header
    names no window, and OpenAI's documented request limits are per minute). None when absent,
    unreadable or not positive (a server without a quota), and when the reply shows the limit is
    not a minute's: ``x-ratelimit-reset-requests`` past a minute means a longer window (some
    OpenAI-compatible providers state a per-day limit in the same header); the fleet then learns
    the rate from the endpoint's 429s instead."""
    if headers is None:
        return None
    value = headers.get("x-ratelimit-limit-requests")
    if not value:
        return None
    try:
        limit = float(value)
    except ValueError:
        return None
    reset = _duration_seconds(headers.get("x-ratelimit-reset-requests") or "")
    if reset is not None and reset > 61.0:
        return None
    return limit / 60.0 if limit > 0 else None


@dataclass(frozen=True)
class Endpoint:
    """Who answered, for messages: the client's name, its base URL, the model and the key hint."""

    name: str
    base_url: str
    model: str
    key_env: str  # e.g. "GOOGLE_API_KEY" or "OPENAI_API_KEY/NVIDIA_API_KEY"
    retryable_4xx: frozenset[int] = frozenset({408, 409, 425})


def map_status(ep: Endpoint, code: int, detail: str, *, status_text: str = "", retry_after: float | None = None,
               auth: bool = False, schema: bool = False, stated_rate: float | None = None) -> Exception:
    """An HTTP error as ``RateLimited`` / ``ClientError`` (retry) or ``PermanentClientError`` (fix
    something first); ``auth`` marks a rejected key that did not come as 401/403; ``stated_rate``
    is the request quota the reply stated (requests per second), passed on with a 429."""
    http = f"HTTP {code}{' ' + status_text if status_text else ''}"
    if code == 429:
        return RateLimited(f"{ep.name}: rate limited by {ep.base_url} ({http}): {detail}",
                           retry_after=retry_after, status=429, stated_rate=stated_rate)
    if auth or code in (401, 403):
        return PermanentClientError(f"the API key was rejected by {ep.base_url} ({http}: {detail}): "
                                    f"check {ep.key_env} on this worker", status=code)
    if code == 404:
        return PermanentClientError(f"model '{ep.model}' not found at {ep.base_url} ({detail})", status=404)
    if code >= 500 or code in ep.retryable_4xx:
        return ClientError(f"{ep.name}: {ep.base_url} answered {http}: {detail}", status=code)
    if code in (400, 422) and schema:
        return StructuredOutputRejected(
            f"the endpoint rejected the request with a response schema: {detail} ({http})", status=code)
    if code == 400:
        return PermanentClientError(f"the endpoint rejected the request: {detail} ({http})", status=400)
    return PermanentClientError(f"{ep.name}: {ep.base_url} answered {http}: {detail}", status=code)


#: The request fields a server names when it refuses a response schema (OpenAI ``response_format``
#: json_schema, Gemini ``responseJsonSchema`` / ``response_schema``).
SCHEMA_FIELDS = re.compile(r"response_?(json_?)?schema|response_?format|json_?schema", re.I)


def about_schema(detail: str) -> bool:
    """Whether an error message is about the response schema. A batch job's per-request error
    comes back without its request, so this is how it is told from any other 400."""
    return bool(SCHEMA_FIELDS.search(detail or ""))


def not_the_api(ep: Endpoint, body: str, *, expected: str, hint: str) -> PermanentClientError:
    """A 200 whose body is not the API's JSON, said as what it is. An HTML page means the
    request reached a web server that is not the model's API: a proxy or login page, or a
    ``base_url`` pointing at a web UI; retrying cannot fix it, so it fails at once."""
    head = (body or "")[:4000]
    if _HTML.search(head):
        title = _TITLE.search(head)
        named = f" ('{' '.join(title.group(1).split())[:80]}')" if title and title.group(1).strip() else ""
        what = f"an HTML page{named}"
        why = f"a proxy or login page answered, or the base_url is wrong ({hint})"
    else:
        shown = " ".join(head.split())[:80]
        what = f"a body that is not JSON ({shown!r})" if shown else "an empty body"
        why = f"is base_url right? ({hint})"
    return PermanentClientError(f"{ep.name}: {ep.base_url} answered HTTP 200 with {what}, not {expected}: {why}",
                                status=200)
