"""The four steps as pure functions, and the one runner that drives any of them.

Each step module has ``build_prompt(record, template) -> (prompt, hint) | None``,
``parse(text, record) -> parsed`` (raises ParseError), ``empty()``, ``record(rec, parsed)`` and
``legacy(rec) -> str``. Nothing here imports Celery or Redis.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import import_module
from types import ModuleType

from worker.clients.base import VLMClient, VLMResponse
from worker.constants import SEED_ORDINAL
from worker.images import DEFAULT_MAX_PIXELS, content_hash
from worker.stepdefs import PIPELINE, STEP, final_steps
from worker.steps import fingerprint
from worker.steps.converse import CLEAN_STOPS, converse, plan
from worker.steps.options import StepOptions
from worker.steps.records import PIPELINE_NAMES, canonical, merge

__all__ = ["CLEAN_STOPS", "STEPS", "StepOptions", "StepOutcome", "expected_fingerprints", "final_record",
           "input_record", "run_step"]

#: The module holding each step's pure logic, as ``worker/stepdefs.py`` declares it (with what
#: each step reads and how it is scheduled).
STEPS: dict[int, ModuleType] = {d.number: import_module(d.module) for d in PIPELINE}


@dataclass
class StepOutcome:
    """A finished step: the record for the sink, the legacy file text, and the raw answer."""

    record: dict
    legacy: str
    response: VLMResponse | None = None


def input_record(step: int, seed: dict, upstream: dict[int, dict]) -> dict:
    """The record a step works on: the seed (when the step starts from it) merged with the
    upstream records it reads."""
    d = STEP[step]
    if SEED_ORDINAL in seed:  # the seed's bookkeeping (the image's done bit), not the image's data
        seed = {k: v for k, v in seed.items() if k != SEED_ORDINAL}
    return merge(*([seed] if d.reads_seed else []), *(upstream.get(s) for s in d.reads))


def run_step(
    step: int,
    record: dict,
    client: VLMClient,
    templates: dict[str, str],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    options: StepOptions | None = None,
) -> StepOutcome:
    """Build the prompt, ask the model (unless nothing needs asking), parse, build the record.

    ``options`` (``StepOptions.from_vlm(spec.ire.vlm)``) choose structured output and the box
    convention; ``worker.steps.converse`` holds the conversation (fallback, truncation, re-ask)
    and the record's ``meta[<step>]["quality"]`` reports it (``worker.steps.quality``).

    When a call was made, the record's ``meta[<step>]["call"]`` holds what it cost:
    ``{model, input_tokens, output_tokens[, image_tokens][, thinking_tokens], latency_s}`` (the
    API's usage, whichever names the client used, summed over the conversation's calls;
    ``latency_s`` is the conversation's wall time; ``finalize`` drops it so the final output
    stays deterministic). Every record's ``meta[<step>]["fingerprint"]`` says what produced it
    (``worker.steps.fingerprint``).

    Raises the errors of ``worker.errors``: the caller decides about retries and failures.
    """
    mod = STEPS[step]
    started = time.monotonic()
    exchange = converse(STEP[step], mod, record, client, templates, options=options, max_pixels=max_pixels)
    latency = time.monotonic() - started
    parsed, response = exchange.parsed, exchange.response
    out = mod.record(record, parsed)
    options = options or StepOptions()
    fp = fingerprint.compose(step, exchange.sent, generation=options.generation,
                             downscale_to_pixels=options.downscale_to_pixels, image_sha256=exchange.image_sha256,
                             upstream=fingerprint.upstream_of(record, step))
    name = PIPELINE_NAMES[step]
    meta = dict(out.get("meta") or {})
    meta[name] = {**meta.get(name, {}), fingerprint.KEY: fp}
    if exchange.schema_refused and exchange.sent is not None:
        meta[name][fingerprint.REFUSED] = True
    out = canonical({**out, "meta": meta})
    if response is not None:
        usage = response.usage or {}
        cost: dict = {
            "model": response.model,
            "input_tokens": int(usage.get("input_tokens", usage.get("prompt_tokens")) or 0),
            "output_tokens": int(usage.get("output_tokens", usage.get("completion_tokens")) or 0),
        }
        for key in ("image_tokens", "thinking_tokens"):
            if usage.get(key):
                cost[key] = int(usage[key])
        cost["latency_s"] = round(latency, 3)
        meta = dict(out.get("meta") or {})
        meta[name] = {**meta.get(name, {}), "call": cost, fingerprint.KEY: fp}
        out = canonical({**out, "meta": meta})
    return StepOutcome(record=out, legacy=mod.legacy(out), response=response)


def expected_fingerprints(step: int, record: dict, templates: dict[str, str], options: StepOptions, *,
                          structured: bool, fell_back: bool = False) -> set[str]:
    """The fingerprints a record of ``step`` made from ``record`` (its input: seed and upstream
    records as they are now) would carry if it were made now, without asking the model: the
    first request rebuilt (``converse.plan``) and the image's hash (``images.content_hash``: a
    stat, then the hash kept while the image is in flight, else one read). ``structured``:
    whether this process would send a schema.
    ``fell_back``: the existing record's endpoint refused a schema, so the text requests it
    sends then are also current (the endpoint would refuse again): the one right after the
    refusal (the structured budget) and the ones after it (the text budget). Raises ``InputError`` when
    the image cannot be read (the redo then fails the same way)."""
    upstream = fingerprint.upstream_of(record, step)
    out = set()
    tries = [(structured, False)] + ([(structured, True), (False, False)] if fell_back else [])
    for ok, fallback in tries:
        sent = plan(STEP[step], STEPS[step], record, templates, options=options, structured=ok, fallback=fallback)
        sha = content_hash(record["image_path"], options.image_cache_dir or None) if sent is not None else ""
        out.add(fingerprint.compose(step, sent, generation=options.generation,
                                    downscale_to_pixels=options.downscale_to_pixels, image_sha256=sha,
                                    upstream=upstream))
    return out


def final_record(steps: list[int], records: dict[int, dict]) -> dict:
    """The record ``annotations.jsonl`` holds: the last step's, or the head steps' merged
    (``stepdefs.final_steps``)."""
    return merge(*(records.get(s) for s in final_steps(steps)))
