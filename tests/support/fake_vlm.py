"""A fake VLM server that speaks the real OpenAI and Gemini wire protocols over HTTP.

Why: client code is only trustworthy when it is driven through the official SDKs against a
server that answers like the real ones — same paths, same JSON shapes, same error bodies and
headers. This server also reads our four prompts and answers them like a (very literal) model,
so whole pipelines and benchmarks can run offline, and it injects the failures real endpoints
produce (429 with Retry-After, 5xx, hangs, truncation, safety blocks).

In process::

    with FakeVLM(latency=0.05) as fake:
        client = openai.OpenAI(base_url=fake.openai_base_url, api_key="x")
        fake.fail_next(1, 429, retry_after=2)

As its own process (benchmarks)::

    python -m tests.support.fake_vlm --port 0 --latency 0.5 --latency-dist lognormal
    # prints FAKE_VLM_URL=http://127.0.0.1:PORT; GET /_stats, POST /_reset, POST /_fail_next

Where we follow the real services rather than a simpler rule: a wrong Gemini key answers
``400 INVALID_ARGUMENT`` with reason ``API_KEY_INVALID`` and a missing one ``403
PERMISSION_DENIED``, as Google's endpoint does; a Gemini 429 carries a ``google.rpc.RetryInfo``
detail besides the ``Retry-After`` header.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import functools
import io
import json
import math
import random
import re
import signal
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from PIL import Image, ImageStat

LOGNORMAL_SIGMA = math.log(5) / 2.326  # p99 ≈ 5x the median

OPENAI_PATH = re.compile(r"^/v1/chat/completions/?$")
GEMINI_PATH = re.compile(r"^/(v1beta|v1alpha|v1)/models/([^:/]+):generateContent$")

GEMINI_STATUS = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
    409: "ABORTED", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL",
    501: "NOT_IMPLEMENTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
}
OPENAI_ERROR = {  # status -> (type, code), as api.openai.com sends them
    400: ("invalid_request_error", None), 401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"), 429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None), 502: ("server_error", None), 503: ("server_error", None),
}


# --------------------------------------------------------------------------- records

Reply = tuple[int, "dict | bytes", "dict | None"]  # status, JSON body (or raw bytes), extra headers


@dataclass(frozen=True)
class RecordedRequest:
    """One generate call as the server saw it (image bytes decoded from the wire)."""

    protocol: str  # "openai" | "gemini"
    path: str
    model: str
    prompt: str
    image: bytes | None
    image_mime: str
    params: dict  # OpenAI: top-level fields but messages/model; Gemini: generationConfig + others
    headers: dict  # lower-cased names
    body: dict
    n_images: int = 0

    @property
    def temperature(self):
        return self.params.get("temperature")

    @property
    def max_tokens(self):
        for k in ("max_tokens", "max_completion_tokens", "maxOutputTokens", "max_output_tokens"):
            if k in self.params:
                return self.params[k]
        return None


@dataclass
class _Fail:
    status: int
    retry_after: float | None = None
    message: str | None = None
    retry_header: bool = True
    reason: str | None = None


@dataclass
class _Hang:
    seconds: float


@dataclass
class _Answer:
    text: str
    finish_reason: str | None = None


@dataclass
class _Block:
    reason: str = "SAFETY"


@dataclass
class _Raw:
    """A reply that is not the API's JSON: a proxy's login page, a web UI at a wrong base_url."""

    status: int
    body: bytes
    content_type: str


@dataclass
class _Parsed:
    prompt: str = ""
    images: list[tuple[bytes, str]] = field(default_factory=list)
    params: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- the answerer

_PALETTE = {
    "black": (20, 20, 20), "white": (240, 240, 240), "gray": (128, 128, 128),
    "silver": (190, 190, 190), "red": (200, 30, 30), "green": (40, 150, 40),
    "blue": (30, 60, 200), "yellow": (230, 220, 40), "orange": (240, 140, 20),
    "brown": (120, 70, 30), "purple": (130, 40, 150),
}
_STEP0_ENTRY = re.compile(r"([A-Za-z][\w\-]*):\s*\[\s*(\d+),\s*(\d+),\s*(\d+),\s*(\d+)\s*\]")
_STEP2_ENTRY = re.compile(r"(['\"])(.*?):?\s*\[\s*(\d+),\s*(\d+),\s*(\d+),\s*(\d+)\s*\]\1")


def color_name(rgb) -> str:
    """The palette colour nearest (RGB distance) to ``rgb``."""
    return min(_PALETTE, key=lambda n: sum((a - b) ** 2 for a, b in zip(_PALETTE[n], rgb, strict=False)))


def _decode(image: bytes | None) -> Image.Image | None:
    if not image:
        return None
    try:
        with Image.open(io.BytesIO(image)) as im:
            return im.convert("RGB")
    except (OSError, ValueError):
        return None


def _crop_color(im: Image.Image | None, box: list[int]) -> str:
    if im is None:
        return "unknown"
    w, h = im.size
    x1, y1 = max(0, min(w - 1, box[0] * w // 1000)), max(0, min(h - 1, box[1] * h // 1000))
    x2, y2 = max(x1 + 1, min(w, -(-box[2] * w // 1000))), max(y1 + 1, min(h, -(-box[3] * h // 1000)))
    return color_name(ImageStat.Stat(im.crop((x1, y1, x2, y2))).mean[:3])


def _where(box: list[int]) -> str:
    cx = (box[0] + box[2]) / 2
    return "on the left" if cx < 333 else "in the center" if cx < 667 else "on the right"


def _answer_regions(prompt: str, image: bytes | None) -> str:
    line = next(x for x in prompt.splitlines() if x.startswith("Objects in the image at"))
    listing = line.split(":", 1)[1]
    im = _decode(image)
    out = []
    for m in _STEP0_ENTRY.finditer(listing):
        box = [int(v) for v in m.groups()[1:]]
        kind, color = m.group(1), _crop_color(im, box)
        out.append({"bbox_2d": box, "type": kind, "color": color,
                    "description": f"{color} {kind.lower()} {_where(box)}"})
    return "```json\n" + json.dumps(out, indent=2) + "\n```"


def _answer_caption(image: bytes | None) -> str:
    im = _decode(image)
    if im is None:
        return "A road scene in daylight."
    tone = color_name(ImageStat.Stat(im).mean[:3])
    return (f"A road scene in daylight with a mostly {tone} background, seen from a vehicle; "
            f"the frame is {im.width} by {im.height} pixels.")


def _group_key(description: str) -> str:
    """``red car on the left`` -> ``red car``: the words before the position, at most two."""
    words = re.split(r"\s(?:on|in)\s", f" {description} ", maxsplit=1)[0].split()
    return " ".join(words[:2]).lower() or "object"


def _answer_groups(prompt: str) -> str:
    groups: dict[str, list[tuple[str, list[int]]]] = {}
    for m in _STEP2_ENTRY.finditer(prompt):
        desc = m.group(2).strip().rstrip(":").strip() or "object"
        groups.setdefault(_group_key(desc), []).append((desc, [int(v) for v in m.groups()[2:]]))
    lines = []
    for key, members in groups.items():
        phrase = members[0][0] if len(members) == 1 else f"the {key}s"
        lines.append(f"{phrase}: {json.dumps([b for _, b in members])}")
    return "\n".join(lines)


def _answer_check(prompt: str) -> str:
    lines = prompt.splitlines()
    start = next((i for i, x in enumerate(lines) if x.rstrip().endswith("[x1, y1, x2, y2]:")), None)
    if start is None:
        return ""
    out = []
    for x in lines[start + 1:]:
        if not x.strip():
            break
        out.append(x)
    return "\n".join(out)


_S_LINE0 = re.compile(r"^(\d+): (\S+) \[\s*(-?[\d.]+),\s*(-?[\d.]+),\s*(-?[\d.]+),\s*(-?[\d.]+)\s*\]\s*$")
_S_LINE2 = re.compile(r"^(\d+): (.*?) \[\s*(-?[\d.]+),\s*(-?[\d.]+),\s*(-?[\d.]+),\s*(-?[\d.]+)\s*\]\s*$")
_S_GROUP3 = re.compile(r'^(".*?"): \{(.*)\}\s*$')
_S_ID3 = re.compile(r"(\d+): \[")
STRUCTURED_MARKERS = {
    "region_expr": "one per line as <id>: <type> [x1, y1, x2, y2]:",
    "grounding_expr": "one per line as <id>: <description> [x1, y1, x2, y2]:",
    "double_check": 'written as "<phrase>": {<id>: [x1, y1, x2, y2], ...}:',
}


def _listed(prompt: str, marker: str) -> list[str]:
    lines = prompt.splitlines()
    start = next((i for i, x in enumerate(lines) if x.rstrip().endswith(marker)), None)
    if start is None:
        return []
    out = []
    for x in lines[start + 1:]:
        if not x.strip():
            break
        out.append(x.strip())
    return out


def structured_answer(prompt: str, image: bytes | None) -> str | None:
    """Answer our structured prompts (ids instead of coordinates) with JSON, or None."""
    if STRUCTURED_MARKERS["region_expr"] in prompt:
        im = _decode(image)
        objects = []
        for line in _listed(prompt, STRUCTURED_MARKERS["region_expr"]):
            m = _S_LINE0.match(line)
            if not m:
                continue
            box = [round(float(v)) for v in m.groups()[2:]]
            kind, color = m.group(2), _crop_color(im, box)
            objects.append({"id": int(m.group(1)), "type": kind, "color": color,
                            "description": f"{color} {kind.lower()} {_where(box)}"})
        return json.dumps({"objects": objects})
    if STRUCTURED_MARKERS["grounding_expr"] in prompt:
        groups: dict[str, list[tuple[str, int]]] = {}
        for line in _listed(prompt, STRUCTURED_MARKERS["grounding_expr"]):
            m = _S_LINE2.match(line)
            if not m:
                continue
            desc = m.group(2).strip() or "object"
            groups.setdefault(_group_key(desc), []).append((desc, int(m.group(1))))
        out = [{"phrase": members[0][0] if len(members) == 1 else f"the {key}s", "box_ids": [i for _, i in members]}
               for key, members in groups.items()]
        return json.dumps({"groups": out})
    if STRUCTURED_MARKERS["double_check"] in prompt:
        out = []
        for line in _listed(prompt, STRUCTURED_MARKERS["double_check"]):
            m = _S_GROUP3.match(line)
            if m:
                out.append({"phrase": json.loads(m.group(1)), "box_ids": [int(i) for i in _S_ID3.findall(m.group(2))]})
        return json.dumps({"groups": out})
    return None


def wants_schema(protocol: str, params: dict) -> bool:
    """Whether a request asks for structured output (a JSON schema)."""
    if protocol == "openai":
        fmt = params.get("response_format")
        return isinstance(fmt, dict) and fmt.get("type") == "json_schema"
    return any(k in params for k in ("responseJsonSchema", "response_json_schema", "responseSchema",
                                     "response_schema"))


def step_of(prompt: str) -> str:
    """Which of our four steps a prompt is (structured or text), by the same markers the answers
    use; "other" for anything else. Tests count calls per step with it (``calls_by_step``)."""
    for name, marker in STRUCTURED_MARKERS.items():
        if marker in prompt:
            return name
    if '"bbox_2d": [x1, y1, x2, y2]' in prompt and "Objects in the image at [x1, y1, x2, y2]:" in prompt:
        return "region_expr"
    if "You are an AI visual assistant that specializes" in prompt:
        return "image_caption"
    if "classify the provided objects into groups" in prompt:
        return "grounding_expr"
    if "You are verifying grounding expressions" in prompt:
        return "double_check"
    return "other"


def default_answer(prompt: str, image: bytes | None, protocol: str) -> str:
    """Answer our four prompts like a literal-minded model; anything else gets one sentence."""
    structured = structured_answer(prompt, image)
    if structured is not None:
        return structured
    if '"bbox_2d": [x1, y1, x2, y2]' in prompt and "Objects in the image at [x1, y1, x2, y2]:" in prompt:
        return _answer_regions(prompt, image)
    if prompt.startswith("You are an AI visual assistant that specializes"):
        return _answer_caption(image)
    if "classify the provided objects into groups" in prompt:
        return _answer_groups(prompt)
    if prompt.startswith("You are verifying grounding expressions"):
        return _answer_check(prompt)
    return "The image shows a street scene."


# --------------------------------------------------------------------------- wire parsing

def b64decode(text: str) -> bytes | None:
    """Standard or URL-safe base64, as Google's JSON mapping of ``bytes`` accepts both."""
    text = text.strip().replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


