"""Celery tasks: thin adapters from a message to ``worker.execute``, and the one place that
settles an image-step on every path out of a task.

A message carries ``(run_ref, image_id, seed_offset)`` — ids and an offset, never secrets. Each
task returns a short status string (its result only feeds chord counting); the record itself
goes to the step's sink. A step that fails for good records the failure and returns
``"failed"``; the steps after it find their input missing and return ``"blocked"`` without
calling the model, so the chain stops for that image and every other image goes on.

Every way out of ``run_task`` leaves the image-step in exactly one of three states (invariant
7): **done** (``execute.commit`` wrote the line and marked it), **failed** (a line in
failures.jsonl and the failed mark), or **retrying** (a retry message is published, or the
message stays unacknowledged in Redis and comes back after the visibility timeout). In batch
mode a fourth: **parked** (its request is on disk in the batch ledger, whose coordinator sends
the answer back as a new task: ``worker/batchflow.py``). Which one
is decided by ``_settle_error`` from what went wrong:

- an answer that arrived but could not be written (``Uncommitted``) is retried as a *write*:
  the parsed record travels in the retry's arguments, so the call is not paid for twice;
- a retryable VLM error (429, 5xx, timeout, unparseable answer) is retried with backoff until
  ``vlm.max_retries``, then recorded as failed;
- the infrastructure failing (the results volume full or read-only, Redis unreachable, stalled,
  out of memory or read-only, the run missing from Redis) is nobody's fault in the image: the
  task is retried later, without limit, and nothing is recorded as failed;
- anything else (a bad input, a config error, a bug) is recorded as failed with its reason; if
  recording itself hits the infrastructure, the failure travels in the retry and is recorded
  by a later attempt.

When even the retry cannot be published (Redis refuses writes or is gone), the message must not
be acknowledged: the task waits a bounded time for Redis, tries once more, and otherwise
rejects the message with ``requeue=True``. Redis then either puts it back on the queue, or (when
it refuses that too) keeps it in its unacked set, from where the visibility timeout brings it
back. No path acknowledges a message whose image-step is not settled.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time

import redis
from celery import Task
from celery.exceptions import Reject, Retry

from worker import settings
from worker.app import app
from worker.batchflow import after_step, load_answer, park
from worker.constants import seed_ordinal
from worker.context import RunContext, RunNotInRedis, get_context, state_redis
from worker.errors import PERMANENT, RETRYABLE, ClientError
from worker.execute import (
    SKIPPED,
    Uncommitted,
    commit,
    execute,
    failure_payload,
    load_seed,
    record_failure,
)
from worker.keys import WRITE_PROBE
from worker.parking import AnswerClient, Parked, ParkingClient
from worker.sinks import StaleOffset
from worker.stepdefs import STEP, STEP_NAMES, task_name

log = logging.getLogger("refexp.worker")

BACKOFF_BASE = 2.0
BACKOFF_CAP = 300.0
HEARTBEAT_EVERY = 15.0
#: Seconds a task pauses before it gives an unsettled message back to Redis (``_retry_later``).
REQUEUE_PAUSE = 10.0
_last_beat: dict[tuple[str, str], float] = {}

#: Redis answering with one of these is Redis being unusable (full, loading, a read-only replica,
#: a failover), not a problem of the image.
_REDIS_UNUSABLE = ("OOM", "MISCONF", "READONLY", "LOADING", "BUSY", "TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN",
                   "NOREPLICAS", "EXECABORT")
_REDIS_UNUSABLE_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                          redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError,
                          redis.exceptions.ExecAbortError, redis.exceptions.TryAgainError,
                          redis.exceptions.ClusterDownError)


def is_infra_error(exc: BaseException) -> bool:
    """The infrastructure failed (Redis, the results volume), not the image: retry later, record nothing.

    Any ``OSError`` reaching the task layer comes from our own files on the results volume
    (images that cannot be read are ``InputError`` already, and the clients map their transport
    errors to ``ClientError``): a full or read-only disk, a stale NFS handle, an I/O error, a
    volume not mounted on this host.
    """
    if isinstance(exc, Uncommitted):  # the answer is kept; whether trying again helps is the cause's call
        return is_infra_error(exc.cause)
    if isinstance(exc, StaleOffset):  # the file is fine, the offset is not: retrying cannot help
        return False
    if isinstance(exc, OSError | RunNotInRedis):
        return True
    if isinstance(exc, _REDIS_UNUSABLE_ERRORS):
        return True
    if isinstance(exc, redis.exceptions.ResponseError):  # e.g. an error raised inside a Lua script
        text = str(exc)
        return text.split(" ", 1)[0].upper() in _REDIS_UNUSABLE or "maxmemory" in text
    return False


def retry_countdown(retries: int, retry_after: float | None, visibility_timeout: int) -> float:
    """Exponential backoff with full jitter, at least the server's Retry-After, and always well
    below the visibility timeout (a countdown past it would make Redis redeliver the task)."""
    delay = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**retries)) + 0.5
    if retry_after:
        delay = max(delay, retry_after + random.uniform(0, 1))
    return min(delay, visibility_timeout * 0.5)


def run_task(task: Task, step: int, run_ref: str, image_id: str, seed_offset: int,
             pending: dict | None = None, failure: dict | None = None, vlm_retries: int = 0,
             batch_answer: dict | None = None) -> str:
    """One attempt at one image-step; settles it on every path (see the module docstring).

    ``pending``: an answer an earlier attempt got but could not write; ``failure``: a failure an
    earlier attempt could not record. Either way this attempt only finishes that work.
    ``vlm_retries``: how many retries the VLM's errors have used (``vlm.max_retries`` bounds
    them; retries for the infrastructure are not counted against it).
    ``batch_answer``: batch mode, ``{"job", "at"}``: where the ledger holds the provider's answer
    to this image-step's request (``worker/batchflow.py``).
    """
    ctx: RunContext | None = None
    batch = False
    ordinal: int | None = None
    try:
        ctx = get_context(run_ref)
        batch = ctx.spec.ire.vlm.batch.enabled
        _heartbeat(ctx, task.request.hostname or "unknown")
        if failure is None and pending is None and (task.request.delivery_info or {}).get("redelivered"):
            pending = ctx.layout.read_spool(step, image_id, ctx.spec_hash)  # kept while Redis was unusable
        # The image's seed line: its ordinal (its done bit) for every path, its input for some.
        # A failure or a kept answer (rare paths) finds its line even when a re-seed moved it:
        # without the ordinal it would mark failed, or write again, a step whose bit is set.
        seed = load_seed(ctx, image_id, seed_offset,
                         scan=STEP[step].reads_seed or pending is not None or failure is not None)
        ordinal = seed_ordinal(seed)
        settled_with_mark = True  # DONE, FAILED and BLOCKED settle in the same script that marks them
        # ... but a DONE whose canvas runs a later step of the image after it: that step settles.
        settle = batch or not has_later_step(task)
        if failure is not None:  # recorded unless an earlier attempt (or a duplicate) settled it since
            outcome = ctx.state.outcomes([image_id], [step], {image_id: ordinal})[image_id][step]
            settled_with_mark = outcome is None
            outcome = outcome or record_failure(ctx, step, image_id, failure,
                                                failure.get("attempts", vlm_retries + 1), ordinal)
        elif pending is not None:
            outcome = _commit_pending(ctx, step, image_id, pending, ordinal, settle=settle)
            ctx.layout.drop_spool(step, image_id, ctx.spec_hash)
        elif batch:
            client = (AnswerClient(load_answer(ctx, batch_answer), ctx.client) if batch_answer
                      else ParkingClient(ctx.client))
            try:
                outcome = execute(ctx, step, image_id, seed_offset, client=client, seed=seed)
            except Parked as parked:
                return park(ctx, step, image_id, seed_offset, parked.request, vlm_retries)
        else:
            outcome = execute(ctx, step, image_id, seed_offset, seed=seed, settle=settle)
        if outcome == SKIPPED or not settled_with_mark:
            ctx.state.settle(image_id, ctx.spec.ire.workflow.steps, ordinal)
        if batch:
            after_step(ctx, step, image_id, seed_offset)
        return outcome
    except (Retry, Reject):
        raise
    except Exception as exc:
        try:
            outcome = _settle_error(task, ctx, step, image_id, exc, vlm_retries, ordinal)
        except (Retry, Reject):
            raise
        except Exception:  # a bug in settling itself: still never acknowledge an unsettled image-step
            log.exception("%s step %s: could not settle after %s; trying again later", image_id, step,
                          type(exc).__name__)
            try:
                return _retry_later(task, exc, retry_countdown(5, None, settings.visibility_timeout()), {})
            except (Retry, Reject):
                raise
            except Exception:
                time.sleep(REQUEUE_PAUSE)
                raise Reject(exc, requeue=True) from None
        if batch and ctx is not None:  # recorded as failed for good: the next step blocks on it
            try:
                after_step(ctx, step, image_id, seed_offset)
            except Exception as nexc:  # the retry finds the failure recorded, and publishes again
                return _retry_later(task, nexc, retry_countdown(min(task.request.retries, 5), None,
                                                                settings.visibility_timeout()),
                                    {"failure": {"error": type(exc).__name__, "message": str(exc)[:4000]}})
        return outcome


def _keep(ctx: RunContext, step: int, image_id: str, exc: Uncommitted) -> None:
    """Spool an answer that Redis could not take, for the redelivered message to find: the
    retry that would carry it goes through the same unusable Redis. When the results volume is
    what failed, the retry carries it and the spool write fails too: nothing to do here."""
    if is_infra_error(exc.cause) and not isinstance(exc.cause, OSError):
        with contextlib.suppress(OSError):
            ctx.layout.write_spool(step, image_id, ctx.spec_hash, exc.pending)


def has_later_step(task: Task) -> bool:
    """Whether the canvas this task came in runs another step of its image after it: a chord
    header (``request.chord``: the body is sent once every header part returned) or a chain
    link with more chain to come (``request.chain``: Celery sends the next link when this one
    returns). Both travel in the message (retries and redeliveries keep them), as Celery's
    ``apply_async`` and ``producer/templates.py`` write them. Such a task marks done without
    the settle check (``RunState.finish``)."""
    request = task.request
    return bool(getattr(request, "chord", None)) or bool(getattr(request, "chain", None))


def _commit_pending(ctx: RunContext, step: int, image_id: str, pending: dict, ordinal: int | None = None, *,
                    settle: bool = True) -> str:
    """Write the answer an earlier attempt kept (unless a duplicate delivery wrote it since)."""
    force = ctx.spec.ire.workflow.force_reprocess  # a bit is this run's even then (see ``execute``)
    if ctx.state.is_done(step, image_id, ordinal, bit_only=force):
        return SKIPPED
    try:
        return commit(ctx, step, image_id, pending, ordinal, settle=settle)
    except Exception as exc:
        raise Uncommitted(pending, exc) from exc


def _settle_error(task: Task, ctx: RunContext | None, step: int, image_id: str, exc: Exception,
                  vlm_retries: int, ordinal: int | None = None) -> str:
    """Turn what went wrong into a retry or a recorded failure; never let the image-step go."""
    backoff = min(task.request.retries, 5)
    if is_infra_error(exc):
        cause = exc.cause if isinstance(exc, Uncommitted) else exc
        kept = {"pending": exc.pending} if isinstance(exc, Uncommitted) else {}
        if isinstance(exc, Uncommitted) and ctx is not None:
            _keep(ctx, step, image_id, exc)
        log.warning("%s step %s: %s: %s%s; trying again later", image_id, step, type(cause).__name__, cause,
                    " (the answer is kept: no new call)" if kept else "")
        return _retry_later(task, exc, retry_countdown(backoff, None, settings.visibility_timeout()), kept)
    if ctx is None:  # the run could not be loaded, and not for an infrastructure reason: a bug
        log.error("%s step %s: cannot load the run: %s: %s; trying again later", image_id, step,
                  type(exc).__name__, exc, exc_info=True)
        return _retry_later(task, exc, retry_countdown(backoff, None, settings.visibility_timeout()), {})
    if isinstance(exc, RETRYABLE) and vlm_retries < ctx.spec.ire.vlm.max_retries:
        retry_after = exc.retry_after if isinstance(exc, ClientError) else None
        countdown = retry_countdown(vlm_retries, retry_after, settings.visibility_timeout())
        log.warning("%s step %s attempt %d failed (%s: %s); retry in %.1fs",
                    image_id, step, vlm_retries + 1, type(exc).__name__, exc, countdown)
        # Batch mode: the retry parks a new request (the next job) instead of reading this answer again.
        return _retry_later(task, exc, countdown, {"vlm_retries": vlm_retries + 1, "batch_answer": None})
    if isinstance(exc, Uncommitted):  # writing the answer failed for a reason no retry mends: a bug
        exc = exc.cause if isinstance(exc.cause, Exception) else exc
    expected = isinstance(exc, PERMANENT + RETRYABLE)
    log.log(logging.WARNING if expected else logging.ERROR, "%s step %s failed for good: %s: %s",
            image_id, step, type(exc).__name__, exc, exc_info=not expected)
    payload = {**failure_payload(exc), "attempts": vlm_retries + 1}
    try:
        return record_failure(ctx, step, image_id, payload, payload["attempts"], ordinal)  # marked and settled
    except Exception as rec_exc:
        log.warning("%s step %s: could not record the failure (%s: %s); trying again later",
                    image_id, step, type(rec_exc).__name__, rec_exc)
        return _retry_later(task, rec_exc, retry_countdown(backoff, None, settings.visibility_timeout()),
                            {"failure": payload})


def _retry_later(task: Task, exc: BaseException, countdown: float, kwargs: dict) -> str:
    """Publish a retry of this task in ``countdown`` s (with ``kwargs`` added); if Redis cannot
    take it, keep the message unacknowledged so Redis gives it back later. Never returns."""
    new_kwargs = {**(task.request.kwargs or {}), **kwargs}
    for _ in range(2):
        try:
            raise task.retry(exc=exc, countdown=countdown, kwargs=new_kwargs)
        except Reject as rej:  # the retry could not be published
            log.warning("%s: cannot publish the retry (%s); waiting for Redis", task.request.id, rej.reason)
            if not _wait_for_redis(redis_wait()):
                break
    log.error("%s: the retry cannot be published; the message stays with Redis, which hands it out again "
              "(at the latest after the visibility timeout)", task.request.id)
    # When Redis takes writes again but the publish still failed, the requeue below succeeds and
    # the message comes straight back: pause first, so no fault can turn this into a hot loop.
    time.sleep(REQUEUE_PAUSE)
    raise Reject(exc, requeue=True)


def redis_wait() -> float:
    """How long a task holding an unsettled image-step waits for Redis before giving its message
    back: long enough to ride out a restart or a failover, well inside the visibility timeout."""
    return min(120.0, settings.visibility_timeout() / 4)


def _wait_for_redis(timeout: float) -> bool:
    """Block (at most ``timeout`` s) until Redis answers *and* takes a write (a full Redis answers
    PING but refuses the retry we want to publish). True when it does."""
    deadline = time.monotonic() + timeout
    delay = 0.2
    while True:
        try:
            state_redis().set(WRITE_PROBE, "1", ex=10)
            return True
        except redis.exceptions.RedisError:
            if time.monotonic() + delay > deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _heartbeat(ctx: RunContext, hostname: str) -> None:
    """Tell ``producer status`` this worker is on the run, at most every HEARTBEAT_EVERY s per
    process and run (it shows workers seen in the last two minutes; a beat per task was one more
    Redis round trip on every task)."""
    key = (ctx.run_id, hostname)
    now = time.monotonic()
    last = _last_beat.get(key)
    if last is None or now - last >= HEARTBEAT_EVERY:
        _last_beat[key] = now
        ctx.state.heartbeat(hostname)


def _make(step: int) -> Task:
    name = STEP_NAMES[step]

    # Nothing reads a task's status, and chord counting works without it (StepDef.stores_result):
    # no result is stored (three commands and one key per task less).
    # max_retries=None: Celery must never give up on a retry by itself (it would fail the task and
    # acknowledge the message with the image-step unsettled); ``_settle_error`` bounds the VLM's
    # retries by ``vlm.max_retries`` and lets the infrastructure's go on.
    @app.task(bind=True, name=task_name(step), acks_late=True, ignore_result=not STEP[step].stores_result,
              max_retries=None)
    def step_task(self: Task, run_ref: str, image_id: str, seed_offset: int,
                  pending: dict | None = None, failure: dict | None = None, vlm_retries: int = 0,
                  batch_answer: dict | None = None) -> str:
        return run_task(self, step, run_ref, image_id, seed_offset, pending, failure, vlm_retries, batch_answer)

    step_task.__doc__ = f"Step {step} ({name}) for one image."
    return step_task


STEP_TASKS: dict[int, Task] = {step: _make(step) for step in STEP_NAMES}
