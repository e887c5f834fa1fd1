"""Enqueueing: one canvas per image, published in a bounded window.

For the steps an image still needs, the canvas is ``chord(group(step0, step1), chain(step2,
step3))`` or the matching smaller one. Signatures are immutable (``si``): tasks read their
inputs from the sinks through the run index, so results carry only status strings.

The window is the run's in-flight set in Redis (images enqueued and not yet settled): the
producer waits while it holds ``max_inflight`` images, so Redis memory stays bounded by the
window, not by the dataset. Publishing happens before marking an image in flight, so a producer
killed mid-batch can only cause a duplicate message (which the worker's done check absorbs),
never a lost image; an image a worker finished before it was marked is settled right after
the mark, so it cannot stay "in flight" for ever. The producer keeps no per-image state.

With ``vlm.batch`` on, an image's first steps go out alone (``stepdefs.first_wave``): a step
waiting in a provider job must not count towards a chord, so each step task publishes the next
itself (``worker/batchflow.py``), and an image leaves the window while its request waits.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from producer.publish import Publisher
from producer.seed import iter_seed
from worker.constants import seed_ordinal
from worker.keys import run_key
from worker.run import Run
from worker.runstate import RunState
from worker.stepdefs import first_wave

BATCH = 200
#: Images in flight at most, by default. With depth-first scheduling the window no longer decides
#: how soon images finish, only Redis memory (about 1.1 KB per image): it must cover the fleet's
#: concurrency plus a moment's refill, which 1000 does up to ~800 concurrent calls.
DEFAULT_MAX_INFLIGHT = 1000


@dataclass
class EnqueueReport:
    images: int = 0
    enqueued: int = 0
    already_done: int = 0
    already_queued: int = 0


def _batches(run: Run, size: int = BATCH) -> Iterator[list[tuple[int, str, int | None]]]:
    """``(seed offset, image_id, ordinal)`` of the seeded images, a batch at a time."""
    batch: list[tuple[int, str, int | None]] = []
    for offset, rec in iter_seed(run.layout.seed):
        batch.append((offset, rec["image_id"], seed_ordinal(rec)))
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


#: ``on_wait(state, seconds waited so far)``, called on every poll while the window is full.
OnWait = Callable[[RunState, float], None]


def wait_for_window(state: RunState, max_inflight: int, poll: float = 0.5, on_wait: OnWait | None = None) -> int:
    """Block until the run has fewer than ``max_inflight`` images in flight; return how many more
    may go (at least one). Workers drain the window; the reconciler (``producer wait``) keeps a
    stranded image from holding a place in it for ever. ``on_wait`` lets the CLI say why it waits
    (no worker has taken a task yet), since a full window with no worker waits for ever."""
    started = time.monotonic()
    while True:
        room = max_inflight - state.queued_count()
        if room > 0:
            return room
        if on_wait is not None:
            on_wait(state, time.monotonic() - started)
        time.sleep(poll)


def enqueue(
    run: Run,
    *,
    max_inflight: int = DEFAULT_MAX_INFLIGHT,
    progress: Callable[[int], None] | None = None,
    publisher: Publisher | None = None,
    on_wait: OnWait | None = None,
) -> EnqueueReport:
    """Publish the canvases for every seeded image that still has work; return the counts.

    ``publisher`` spreads each batch over publisher processes (``producer/publish.py``); by
    default this process publishes. At most ``max_inflight`` images are in flight at any time,
    whatever the batch size: a batch goes out in chunks that fit the window.
    """
    publisher = publisher or Publisher(1)
    steps = run.spec.ire.workflow.steps
    force = run.spec.ire.workflow.force_reprocess
    # ``reprocess: changed``: every image goes out, its done marks set aside for the tasks to
    # check (worker/execute.py); only the worker can rebuild a step's request from its inputs.
    changed = run.spec.ire.workflow.reprocess == "changed"
    restore = not (force or changed) and run.state.has_prior(steps)
    report = EnqueueReport()
    for batch in _batches(run, BATCH * publisher.processes):
        ids = [image_id for _, image_id, _ in batch]
        ordinals = [o for _, _, o in batch]
        report.images += len(ids)
        queued = run.state.queued_many(ids)
        if restore:  # a `changed` re-run stopped midway: its set-aside records are done again
            for s in steps:
                run.state.restore_prior(s, [image_id for i, image_id in enumerate(ids) if not queued[i]])
        done = {s: run.state.done_many(s, ids, ordinals) for s in steps} if not (force or changed) else {}
        todo: list[tuple[int, str, list[int]]] = []
        for i, (offset, image_id, _) in enumerate(batch):
            if queued[i]:
                report.already_queued += 1
                continue
            remaining = steps if force or changed else [s for s in steps if not done[s][i]]
            if not remaining:
                report.already_done += 1
                continue
            todo.append((offset, image_id, remaining))
        report.enqueued += dispatch(run.state, run.ref, todo, steps, publisher, max_inflight=max_inflight,
                                    force=force, on_wait=on_wait, recheck=changed,
                                    ordinals=dict(zip(ids, ordinals, strict=True)))
        if progress is not None:
            progress(len(batch))
    return report


Todo = list[tuple[int, str, list[int]]]  # (seed offset, image_id, steps to run)


def dispatch(state: RunState, run_ref: str, todo: Todo, steps: list[int], publisher: Publisher, *,
             max_inflight: int, force: bool = False, on_wait: OnWait | None = None, recheck: bool = False,
             ordinals: dict[str, int | None] | None = None) -> int:
    """The one way images go out (``enqueue``, ``retry-failed``): in chunks that fit the window,
    each published before it is marked in flight (``publish_chunk``, which the reconciler uses
    alone: the images it puts back hold their places in the window already). Returns how many.
    ``ordinals``: the images' seed ordinals (``publish_chunk``)."""
    sent = 0
    while todo:
        room = wait_for_window(state, max_inflight, on_wait=on_wait)
        chunk, todo = todo[:room], todo[room:]
        publish_chunk(state, run_ref, chunk, steps, publisher, force=force, recheck=recheck, ordinals=ordinals)
        sent += len(chunk)
    return sent