def _data_url(url: str) -> tuple[bytes, str] | None:
    m = re.match(r"^data:([\w/+.\-]+);base64,(.*)$", url, re.S)
    data = b64decode(m.group(2)) if m else None
    return (data, m.group(1)) if data is not None else None


def parse_openai(body: dict) -> _Parsed:
    out = _Parsed(params={k: v for k, v in body.items() if k not in ("messages", "model")})
    texts = []
    for msg in body.get("messages") or []:
        content = msg.get("content")
        if isinstance(content, str):
            texts.append(content)
            continue
        for part in content or []:
            if part.get("type") == "text":
                texts.append(part.get("text", ""))
            elif part.get("type") == "image_url":
                url = (part.get("image_url") or {}).get("url", "")
                img = _data_url(url)
                if img:
                    out.images.append(img)
    out.prompt = "\n".join(texts)
    return out


def parse_gemini(body: dict) -> _Parsed:
    config = dict(body.get("generationConfig") or body.get("generation_config") or {})
    for k, v in body.items():
        if k not in ("contents", "generationConfig", "generation_config"):
            config[k] = v
    out = _Parsed(params=config)
    texts = []
    contents = body.get("contents") or []
    for content in [contents] if isinstance(contents, dict) else contents:
        for part in content.get("parts") or []:
            if "text" in part and not part.get("thought"):
                texts.append(part["text"])
            blob = part.get("inlineData") or part.get("inline_data")
            if blob:
                data = b64decode(blob.get("data", ""))
                if data is None:
                    continue
                out.images.append((data, blob.get("mimeType") or blob.get("mime_type") or ""))
    out.prompt = "\n".join(texts)
    return out


