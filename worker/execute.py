"""One image-step, end to end, without Celery: skip if done, read inputs, ask, append, index.

The Celery task (``worker.tasks``) is a thin adapter over ``execute``; retries and failure
recording are decided there from the exception ``execute`` lets through.
"""

from __future__ import annotations

import dataclasses
import logging
import re

from worker.clients.base import VLMClient, VLMRequest, VLMResponse
from worker.constants import seed_ordinal
from worker.context import RunContext
from worker.errors import InputError
from worker.images import drop_cached
from worker.runstate import Outcome
from worker.sinks import StaleOffset
from worker.stepdefs import STEP
from worker.steps import expected_fingerprints, fingerprint, input_record, run_step
from worker.steps.converse import structured_ok
from worker.steps.records import PIPELINE_NAMES

DONE, SKIPPED, BLOCKED, FAILED = Outcome.DONE, Outcome.SKIPPED, Outcome.BLOCKED, Outcome.FAILED

log = logging.getLogger("refexp.worker")
_SURROGATE = re.compile("[\ud800-\udfff]")


class ValidText:
    """A client whose answers are valid Unicode: bytes that were not UTF-8 reach us as lone
    surrogates, which no sink can encode; they become U+FFFD (and are logged, not fatal)."""

    def __init__(self, inner: VLMClient, image_id: str):
        self.inner, self.image_id, self.name = inner, image_id, inner.name

    @property
    def structured_output(self) -> bool:
        return bool(getattr(self.inner, "structured_output", False))

    def generate(self, request: VLMRequest) -> VLMResponse:
        response = self.inner.generate(request)
        text, n = _SURROGATE.subn("\ufffd", response.text or "")
        if not n:
            return response
        log.warning("%s %s: the answer was not valid UTF-8; %d character(s) replaced", self.image_id,
                    request.step, n)
        return dataclasses.replace(response, text=text)


def read_seed(ctx: RunContext, image_id: str, offset: int) -> dict:
    """The seed record at ``offset``; falls back to a scan if the seed file was rewritten (a
    resume with more images). An ``OSError`` is the results volume failing, and goes up as
    such (the task retries); an image that is in no seed line is this image's failure."""
    seed = ctx.layout.seed
    try:
        rec = seed.read_at(offset)
        if rec.get("image_id") == image_id:
            return rec
    except ValueError:
        pass
    for _, rec in seed.scan():
        if rec.get("image_id") == image_id:
            return rec
    raise InputError(f"{seed.path}: image '{image_id}' is not in the seed file")


def load_seed(ctx: RunContext, image_id: str, offset: int, *, scan: bool = True) -> dict | None:
    """``read_seed``, or None when the image is in no seed line. Every task reads its image's
    seed line once: it holds the image's ordinal (its done bit, ``seed_ordinal``) besides the
    input of the steps that start from the seed. ``scan=False`` (a step that needs only the
    ordinal): a line at ``offset`` that is not the image's (the seed was rewritten since the
    message went out) gives None instead of a scan of the whole seed; the image then keeps its
    offsets in the index as a seed without ordinals does."""
    if not scan:
        try:
            rec = ctx.layout.seed.read_at(offset)
        except ValueError:
            return None
        return rec if rec.get("image_id") == image_id else None
    try:
        return read_seed(ctx, image_id, offset)
    except InputError:
        return None


def read_upstream(ctx: RunContext, step: int, image_id: str, offset: int) -> dict | None:
    """Step ``step``'s record of the image at ``offset``, as the done index says. A finalize
    may have merged the part that offset was in (``StaleOffset``): the record is then found
    again in the sink (``JsonlSink.find_latest``) and the index pointed at it, instead of the
    task retrying a read that can never succeed. None if the sink no longer holds a record (the
    done entry is dropped, so the step is redone by the next enqueue)."""
    sink = ctx.layout.sink(step)
    try:
        return sink.read_at(offset)
    except StaleOffset:
        found = sink.find_latest(image_id)
    log.info("%s step %d: offset %d was merged by a finalize; the record is %s", image_id, step, offset,
             f"at {found[0]} now" if found else "gone")
    ctx.state.repoint_done(step, image_id, found[0] if found else None)
    return found[1] if found else None