def batch_mode(state: RunState) -> bool:
    """Whether the run sends its calls as provider batch jobs (``vlm.batch``; the run's meta)."""
    raw = state.r.hget(run_key(state.run_id, "meta"), "batch")
    return bool(raw and json.loads(raw))


def publish_chunk(state: RunState, run_ref: str, chunk: Todo, steps: list[int], publisher: Publisher, *,
                  force: bool = False, recheck: bool = False, ordinals: dict[str, int | None] | None = None) -> None:
    """Clear old outcomes, publish, then mark in flight (in that order: a producer killed between
    the publish and the mark causes at most a duplicate message, never a lost image), then settle
    the images a fast worker finished before the mark. ``recheck``: done marks are set aside
    for a fingerprint check instead of kept (``RunState.clear_attempt``).

    ``ordinals`` (image_id -> seed ordinal): a forced redo clears the images' done bits, the
    in-flight mark keeps the ordinal (the reconciler republishes from it), and the settle
    looks at the bits (an image a fast worker finished before the mark has moved to them).

    The settle after the mark runs only for the images whose last step (``steps[-1]``) holds a
    mark, found in one round trip for the whole chunk (``RunState.settled_in``: its done entry
    or bit, a failed or blocked mark), instead of the settle script image by image (some four
    commands each, and nearly always to find nothing). This drops no image that needs it:

    - The settle script looks at ``steps[-1]`` first and leaves an image untouched when that
      step holds no mark; an image settled in every step has it settled. So the images the
      filter passes over are ones the script would have left in flight at the same moment.
    - The filter reads after the mark is written. A mark a task sets after that read runs the
      settle in the same script (``RunState.finish``, ``fail_and_settle``, ``block_and_settle``),
      sees the image in flight and drops it itself if it was the image's last unsettled step.
      A mark set before the read is seen by it, as the script run after the read would see it.
    - A done mark is an entry in ``done:<step>`` or, once the image has moved to the bitmaps
      (as it settles, or in batches later), its bit; both are read in one MULTI, so a move in
      between cannot hide it.
    - The reconciler's republish and two producers publishing one run go through this same
      function, and the argument is the same for each call: whatever finished before its mark
      shows in its filter, whatever finishes after settles itself. An image the mark puts back in
      flight while it is settled (a second producer, a republish racing the last task) is
      dropped here, as before.
    """
    ordinals = ordinals or {}
    for s in steps:
        ids = [image_id for _, image_id, r in chunk if s in r]
        state.clear_attempt(s, ids, done=force, recheck=recheck, ordinals=[ordinals.get(i) for i in ids])
    if batch_mode(state):  # no chord, no chain: each step task publishes the next (worker/batchflow.py)
        chunk = [(offset, image_id, first_wave(remaining)) for offset, image_id, remaining in chunk]
    publisher.publish([(remaining, run_ref, image_id, offset) for offset, image_id, remaining in chunk])
    state.mark_queued({image_id: offset for offset, image_id, _ in chunk}, ordinals)
    if not steps:
        return
    ids = [image_id for _, image_id, _ in chunk]
    ords = [ordinals.get(i) for i in ids]
    late = [k for k, settled in enumerate(state.settled_in(steps[-1], ids, ords)) if settled]
    if late:
        state.settle_many([ids[k] for k in late], steps, [ords[k] for k in late])