# --------------------------------------------------------------------------- responses

def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


def openai_error(status: int, message: str | None = None) -> dict:
    default = ("api_error" if status >= 500 else "invalid_request_error", None)
    kind, code = OPENAI_ERROR.get(status, default)
    message = message or f"fake error {status}"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def gemini_error(status: int, message: str | None = None, *, retry_after: float | None = None,
                 reason: str | None = None, quota_per_minute: int | None = None) -> dict:
    """A Gemini error body; a 429 over a quota carries a ``google.rpc.QuotaFailure`` naming it
    (``quota_per_minute``), as Google's endpoint does, besides the RetryInfo."""
    err: dict = {"code": status, "message": message or f"fake error {status}",
                 "status": GEMINI_STATUS.get(status, "UNKNOWN")}
    details = []
    if quota_per_minute:
        details.append({"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{
            "quotaMetric": "generativelanguage.googleapis.com/generate_content_requests",
            "quotaId": "GenerateRequestsPerMinutePerProjectPerModel",
            "quotaDimensions": {"location": "global", "model": "fake"},
            "quotaValue": str(quota_per_minute)}]})
    if reason:
        details.append({"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason,
                        "domain": "googleapis.com",
                        "metadata": {"service": "generativelanguage.googleapis.com"}})
    if retry_after is not None:
        details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo",
                        "retryDelay": f"{retry_after:g}s"})
    if details:
        err["details"] = details
    return {"error": err}


