"""Celery tasks: thin adapters from a message to ``worker.execute``.

A message carries ``(run_ref, image_id, seed_offset)`` — ids and an offset, never records or
secrets. Each task returns a short status string (its result only feeds chord counting); the
record itself goes to the step's sink. A step that fails for good records the failure and
returns ``"failed"``; the steps after it find their input missing and return ``"blocked"``
without calling the model, so the chain stops for that image and every other image goes on.
"""

from __future__ import annotations

import logging
import random
import time

import redis
from celery import Task

from worker import settings
from worker.app import app
from worker.constants import RESULTLESS_STEPS, STEP_NAMES, task_name
from worker.context import RunContext, get_context, state_redis
from worker.errors import PERMANENT, RETRYABLE, ClientError
from worker.execute import DONE, execute, record_failure

log = logging.getLogger("refexp.worker")

BACKOFF_BASE = 2.0
BACKOFF_CAP = 300.0
# Run state unreachable (Redis restarting, a failover): nothing is known about the image-step, so
# nothing is recorded as failed; the task waits for Redis (bounded) and is tried again.
INFRA_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
REDIS_WAIT = 60.0
HEARTBEAT_EVERY = 15.0
_last_beat: dict[tuple[str, str], float] = {}


def retry_countdown(retries: int, retry_after: float | None, visibility_timeout: int) -> float:
    """Exponential backoff with full jitter, at least the server's Retry-After, and always well
    below the visibility timeout (a countdown past it would make Redis redeliver the task)."""
    delay = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**retries)) + 0.5
    if retry_after:
        delay = max(delay, retry_after + random.uniform(0, 1))
    return min(delay, visibility_timeout * 0.5)


def run_task(task: Task, step: int, run_ref: str, image_id: str, seed_offset: int) -> str:
    try:
        ctx = get_context(run_ref)
        _heartbeat(ctx, task.request.hostname or "unknown")
        outcome = _attempt(task, ctx, step, image_id, seed_offset)
        if outcome != DONE:  # a DONE step was settled in the same transaction that marked it
            ctx.state.settle(image_id, ctx.spec.ire.workflow.steps)
        return outcome
    except INFRA_ERRORS as exc:
        log.warning("%s step %s: Redis unreachable (%s); retrying the task once it is back", image_id, step, exc)
        _wait_for_redis(REDIS_WAIT)
        countdown = retry_countdown(min(task.request.retries, 3), None, settings.visibility_timeout())
        raise task.retry(exc=exc, countdown=countdown, max_retries=None) from None


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


def _wait_for_redis(timeout: float) -> None:
    """Block (at most ``timeout`` s) until Redis answers: the retry is published through it."""
    deadline = time.monotonic() + timeout
    delay = 0.1
    while time.monotonic() < deadline:
        try:
            state_redis().ping()
            return
        except INFRA_ERRORS:
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def _attempt(task: Task, ctx: RunContext, step: int, image_id: str, seed_offset: int) -> str:
    retries = task.request.retries
    try:
        return execute(ctx, step, image_id, seed_offset)
    except RETRYABLE as exc:
        max_retries = ctx.spec.ire.vlm.max_retries
        if retries < max_retries:
            retry_after = exc.retry_after if isinstance(exc, ClientError) else None
            countdown = retry_countdown(retries, retry_after, settings.visibility_timeout())
            log.warning("%s step %s attempt %d failed (%s: %s); retry in %.1fs",
                        image_id, step, retries + 1, type(exc).__name__, exc, countdown)
            raise task.retry(exc=exc, countdown=countdown, max_retries=max_retries) from None
        return record_failure(ctx, step, image_id, exc, retries + 1)
    except PERMANENT as exc:
        return record_failure(ctx, step, image_id, exc, retries + 1)
    except INFRA_ERRORS:
        raise
    except Exception as exc:  # a bug or an unforeseen input: record it, never lose the image
        log.exception("%s step %s: unexpected error", image_id, step)
        return record_failure(ctx, step, image_id, exc, retries + 1)


def _make(step: int) -> Task:
    name = STEP_NAMES[step]

    # Steps 2 and 3 never head a chord and nothing reads their status: no result to store (one
    # Redis round trip and one key per task less). The chord header (steps 0, 1) must keep its.
    @app.task(bind=True, name=task_name(step), acks_late=True, ignore_result=step in RESULTLESS_STEPS)
    def step_task(self: Task, run_ref: str, image_id: str, seed_offset: int) -> str:
        return run_task(self, step, run_ref, image_id, seed_offset)

    step_task.__doc__ = f"Step {step} ({name}) for one image."
    return step_task


STEP_TASKS: dict[int, Task] = {step: _make(step) for step in STEP_NAMES}
