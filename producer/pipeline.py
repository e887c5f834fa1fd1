"""What ``producer enqueue`` / ``run`` / ``wait`` / ``retry-failed`` do, without the CLI."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from producer.enqueue import DEFAULT_MAX_INFLIGHT, EnqueueReport, enqueue, wait_for_window
from producer.outage import OUTAGE_ERRORS, RedisGaveUp, outage_of
from producer.publish import Publisher, auto_publishers, canvas
from producer.runs import Run, open_run, write_spec_file
from producer.seed import SeedReport, iter_seed, write_seed
from producer.status import RunNotInRedis, status
from worker.clients.factory import endpoint_key
from worker.constants import ALL_STEPS
from worker.layout import Layout
from worker.runstate import RunState
from worker.spec import Spec

Progress = Callable[[str, int, int | None], None]  # (phase, advance, total)


@dataclass
class Submission:
    run: Run
    seed: SeedReport
    enqueue: EnqueueReport
    reindexed: dict[int, int]


def reindex(run_state: RunState, layout: Layout) -> dict[int, int]:
    """Rebuild the done index from the sinks (Redis was flushed, restarted empty, or is new)."""
    counts = {}
    for step in ALL_STEPS:
        sink = layout.sink(step)
        if sink.path.exists():
            counts[step] = run_state.bulk_done(step, sink.latest_offsets().items())
    return counts


def submit(
    spec: Spec,
    client: redis.Redis,
    *,
    max_inflight: int = DEFAULT_MAX_INFLIGHT,
    progress: Progress | None = None,
    publishers: int = 0,
) -> Submission:
    """Validate, seed, store the run, and enqueue every image that still has work.

    ``publishers``: processes publishing canvases (0 = by the run's size, ``auto_publishers``).
    The enqueue rides out Redis outages (``_enqueue_through_outages``).
    """
    run = open_run(spec, client)
    write_spec_file(run)
    run.state.set_meta(seeding=True)  # so that status and wait see the run while it seeds (minutes at 1M images)
    report = SeedReport()
    tick = (lambda e: progress("seed", 1, None)) if progress else None
    try:
        write_seed(run.spec, run.layout.root, report, on_record=tick)
    except BaseException:
        run.state.set_meta(seeding=False)  # a Ctrl-C or an error: nobody is seeding any more
        raise
    for image_id, path, message in report.failures:
        run.layout.record_failure(image_id=image_id, step="seed", error=message, attempts=1, image_path=path)
    reindexed = register(run, report)
    if progress:
        progress("enqueue", 0, report.images)
    last_done = run.state.meta()["done_at_start"]
    with Publisher(publishers or auto_publishers(report.images - last_done)) as publisher:
        enq = _enqueue_through_outages(run, report, client, max_inflight=max_inflight, publisher=publisher,
                                       progress=(lambda n: progress("enqueue", n, report.images)) if progress
                                       else None)
    run.state.set_meta(enqueue_complete=True)
    return Submission(run, report, enq, reindexed)


def register(run: Run, report: SeedReport) -> dict[int, int]:
    """Store the run in Redis (its public spec and meta), first rebuilding the done index from the
    sinks if this Redis has not got it (new, flushed, or restarted empty); returns what was
    reindexed per step."""
    reindexed = {}
    if not run.state.meta().get("indexed"):
        reindexed = reindex(run.state, run.layout)
    steps = run.spec.ire.workflow.steps
    last_done = run.state.counts([steps[-1]])[steps[-1]]["done"]
    run.state.store_spec(run.spec_hash, run.spec.public_dict(), {
        "images": report.images, "steps": steps, "spec_hash": run.spec_hash, "indexed": True,
        "seed_failed": len(report.failures), "enqueued_at": time.time(), "enqueue_complete": False,
        "endpoint": endpoint_key(run.spec.ire.vlm), "done_at_start": last_done,
        "results_dir": str(run.layout.root), "seeding": False,
    })
    return reindexed


#: Enqueue attempts in a row that may fail although Redis answers again in between (a fault
#: that is not an outage must not be retried for ever).
MAX_FAILED_RESUMES = 5


class _RunLost(Exception):
    """Redis answered again after an outage, but without the run: it restarted empty."""


def _enqueue_through_outages(run: Run, report: SeedReport, client: redis.Redis, *, progress, **kwargs
                             ) -> EnqueueReport:
    """``enqueue``, started again whenever publishing gave up on an unreachable Redis, or Redis
    came back from an outage without the run.

    The state client waits out an outage by itself; kombu and the result backend retry a publish
    only briefly. When they give up, wait (with the state client, which notes when Redis stops
    and starts answering) and enqueue again from the start: images published but not yet marked
    in flight are published a second time (the workers' done check absorbs the duplicate), never
    lost. Every batch also checks that Redis still has the run (one round trip per batch: a
    restart is not always seen as an error, since redis-py reconnects an idle connection by
    itself); if Redis restarted empty, the queue and the in-flight marks went with it, so the run
    is registered again (done index rebuilt from the sinks) and enqueued again. A second pass
    counts the images of the first as already queued or done (those marked in flight since the
    restart were published into the new Redis, so they are not published a third time).
    """
    outage = outage_of(client)
    failed_in_a_row = 0

    def tick(n: int) -> None:
        nonlocal failed_in_a_row
        failed_in_a_row = 0
        if outage is not None and not run.state.meta().get("spec_hash"):
            raise _RunLost()
        if progress:
            progress(n)

    while True:
        try:
            return enqueue(run, progress=tick, **kwargs)
        except _RunLost:
            pass
        except OUTAGE_ERRORS as exc:
            if outage is None or isinstance(exc, RedisGaveUp):
                raise
            failed_in_a_row += 1
            if failed_in_a_row > MAX_FAILED_RESUMES:
                raise
            outage.down(exc)
            outage.note(f"enqueue: publishing stopped ({type(exc).__name__}: {exc}); it goes on once Redis answers "
                        "(the images of the batch in hand are published again; the workers skip what is done)")
            client.ping()  # returns once Redis answers (noting it), or raises after the patience
            if run.state.meta().get("spec_hash"):
                continue
        outage.note(f"warning: Redis came back without run {run.run_id} (it restarted empty?); storing the run "
                    "again, rebuilding its index from the results dir, and enqueueing what is not done")
        register(run, report)


def wait(state: RunState, *, timeout: float | None = None, poll: float = 0.5,
         on_status: Callable[[dict], None] | None = None) -> dict:
    """Poll the run until it is finished (or ``timeout`` seconds pass); return the last status.

    ``status`` raises ``RunNotInRedis`` when Redis holds nothing for the run (never did, or
    restarted empty since): there is nothing left to wait for, and polling would never end.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        st = status(state)
        if on_status:
            on_status(st)
        if st["finished"]:
            return st
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"run {state.run_id} not finished after {timeout} s")
        time.sleep(poll)


def retry_failed(run_id: str, layout: Layout, state: RunState, *,
                 max_inflight: int = DEFAULT_MAX_INFLIGHT) -> int:
    """Re-enqueue only the failed image-steps (and the steps after them) of a run."""
    meta = state.meta()
    steps: list[int] = meta.get("steps") or []
    spec_hash = meta.get("spec_hash")
    if not steps or not spec_hash:
        raise RunNotInRedis(run_id)
    first_failed: dict[str, int] = {}
    for s in steps:
        for image_id in state.iter_failed(s):
            first_failed[image_id] = min(first_failed.get(image_id, s), s)
    if not first_failed:
        return 0
    run_ref = f"{run_id}:{spec_hash}"
    n = 0
    state.set_meta(enqueue_complete=False)
    for offset, rec in iter_seed(layout.seed):
        image_id = rec["image_id"]
        if image_id not in first_failed:
            continue
        redo = [s for s in steps if s >= first_failed[image_id] and state.done_offset(s, image_id) is None]
        if not redo:
            continue
        wait_for_window(state, max_inflight, 1)
        for s in redo:
            state.clear_attempt(s, [image_id])
        canvas(redo, run_ref, image_id, offset).apply_async()
        state.mark_queued([image_id], time.time())
        state.settle_many([image_id], steps)  # it may have finished before the mark
        n += 1
    state.set_meta(enqueue_complete=True)
    return n