def openai_completion(model: str, prompt: str, text: str | None, finish_reason: str) -> dict:
    completion = _tokens(text or "")
    prompt_tokens = _tokens(prompt) + 258
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion",
        "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": None, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                  "total_tokens": prompt_tokens + completion},
    }


def gemini_response(model: str, prompt: str, text: str, finish_reason: str) -> dict:
    prompt_tokens = _tokens(prompt) + 258
    completion = _tokens(text) if text else 0
    candidate: dict = {"finishReason": finish_reason, "index": 0}
    if text:
        candidate["content"] = {"parts": [{"text": text}], "role": "model"}
    if finish_reason == "SAFETY":
        candidate["safetyRatings"] = [{"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH",
                                       "blocked": True}]
    return {
        "candidates": [candidate],
        "usageMetadata": {"promptTokenCount": prompt_tokens, "candidatesTokenCount": completion,
                          "totalTokenCount": prompt_tokens + completion},
        "modelVersion": model, "responseId": uuid.uuid4().hex[:22],
    }


def gemini_blocked(model: str, prompt: str, reason: str) -> dict:
    prompt_tokens = _tokens(prompt) + 258
    return {"promptFeedback": {"blockReason": reason},
            "usageMetadata": {"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens},
            "modelVersion": model, "responseId": uuid.uuid4().hex[:22]}


# --------------------------------------------------------------------------- the server

class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True

    def __init__(self, addr, handler, fake: FakeVLM):
        self.fake = fake
        super().__init__(addr, handler)

    def handle_error(self, request, client_address):  # clients that time out hang up on us
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format, *args):  # keep test and benchmark output clean
        pass

    def _send(self, reply: Reply, generate: bool = False) -> None:
        status, payload, headers = reply
        headers = dict(headers or {})
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        content_type = headers.pop("Content-Type", "application/json; charset=UTF-8")
        if not urlsplit(self.path).path.startswith("/_"):  # control routes are not API traffic
            self.server.fake._finish(status, generate)
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (timeout) before we answered

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def do_GET(self):
        self._send(self.server.fake._handle_get(self))

    def do_DELETE(self):  # the batch routes' file deletion (tests/support/fake_batch.py)
        reply = self.server.fake.batch.handle_delete(self)
        self._send(reply or (404, {"error": {"code": 404, "message": f"no route DELETE {self.path}",
                                             "status": "NOT_FOUND"}}, None))

    def do_POST(self):
        fake, generate = self.server.fake, False
        try:
            reply, generate = fake._handle_post(self, self._body())
        except Exception as exc:  # a bug in the fake must be a 500, not a hung client
            crash = {"code": 500, "message": f"fake_vlm crashed: {exc!r}", "status": "INTERNAL"}
            reply = 500, {"error": crash}, None
        self._send(reply, generate)


