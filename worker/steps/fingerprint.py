"""A step record's fingerprint: a short hash of what produced it, so a re-run can tell which
image-steps the current spec would ask differently (``workflow.reprocess: changed``).

What goes in (``compose``), as one canonical JSON document hashed with sha256, first 16 hex:

- the step number and ``VERSION`` (bumped if what goes in changes);
- the fingerprints of the upstream records the step read (``StepDef.reads`` that were present),
  so a step redone upstream makes everything after it differ too;
- when the step asked the model, the first request as sent, without its transport:
  ``generation`` (backend, model, temperature; Gemini's media resolution and thinking budget),
  the answer mode actually used (``structured`` or ``text``, after any fallback), the rendered
  prompt text, the response schema (None in text mode), the output budget as sent (the sized
  budget, or the configured one), ``vlm.downscale_to_pixels`` and the sha256 of the image
  file's bytes (``worker.images.content_hash``).

What stays out: the base URL and API key, timeouts, retries, concurrency and rate limits, the
budget of a truncation retry or a re-ask (they follow from the answer, not from the spec), and
the image path (a moved dataset with the same bytes is the same request). A step that asked
nothing (an image without boxes) is fingerprinted by its step and upstream alone.

Pure: no Celery, no Redis, no I/O.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from worker.stepdefs import STEP
from worker.steps.records import PIPELINE_NAMES

VERSION = 1
LENGTH = 16
KEY = "fingerprint"  # meta[<step record name>][KEY]
#: meta[<step record name>][REFUSED] is true when text was sent because the endpoint had
#: refused a response schema (this call, or an earlier one of the same process).
REFUSED = "schema_refused"


@dataclass(frozen=True)
class Sent:
    """The first request of a step's conversation, as far as the fingerprint cares."""

    mode: str
    prompt: str
    schema: dict | None
    max_tokens: int


def _media_resolution(value: str) -> str:
    name = (value or "").strip().upper()
    return name if not name or name.startswith("MEDIA_RESOLUTION_") else "MEDIA_RESOLUTION_" + name


def generation(vlm) -> tuple[tuple[str, object], ...]:
    """What the client adds to every request of a run, from the ``vlm`` spec (duck-typed)."""
    backend = getattr(vlm, "backend", "")
    if backend == "gemini":
        g = vlm.gemini
        return (("backend", backend), ("model", g.model), ("temperature", float(g.temperature)),
                ("media_resolution", _media_resolution(g.media_resolution)),
                ("thinking_budget", getattr(g, "thinking_budget", None)))
    if backend == "openai":
        o = vlm.openai
        return (("backend", backend), ("model", o.model_name), ("temperature", float(o.temperature)))
    return (("backend", backend),)


def compose(step: int, sent: Sent | None, *, generation: tuple = (), downscale_to_pixels: int = 0,
            image_sha256: str = "", upstream: dict[int, str] | None = None) -> str:
    """The fingerprint of one step record (see the module docstring for what goes in)."""
    body: dict = {"v": VERSION, "step": step, "upstream": {str(k): v for k, v in sorted((upstream or {}).items())}}
    if sent is not None:
        body["request"] = {
            "generation": [list(kv) for kv in generation], "mode": sent.mode, "prompt": sent.prompt,
            "schema": sent.schema, "max_tokens": sent.max_tokens,
            "downscale_to_pixels": int(downscale_to_pixels or 0), "image_sha256": image_sha256,
        }
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:LENGTH]


def of_record(record: dict | None, step: int) -> str | None:
    """The fingerprint a record holds for ``step`` (None: no such step in it, or a record
    written before fingerprints existed)."""
    meta = ((record or {}).get("meta") or {}).get(PIPELINE_NAMES[step])
    value = meta.get(KEY) if isinstance(meta, dict) else None
    return value if isinstance(value, str) and value else None


def upstream_of(record: dict, step: int) -> dict[int, str]:
    """The fingerprints of the upstream steps ``step`` read, from its input record (the merged
    upstream records carry theirs in ``meta``). A present upstream without one counts as ""."""
    meta = record.get("meta") or {}
    return {u: of_record(record, u) or "" for u in STEP[step].reads if PIPELINE_NAMES[u] in meta}


def fell_back(record: dict | None, step: int) -> bool:
    """Whether the record's request was text because its endpoint refused a schema (this call
    or an earlier one of its process): its fingerprint then holds a text request, which a
    process that has not met the refusal yet must also accept."""
    meta = ((record or {}).get("meta") or {}).get(PIPELINE_NAMES[step]) or {}
    if not isinstance(meta, dict):
        return False
    quality = meta.get("quality")
    return bool(meta.get(REFUSED)) or (isinstance(quality, dict) and quality.get("fallback") == "structured_rejected")