class Uncommitted(Exception):
    """The answer arrived but could not be written (disk or Redis unusable).

    Carries what ``commit`` needs to finish later without paying for the call again: the task
    layer puts ``pending`` in the retry's arguments. ``cause`` is the error that stopped it.
    """

    def __init__(self, pending: dict, cause: BaseException):
        super().__init__(f"answer kept for a later write: {type(cause).__name__}: {cause}")
        self.pending = pending
        self.cause = cause


def execute(ctx: RunContext, step: int, image_id: str, seed_offset: int, *, client: VLMClient | None = None,
            seed: dict | None = None, settle: bool = True) -> str:
    """Run ``step`` for one image; return DONE, SKIPPED or BLOCKED, or raise.

    ``client``: the client in place of the run's online one (batch mode: ``worker.parking``'s
    ``ParkingClient``, which raises ``Parked`` with the built request, or ``AnswerClient``).
    ``seed``: the image's seed line as the caller read it (``load_seed``); read here otherwise.
    ``settle=False``: a later step of the image's canvas runs after this one, and settles it
    (``RunState.finish``): a DONE is marked without the settle check.

    DONE and BLOCKED mean the outcome is marked and the image settled (a DONE with ``settle``
    only), in one round trip; the
    caller settles a SKIPPED image-step. When the call succeeded but its write failed, raises
    ``Uncommitted`` with the answer, so the write can be retried without a second call.
    """
    wf = ctx.spec.ire.workflow
    d = STEP[step]
    changed = wf.reprocess == "changed"
    if seed is None:
        seed = load_seed(ctx, image_id, seed_offset, scan=d.reads_seed)
    ordinal = seed_ordinal(seed)
    # One round trip: the done index (offsets, and the bits of an image that left the window done
    # in every step), and with ``reprocess: changed`` the record set aside at enqueue.
    offsets, bits, prior = ctx.state.lookup(image_id, (step, *d.reads), step if changed else None, ordinal)
    # A bit: a late duplicate of a settled image's task (or a step added since). Under
    # ``reprocess: all`` too: the producer clears an image's bits before it publishes it, so a
    # bit set now was set by this run, and a redo would leave the image a bit and an entry.
    if (not wf.force_reprocess and offsets[step] is not None) or step in bits:
        return SKIPPED
    upstream: dict[int, dict] = {}
    for s in d.reads:
        off = offsets[s]
        if off is not None:
            rec = read_upstream(ctx, s, image_id, off)
            if rec is not None:
                upstream[s] = rec
        elif s in bits:  # done with its offset dropped: the sink is the index (binary search once merged)
            found = ctx.layout.sink(s).find_latest(image_id)
            if found is not None:
                upstream[s] = found[1]
    missing = [s for s in d.required(wf.steps) if s not in upstream]
    if missing and ordinal is None and seed is None and not d.reads_seed:
        # The line at the message's offset is not the image's (a re-seed moved it) and the
        # upstream is not in the hashes: the image may have settled into the bits (a late
        # duplicate). Only here is the seed scanned for its line, to look at its bits before
        # calling it blocked.
        found = load_seed(ctx, image_id, seed_offset)
        if seed_ordinal(found) is not None:
            return execute(ctx, step, image_id, seed_offset, client=client, seed=found)
    if missing:
        ctx.state.block_and_settle(step, image_id, f"waiting on step(s) {missing}", wf.steps, ordinal)
        if changed:
            ctx.state.drop_prior(step, image_id)
        return BLOCKED
    if d.reads_seed and seed is None:
        raise InputError(f"{ctx.layout.seed.path}: image '{image_id}' is not in the seed file")
    record = input_record(step, seed if d.reads_seed and seed is not None else {}, upstream)
    if prior is not None and keep_if_current(ctx, step, image_id, prior, record, ordinal, settle=settle):
        return DONE
    outcome = run_step(step, record, ValidText(client or ctx.client, image_id), ctx.prompts,
                       max_pixels=ctx.spec.ire.vlm.max_image_pixels, options=ctx.options)
    used_batch = getattr(client, "used_batch", None)
    if used_batch is not None:  # its tokens are billed at the batch price
        from worker.batchflow import batch_usage

        outcome.record = batch_usage(outcome.record, step, used_batch)
    pending = {"record": outcome.record, "legacy": outcome.legacy}
    try:
        return commit(ctx, step, image_id, pending, ordinal, settle=settle)
    except Exception as exc:
        raise Uncommitted(pending, exc) from exc


