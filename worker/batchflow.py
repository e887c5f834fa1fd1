"""Batch mode in a step task: park a request, take an answer back, and publish the next step.

How an image moves (``vlm.batch.enabled``; docs/architecture.md, "Batch mode"):

1. The producer publishes each image's first steps alone (``stepdefs.first_wave``), with no
   chord or chain.
2. The step task runs the step as online, with ``parking.ParkingClient``: the request it would
   have sent is appended to the ledger (``park``), the image leaves the in-flight set (it holds
   no place in the producer's window while it waits) and the message is acknowledged. Nothing
   waits in a thread or in Redis.
3. The coordinator (``worker/coordinator.py``) gathers parked requests into provider jobs,
   submits and polls them, writes each finished job's answers into the ledger and publishes one
   *answer task* per request: the same step task with ``batch_answer={"job", "at"}``.
4. The answer task runs the step again with ``parking.AnswerClient`` (the provider's answer for
   the first call, online for a re-ask or a truncation retry), and from there everything is the
   online path: parse, sink, legacy file, quality and token counters, retries, failures.
5. Every batch-mode task that settles its image-step (done, skipped, failed, blocked) publishes
   the image's next step itself (``after_step``): after a head step, once every head step of
   the run has an outcome (the Redis marks are read after this task's own mark, so of two head
   steps settling together at least one sees both); after step 2, step 3. A duplicate (both saw
   both) parks twice and is dropped by the coordinator, which keys requests by step and image.
"""

from __future__ import annotations

import json
import logging
import time

from worker.clients.base import VLMRequest, VLMResponse
from worker.context import RunContext
from worker.keys import BATCH_RUNS, run_key
from worker.ledger import Ledger
from worker.parking import answer_from_json, request_to_json
from worker.stepdefs import STEP, next_step, task_name

log = logging.getLogger("refexp.worker")

PARKED = "parked"


def ledger(ctx: RunContext) -> Ledger:
    return Ledger(ctx.spec.results_dir)


def park(ctx: RunContext, step: int, image_id: str, seed_offset: int, request: VLMRequest,
         vlm_retries: int) -> str:
    """Keep the request for a batch job and let the image out of the in-flight set. The ledger
    line is on disk before the message is acknowledged (an ``OSError`` or a Redis error goes up:
    the task is retried, and parks again)."""
    ledger(ctx).park(step, {"key": image_id, "image_id": image_id, "seed_offset": seed_offset,
                            "run_ref": ctx.ref, "step": step, "vlm_retries": vlm_retries, "t": time.time(),
                            "request": request_to_json(request)})
    pipe = ctx.state.r.pipeline(transaction=False)
    pipe.sadd(BATCH_RUNS, ctx.ref)
    pipe.incr(run_key(ctx.run_id, "batch", "gathering"))
    pipe.hdel(run_key(ctx.run_id, "queued"), image_id)
    pipe.execute()
    return PARKED


def load_answer(ctx: RunContext, batch_answer: dict) -> VLMResponse | Exception:
    """The answer a released job holds for this request (its ledger line)."""
    data = ledger(ctx).answer_at(str(batch_answer["job"]), int(batch_answer["at"]))
    return answer_from_json(data)


def batch_usage(record: dict, step: int, response: VLMResponse) -> dict:
    """Add to the record's call meta the tokens of the batch answer (billed at the batch price,
    ``vlm.prices.batch_factor``): ``batch_input_tokens``, ``batch_output_tokens`` and
    ``batch_thinking_tokens``; the rest of the call's tokens (online re-asks) are online-priced."""
    from worker.steps.records import PIPELINE_NAMES, canonical

    usage = response.usage or {}
    name = PIPELINE_NAMES[step]
    meta = dict(record.get("meta") or {})
    call = dict((meta.get(name) or {}).get("call") or {})
    if not call:
        return record
    call["batch_input_tokens"] = int(usage.get("input_tokens", usage.get("prompt_tokens")) or 0)
    call["batch_output_tokens"] = int(usage.get("output_tokens", usage.get("completion_tokens")) or 0)
    if usage.get("thinking_tokens"):
        call["batch_thinking_tokens"] = int(usage["thinking_tokens"])
    meta[name] = {**meta[name], "call": call}
    return canonical({**record, "meta": meta})


def publish_step(run_ref: str, step: int, image_id: str, seed_offset: int, **kwargs: object) -> None:
    """Send one step task for one image (by name, with its step's priority; no result stored)."""
    from worker.app import app

    app.signature(task_name(step), args=(run_ref, image_id, seed_offset), kwargs=kwargs, immutable=True,
                  options={"ignore_result": True, "priority": STEP[step].priority}).apply_async()


def after_step(ctx: RunContext, step: int, image_id: str, seed_offset: int) -> int | None:
    """Publish the image's next step if it is ready (see the module docstring); returns it.

    When nothing is published the image leaves the in-flight set: it is either settled (the
    settle script dropped it already) or waiting on a head step that is parked, whose answer
    task publishes the next step. A published step marks the image in flight first."""
    steps = ctx.spec.ire.workflow.steps
    nxt, wait_for = next_step(step, steps)
    if nxt is not None and wait_for:
        outcomes = ctx.state.outcomes([image_id], list(wait_for))[image_id]
        if any(outcomes[s] is None for s in wait_for):
            nxt = None
    if nxt is None:
        ctx.state.unqueue([image_id])
        return None
    ctx.state.mark_queued({image_id: seed_offset})
    publish_step(ctx.ref, nxt, image_id, seed_offset)
    return nxt


def jobs_summary(r, run_id: str) -> dict[str, dict]:
    """``job id -> {step, n, state, submitted_at, finished_at}`` as the coordinator keeps it in Redis."""
    return {k.decode(): json.loads(v) for k, v in r.hgetall(run_key(run_id, "batch", "jobs")).items()}
