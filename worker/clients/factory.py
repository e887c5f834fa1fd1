"""One VLM client per process and endpoint, shared by every thread of a worker.

Why: an SDK client owns a connection pool; building one per call would redo TLS handshakes and
defeat keep-alive. Clients are cached by backend and a hash of the spec fields and environment
keys they were built from, so a changed spec or a rotated key gets a fresh client while the key
itself is never kept in the cache key. Backends are imported lazily, so a Gemini worker does
not import the OpenAI SDK and vice versa.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from worker import settings
from worker.clients.base import VLMClient
from worker.clients.batch import BatchBackend
from worker.errors import ConfigError
from worker.spec import VLMSpec

GEMINI_DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
# Keys each backend reads (see its resolve_key: the variable, or the file its *_FILE variable
# names) and plain settings; both are part of the cache key, so a rotated key file counts too.
_KEYS = settings.API_KEY_VARS
_ENV = {"openai": ("OPENAI_BASE_URL",)}

T = TypeVar("T")
_lock = threading.Lock()
_clients: dict[tuple[str, str, str], Any] = {}


def spec_fingerprint(vlm: VLMSpec) -> str:
    """sha256 over the backend's spec section and the environment it reads."""
    section = getattr(vlm, vlm.backend, None)
    fields = section.model_dump(mode="json") if section is not None else vlm.model_dump(mode="json")
    env = {k: os.environ.get(k, "") for k in _ENV.get(vlm.backend, ())}
    env |= {k: settings.secret(k) for k in _KEYS.get(vlm.backend, ())}
    raw = json.dumps({"spec": fields, "env": env}, sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()


def _build(vlm: VLMSpec) -> VLMClient:
    if vlm.backend == "gemini":
        from worker.clients.gemini import GeminiClient

        return GeminiClient(vlm.gemini)
    if vlm.backend == "openai":
        from worker.clients.openai_compat import OpenAICompatClient

        return OpenAICompatClient(vlm.openai)
    if vlm.backend == "offline":
        from worker.clients.offline import OfflineClient

        return OfflineClient(vlm)
    raise ConfigError(f"vlm.backend = {vlm.backend!r} is not one of: gemini, openai, offline")


def get_client(vlm: VLMSpec) -> VLMClient:
    """The process-wide client for this spec; built on first use, under a lock."""
    return cached("online", vlm, _build)


def cached(kind: str, vlm: VLMSpec, build: Callable[[VLMSpec], T]) -> T:
    """``build(vlm)``, once per process for each kind of object, backend and spec fingerprint
    (online clients here, batch backends in ``clients/batch.py``)."""
    key = (kind, vlm.backend, spec_fingerprint(vlm))
    with _lock:
        obj = _clients.get(key)
        if obj is None:
            obj = _clients[key] = build(vlm)
        return obj


def get_batch_backend(vlm: VLMSpec) -> BatchBackend:
    """The batch backend for ``vlm.backend``, imported lazily like the online clients. Gemini's
    and OpenAI's are kept per process and spec (``factory.cached``, as online clients are): an
    SDK client owns a connection pool, and the coordinator asks on every poll. The offline
    teacher's reads its settings from the environment when built, so it is built each time."""
    if vlm.backend not in ("gemini", "openai"):
        return _build_batch(vlm)
    return cached("batch", vlm, _build_batch)


def _build_batch(vlm: VLMSpec) -> BatchBackend:
    if vlm.backend == "gemini":
        from worker.clients.gemini_batch import GeminiBatch

        return GeminiBatch(vlm.gemini)
    if vlm.backend == "openai":
        from worker.clients.openai_batch import OpenAIBatch

        return OpenAIBatch(vlm.openai)
    if vlm.backend == "offline":
        from worker.clients.offline_batch import OfflineBatch

        return OfflineBatch(vlm)
    raise ConfigError(f"vlm.backend = {vlm.backend!r} is not one of: gemini, openai, offline")


def clear_cache() -> None:
    """Forget every cached client (tests; a worker never needs it)."""
    with _lock:
        _clients.clear()