class FakeVLM:
    """An OpenAI- and Gemini-compatible VLM server with fault injection; see the module docstring.

    :param host: interface to bind.
    :param port: 0 picks a free port.
    :param latency: seconds before each answer (the median when ``latency_dist="lognormal"``).
    :param latency_dist: ``"fixed"`` or ``"lognormal"`` (p99 ≈ 5x the median).
    :param max_concurrency: requests served at once; above it -> 429. 0 = unlimited.
    :param rpm: requests per rolling minute; above it -> 429 with Retry-After. 0 = unlimited.
    :param api_key: when set, required (OpenAI bearer; Gemini ``x-goog-api-key`` or ``?key=``).
    :param models: when given, other models -> 404.
    :param seed: seeds the latency sampler.
    :param record: keep every request in ``requests`` (off for long benchmarks: images add up).
    :param reject_json_schema: answer requests asking for structured output (OpenAI
        ``response_format`` json_schema, Gemini ``responseJsonSchema``) with HTTP 400, as
        servers that predate it do.
    """

    #: When set (a ``tests.support.fake_capacity.Capacity``), answers take their latency from it.
    capacity = None

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, latency: float = 0.0,
                 latency_dist: str = "fixed", max_concurrency: int = 0, rpm: int = 0,
                 api_key: str | None = None, models=None, seed: int = 0, record: bool = True,
                 reject_json_schema: bool = False):
        if latency_dist not in ("fixed", "lognormal"):
            raise ValueError(f"latency_dist must be 'fixed' or 'lognormal', not {latency_dist!r}")
        self.host, self.port = host, port
        self.latency, self.latency_dist = latency, latency_dist
        self.max_concurrency, self.rpm = max_concurrency, rpm
        self.api_key = api_key
        self.models = set(models) if models is not None else None
        self.record = record
        self.reject_json_schema = reject_json_schema
        self.answer_fn: Callable[[str, bytes | None, str], str] | None = None
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._directives: deque = deque()
        self._window: deque[float] = deque()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.reset()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> FakeVLM:
        self._stopping.clear()
        self._server = _Server((self.host, self.port), _Handler, self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"fake-vlm:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes hanging handlers
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeVLM:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return self.url + "/v1"

    @property
    def gemini_base_url(self) -> str:
        return self.url

    @functools.cached_property
    def batch(self):
        """The batch and file routes (``tests.support.fake_batch.FakeBatch``), made on first use."""
        from tests.support.fake_batch import FakeBatch

        return FakeBatch(self)

    # ------------------------------------------------------------------ control
    def reset(self) -> None:
        """Forget recorded requests, counters, queued faults and the rate window."""
        with self._lock:
            self.requests: list[RecordedRequest] = []
            self.calls = 0
            self.in_flight = 0
            self.max_in_flight = 0
            self.status_counts: dict[int, int] = {}
            self.requests_by_model: Counter[str] = Counter()
            self.requests_by_client: Counter[str] = Counter()  # by the caller's IP address: per host
            self.calls_by_step: Counter[str] = Counter()  # by our step the prompt is (``step_of``)
            self._directives.clear()
            self._window.clear()

    def fail_next(self, n: int, status: int, *, retry_after: float | None = None,
                  message: str | None = None, retry_header: bool = True, reason: str | None = None) -> None:
        """Answer the next ``n`` calls with ``status`` in the protocol's error shape.

        ``retry_after`` sets the ``Retry-After`` header (unless ``retry_header`` is False) and, on
        Gemini, a RetryInfo detail; ``reason`` adds a Gemini ErrorInfo reason (``API_KEY_INVALID``).
        """
        self._queue(n, _Fail(status, retry_after, message, retry_header, reason))

    def hang_next(self, n: int, seconds: float) -> None:
        """Sleep ``seconds`` before answering the next ``n`` calls (to trip client timeouts)."""
        self._queue(n, _Hang(seconds))

    def answer_next(self, text: str, *, finish_reason: str | None = None) -> None:
        """Answer the next call with ``text`` (and ``finish_reason``, e.g. length / MAX_TOKENS)."""
        self._queue(1, _Answer(text, finish_reason))

    def raw_next(self, n: int, body: str | bytes, *, status: int = 200,
                 content_type: str = "text/html; charset=utf-8") -> None:
        """Answer the next ``n`` calls with ``body`` as it is (not the API's JSON), as a proxy,
        a login page or a web app at a wrong ``base_url`` does."""
        self._queue(n, _Raw(status, body.encode() if isinstance(body, str) else body, content_type))

    def block_next(self, n: int = 1, reason: str = "SAFETY") -> None:
        """Gemini: no candidates, ``promptFeedback.blockReason``; OpenAI: ``content_filter``."""
        self._queue(n, _Block(reason))

    def _queue(self, n: int, item) -> None:
        with self._lock:
            self._directives.extend(item for _ in range(n))

    def stats(self) -> dict:
        with self._lock:
            return {"calls": self.calls, "in_flight": self.in_flight, "max_in_flight": self.max_in_flight,
                    "status_counts": {str(k): v for k, v in self.status_counts.items()},
                    "requests_by_model": dict(self.requests_by_model),
                    "requests_by_client": dict(self.requests_by_client),
                    "calls_by_step": dict(self.calls_by_step)}

    # ------------------------------------------------------------------ internals
    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._stopping.wait(seconds)

    def sample_latency(self) -> float:
        """Seconds to wait before the next answer, from the configured distribution."""
        if self.latency <= 0:
            return 0.0
        if self.latency_dist == "fixed":
            return self.latency
        with self._lock:
            return self.latency * math.exp(self._rng.gauss(0.0, LOGNORMAL_SIGMA))

    def _admit(self) -> tuple[object | None, tuple[int, float | None, str] | None]:
        """Under the lock: count the call, apply limits, pop a directive."""
        with self._lock:
            self.calls += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            if self.max_concurrency and self.in_flight > self.max_concurrency:
                return None, (429, 1.0, f"too many concurrent requests (limit {self.max_concurrency})")
            if self.rpm:
                now = time.monotonic()
                while self._window and now - self._window[0] >= 60.0:
                    self._window.popleft()
                if len(self._window) >= self.rpm:
                    wait = max(1, math.ceil(60.0 - (now - self._window[0])))
                    return None, (429, float(wait), f"rate limit of {self.rpm} requests per minute reached")
                self._window.append(now)
            return (self._directives.popleft() if self._directives else None), None

    def _handle_get(self, h: _Handler) -> Reply:
        path = urlsplit(h.path).path
        if path == "/_stats":
            return 200, self.stats(), None
        if path == "/v1/models":
            ids = sorted(self.models or {"fake-vlm"})
            return 200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "fake-vlm"} for m in ids]}, None
        if re.match(r"^/(v1beta|v1alpha|v1)/models/?$", path):
            ids = sorted(self.models or {"gemini-2.5-flash"})
            return 200, {"models": [{"name": f"models/{m}", "supportedGenerationMethods": ["generateContent"]}
                                    for m in ids]}, None
        if (batch := self.batch.handle_get(h)) is not None:
            return batch
        return 404, {"error": {"code": 404, "message": f"no route GET {path}", "status": "NOT_FOUND"}}, None

    def _handle_post(self, h: _Handler, raw: bytes) -> tuple[Reply, bool]:
        """The reply, and whether this was a generate call (counted in ``in_flight``)."""
        split = urlsplit(h.path)
        if split.path.startswith("/_"):
            return self._handle_control(split.path, raw), False
        if (batch := self.batch.handle_post(h, raw)) is not None:
            return batch, False
        gem = GEMINI_PATH.match(split.path)
        if OPENAI_PATH.match(split.path):
            protocol = "openai"
        elif gem:
            protocol = "gemini"
        else:
            return (404, {"error": {"code": 404, "message": f"no route POST {split.path}",
                                    "status": "NOT_FOUND"}}, None), False
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            return self._error(protocol, 400, "request body is not valid JSON"), False
        parsed = parse_openai(body) if protocol == "openai" else parse_gemini(body)
        model = str(body.get("model", "")) if protocol == "openai" else gem.group(2)
        directive, limited = self._admit()
        self._record(protocol, split.path, model, parsed, h, body)
        try:
            return self._serve(h, protocol, model, parsed, split.query, directive, limited, gem), True
        except Exception as exc:  # e.g. a raising answer_fn: a 500, and in_flight stays right
            return self._error(protocol, 500, f"fake_vlm crashed: {exc!r}"), True

    def _record(self, protocol, path, model, parsed: _Parsed, h: _Handler, body: dict) -> None:
        image, mime = parsed.images[0] if parsed.images else (None, "")
        rec = RecordedRequest(protocol, path, model, parsed.prompt, image, mime, parsed.params,
                              {k.lower(): v for k, v in h.headers.items()}, body, len(parsed.images))
        with self._lock:
            self.requests_by_model[model] += 1
            self.requests_by_client[h.client_address[0]] += 1
            self.calls_by_step[step_of(parsed.prompt)] += 1
            if self.record:
                self.requests.append(rec)

    def _auth_error(self, h: _Handler, protocol: str, query: str) -> Reply | None:
        if self.api_key is None:
            return None
        if protocol == "openai":
            got = h.headers.get("Authorization", "")
            if got == f"Bearer {self.api_key}":
                return None
            shown = got.removeprefix("Bearer ")
            shown = f"{shown[:3]}***{shown[-4:]}" if len(shown) > 8 else "***"
            return self._error(protocol, 401, f"Incorrect API key provided: {shown}. You can find your API "
                               "key at https://platform.openai.com/account/api-keys.")
        got = h.headers.get("x-goog-api-key") or (parse_qs(query).get("key") or [""])[0]
        if got == self.api_key:
            return None
        if not got:
            return self._error(protocol, 403, "Method doesn't allow unregistered callers (callers without "
                               "established identity). Please use API Key or other form of API consumer "
                               "identity.")
        return self._error(protocol, 400, "API key not valid. Please pass a valid API key.",
                           reason="API_KEY_INVALID")

    def _serve(self, h, protocol, model, parsed: _Parsed, query, directive, limited, gem) -> Reply:
        denied = self._auth_error(h, protocol, query)
        if denied:
            return denied
        if self.models is not None and model not in self.models:
            if protocol == "openai":
                msg = f"The model `{model}` does not exist or you do not have access to it."
            else:
                msg = (f"models/{model} is not found for API version {gem.group(1)}, or is not supported "
                       "for generateContent. Call ListModels to see the list of available models.")
            return self._error(protocol, 404, msg)
        if limited:
            status, retry_after, msg = limited
            return self._error(protocol, status, msg, retry_after=retry_after)
        if isinstance(directive, _Fail):
            header = directive.retry_after if directive.retry_header else None
            return self._error(protocol, directive.status, directive.message, retry_after=header,
                               detail_retry=directive.retry_after, reason=directive.reason)
        if self.reject_json_schema and wants_schema(protocol, parsed.params):
            if protocol == "openai":
                msg = ("1 validation error for ChatCompletionRequest\nresponse_format.type\n  Input should be "
                       "'text' or 'json_object' [type=literal_error, input_value='json_schema']")
            else:
                msg = ("Invalid JSON payload received. Unknown name \"responseJsonSchema\" at "
                       "'generation_config': Cannot find field.")
            return self._error(protocol, 400, msg)
        if isinstance(directive, _Raw):
            return directive.status, directive.body, {"Content-Type": directive.content_type}
        if isinstance(directive, _Hang):
            self._sleep(directive.seconds)
        quota_headers = None
        if self.capacity is None:
            self._sleep(self.sample_latency())
        else:  # a GPU batch server with K slots and a quota (tests/support/fake_capacity.py)
            wait = self.capacity.admit()
            if wait is not None:
                cap = self.capacity
                return self._error(protocol, 429, f"quota of {cap.rpm} requests per minute exceeded",
                                   retry_after=None if cap.style == protocol == "gemini" else wait,
                                   detail_retry=wait,
                                   quota_per_minute=cap.rpm if cap.style == "gemini" else None,
                                   extra_headers=cap.rate_headers() if protocol == "openai" else None)
            self.capacity.serve(self.sample_latency(), self._stopping)
            quota_headers = self.capacity.rate_headers() if protocol == "openai" else None
        image = parsed.images[0][0] if parsed.images else None
        if isinstance(directive, _Block):
            if protocol == "openai":
                return 200, openai_completion(model, parsed.prompt, None, "content_filter"), None
            return 200, gemini_blocked(model, parsed.prompt, directive.reason), None
        if isinstance(directive, _Answer):
            text, reason = directive.text, directive.finish_reason
        else:
            fn = self.answer_fn or default_answer
            text, reason = fn(parsed.prompt, image, protocol), None
        if protocol == "openai":
            content = text if text or reason != "content_filter" else None
            return 200, openai_completion(model, parsed.prompt, content, reason or "stop"), quota_headers
        return 200, gemini_response(model, parsed.prompt, text, reason or "STOP"), None

    def _error(self, protocol, status, message, *, retry_after=None, detail_retry=None, reason=None,
               quota_per_minute=None, extra_headers=None) -> Reply:
        headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else None
        if extra_headers:
            headers = {**(headers or {}), **extra_headers}
        if protocol == "openai":
            return status, openai_error(status, message), headers
        detail = detail_retry if detail_retry is not None else retry_after
        return status, gemini_error(status, message, retry_after=detail if status == 429 else None,
                                    reason=reason, quota_per_minute=quota_per_minute), headers

    def _handle_control(self, path: str, raw: bytes) -> Reply:
        try:
            args = json.loads(raw or b"{}")
        except ValueError:
            return 400, {"error": "body must be JSON"}, None
        if path == "/_reset":
            self.reset()
        elif path == "/_fail_next":
            self.fail_next(int(args.get("n", 1)), int(args.get("status", 500)),
                           retry_after=args.get("retry_after"), message=args.get("message"))
        elif path == "/_hang_next":
            self.hang_next(int(args.get("n", 1)), float(args.get("seconds", 1.0)))
        else:
            return 404, {"error": f"no control route {path}"}, None
        return 200, {"ok": True}, None

    def _finish(self, status: int, generate: bool) -> None:
        """Count an API reply before its bytes leave, so a client never sees stale counters."""
        with self._lock:
            self.status_counts[status] = self.status_counts.get(status, 0) + 1
            if generate:
                self.in_flight -= 1


# --------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.support.fake_vlm", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--latency-dist", choices=("fixed", "lognormal"), default="fixed")
    p.add_argument("--max-concurrency", type=int, default=0)
    p.add_argument("--rpm", type=int, default=0)
    p.add_argument("--api-key", default=None)
    p.add_argument("--models", default="", help="comma-separated; empty = any model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--record", action="store_true", help="keep request bodies in memory")
    p.add_argument("--reject-json-schema", action="store_true", help="answer structured-output requests with 400")
    a = p.parse_args(argv)
    models = {m for m in a.models.split(",") if m} or None
    fake = FakeVLM(host=a.host, port=a.port, latency=a.latency, latency_dist=a.latency_dist,
                   max_concurrency=a.max_concurrency, rpm=a.rpm, api_key=a.api_key, models=models,
                   seed=a.seed, record=a.record, reject_json_schema=a.reject_json_schema).start()
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    print(f"FAKE_VLM_URL={fake.url}", flush=True)
    while not done.wait(0.5):
        pass
    fake.stop()


if __name__ == "__main__":
    main()