def keep_if_current(ctx: RunContext, step: int, image_id: str, prior: int, record: dict,
                    ordinal: int | None = None, *, settle: bool = True) -> bool:
    """``reprocess: changed``: keep the record set aside at enqueue (mark it done again, no
    call) when its fingerprint is what the current spec would send for ``record`` (the step's
    input as it is now: upstream steps of this run already kept or redone). A record without a
    fingerprint (written before they existed), gone, or unreadable is redone."""
    sink = ctx.layout.sink(step)
    try:
        old = sink.read_at(prior)
    except StaleOffset:  # a finalize merged its part: find it again
        found = sink.find_latest(image_id)
        if found is None:
            return False
        prior, old = found
    except ValueError:
        return False
    have = fingerprint.of_record(old, step) if old.get("image_id") == image_id else None
    if have is None:
        return False
    want = expected_fingerprints(step, record, ctx.prompts, ctx.options,
                                 structured=structured_ok(ctx.client, ctx.options),
                                 fell_back=fingerprint.fell_back(old, step))
    if have not in want:
        log.debug("%s step %d: fingerprint %s is stale (now %s); redoing it", image_id, step, have, sorted(want))
        return False
    settled = ctx.state.finish(step, image_id, prior, ctx.spec.ire.workflow.steps, ordinal=ordinal, settle=settle)
    ctx.state.drop_prior(step, image_id)
    if settled:
        _drop_image_cache(ctx, record)
    return True


def commit(ctx: RunContext, step: int, image_id: str, pending: dict, ordinal: int | None = None, *,
           settle: bool = True) -> str:
    """Write a finished step's answer and mark it done, in the order that keeps "done" true.

    The legacy file first (when the output format asks for one), then the sink line (written in
    full and verified by ``JsonlSink.append``), and only then the done mark, usage and quality
    counters and the settle check, in one Redis script (``RunState.finish``; the mark and the
    counters alone with ``settle=False``, when a later step of the canvas settles the image). A
    failure at any point leaves the
    image-step not done, and ``commit`` can simply run again: the legacy file is replaced
    whole, and a second sink line for the image is absorbed by readers (last line wins).
    """
    wf = ctx.spec.ire.workflow
    record = pending["record"]
    if wf.output_format in ("legacy", "both"):
        ctx.layout.write_legacy(step, image_id, pending["legacy"])
    offset = ctx.layout.sink(step).append(record)
    step_meta = record.get("meta", {}).get(PIPELINE_NAMES[step], {})
    settled = ctx.state.finish(step, image_id, offset, wf.steps, call=step_meta.get("call"),
                               quality=step_meta.get("quality"), ordinal=ordinal, settle=settle)
    if wf.reprocess == "changed":
        ctx.state.drop_prior(step, image_id)  # the record set aside is superseded
    if settled:
        _drop_image_cache(ctx, record)
    return DONE


def _drop_image_cache(ctx: RunContext, record: dict) -> None:
    """The image has settled: its converted copies and its content-hash file go (the cache
    holds the images in flight, not every image of the run)."""
    if ctx.options.image_cache_dir and record.get("image_path"):
        drop_cached(ctx.options.image_cache_dir, str(record["image_path"]))


def record_failure(ctx: RunContext, step: int, image_id: str, exc: BaseException | dict, attempts: int,
                   ordinal: int | None = None) -> str:
    """A failure for good: a line in failures.jsonl, then the failed mark and the settle check
    (one round trip); the image stays resumable.

    ``exc`` may be the failure as ``failure_payload`` made it, when recording is retried.
    """
    payload = exc if isinstance(exc, dict) else failure_payload(exc)
    payload = {k: v for k, v in payload.items() if k != "attempts"}
    extra = {"raw": payload["raw"]} if payload.get("raw") else {}
    ctx.layout.record_failure(image_id=image_id, step=step, error=payload["message"], kind=payload["error"],
                              attempts=attempts, **extra)
    ctx.state.fail_and_settle(step, image_id, f"{payload['error']}: {payload['message']}",
                              ctx.spec.ire.workflow.steps, ordinal)
    if ctx.spec.ire.workflow.reprocess == "changed":
        ctx.state.drop_prior(step, image_id)  # failed now; the old record stays in the sink, not done
    return FAILED


def failure_payload(exc: BaseException) -> dict:
    """What ``record_failure`` writes about ``exc``, as plain JSON (it may travel in a retry)."""
    payload = {"error": type(exc).__name__, "message": str(exc)[:4000]}
    raw = getattr(exc, "raw", None)
    if raw:
        payload["raw"] = raw[:4000]
    return payload
