"""One image-step, end to end, without Celery: skip if done, read inputs, ask, append, index.

The Celery task (``worker.tasks``) is a thin adapter over ``execute``; retries and failure
recording are decided there from the exception ``execute`` lets through.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re

from worker.clients.base import VLMClient, VLMRequest, VLMResponse
from worker.context import RunContext
from worker.errors import InputError
from worker.steps import REQUIRES, USES, input_record, run_step
from worker.steps.records import PIPELINE_NAMES

DONE, SKIPPED, BLOCKED, FAILED = "done", "skipped", "blocked", "failed"

log = logging.getLogger("refexp.worker")
_SURROGATE = re.compile("[\ud800-\udfff]")


class ValidText:
    """A client whose answers are valid Unicode: bytes that were not UTF-8 reach us as lone
    surrogates, which no sink can encode; they become U+FFFD (and are logged, not fatal)."""

    def __init__(self, inner: VLMClient, image_id: str):
        self.inner, self.image_id, self.name = inner, image_id, inner.name

    def generate(self, request: VLMRequest) -> VLMResponse:
        response = self.inner.generate(request)
        text, n = _SURROGATE.subn("\ufffd", response.text or "")
        if not n:
            return response
        log.warning("%s %s: the answer was not valid UTF-8; %d character(s) replaced", self.image_id,
                    request.step, n)
        return dataclasses.replace(response, text=text)


def required_inputs(step: int, steps: list[int]) -> tuple[int, ...]:
    """Steps whose records must exist: the fixed ones, plus step 1 for step 2 when it runs."""
    extra = (1,) if step == 2 and 1 in steps else ()
    return REQUIRES[step] + extra


def read_seed(ctx: RunContext, image_id: str, offset: int) -> dict:
    """The seed record at ``offset``; falls back to a scan if the seed file was rewritten."""
    path = ctx.layout.seed
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            rec = json.loads(f.readline())
        if rec.get("image_id") == image_id:
            return rec
    except (OSError, ValueError):
        pass
    try:
        with open(path, "rb") as f:
            for line in f:
                rec = json.loads(line)
                if rec.get("image_id") == image_id:
                    return rec
    except OSError as exc:
        raise InputError(f"{path}: cannot read the seed file ({exc})") from exc
    raise InputError(f"{path}: image '{image_id}' is not in the seed file")


def execute(ctx: RunContext, step: int, image_id: str, seed_offset: int) -> str:
    """Run ``step`` for one image; return DONE, SKIPPED or BLOCKED, or raise.

    DONE means the outcome is marked and the image settled (``RunState.finish``); the caller
    settles the other outcomes.
    """
    wf = ctx.spec.ire.workflow
    offsets = ctx.state.done_offsets(image_id, (step, *USES[step]))  # one round trip
    if not wf.force_reprocess and offsets[step] is not None:
        return SKIPPED
    upstream: dict[int, dict] = {}
    for s in USES[step]:
        off = offsets[s]
        if off is not None:
            upstream[s] = ctx.layout.sink(s).read_at(off)
    missing = [s for s in required_inputs(step, wf.steps) if s not in upstream]
    if missing:
        ctx.state.mark_blocked(step, image_id, f"waiting on step(s) {missing}")
        return BLOCKED
    seed = read_seed(ctx, image_id, seed_offset) if step != 3 else {}
    record = input_record(step, seed, upstream)
    outcome = run_step(step, record, ValidText(ctx.client, image_id), ctx.templates,
                       max_pixels=ctx.spec.ire.vlm.max_image_pixels, options=ctx.options)
    offset = ctx.layout.sink(step).append(outcome.record)
    if wf.output_format in ("legacy", "both"):
        ctx.layout.write_legacy(step, image_id, outcome.legacy)
    step_meta = outcome.record.get("meta", {}).get(PIPELINE_NAMES[step], {})
    # Mark done, count tokens and quality, settle: one transaction, one round trip.
    ctx.state.finish(step, image_id, offset, wf.steps, call=step_meta.get("call"), quality=step_meta.get("quality"))
    return DONE


def record_failure(ctx: RunContext, step: int, image_id: str, exc: BaseException, attempts: int) -> str:
    """A failure for good: a line in failures.jsonl and the failed index; the image stays resumable."""
    extra = {}
    raw = getattr(exc, "raw", None)
    if raw:
        extra["raw"] = raw[:4000]
    ctx.layout.record_failure(image_id=image_id, step=step, error=exc, attempts=attempts, **extra)
    ctx.state.mark_failed(step, image_id, f"{type(exc).__name__}: {exc}")
    return FAILED
