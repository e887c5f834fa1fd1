"""What ``producer enqueue`` / ``run`` / ``wait`` / ``retry-failed`` do, without the CLI."""

from __future__ import annotations

import contextlib
import heapq
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from itertools import groupby
from operator import itemgetter
from pathlib import Path

import redis

from producer.binding import inputs_of
from producer.enqueue import DEFAULT_MAX_INFLIGHT, EnqueueReport, OnWait, Todo, dispatch, enqueue
from producer.extsort import CHUNK, SortedPairs, last_per_key
from producer.finalize import finalize_lock
from producer.guard import Claim, ResultsLock, claim
from producer.outage import OUTAGE_ERRORS, RedisGaveUp, outage_of, patient_client
from producer.publish import Publisher, auto_publishers
from producer.runs import describe_redis, open_run, prepare, update_run_file, write_spec_file
from producer.seed import SeedReport, iter_seed, write_seed
from producer.status import RunNotInRedis, status
from worker.budget import endpoint_key
from worker.constants import SEED_FILE, seed_ordinal
from worker.keys import BATCH_RUNS
from worker.layout import Layout
from worker.reindex import IndexRebuild
from worker.run import Run
from worker.runstate import RunRef, RunState
from worker.sinks import SinkReader, loads
from worker.spec import Spec
from worker.stepdefs import ALL_STEPS

Progress = Callable[[str, int, int | None], None]  # (phase, advance, total)


@dataclass
class Submission:
    run: Run
    seed: SeedReport
    enqueue: EnqueueReport
    reindexed: dict[int, int]
    notes: list[str] = field(default_factory=list)  # warnings for the user (another fleet, a changed seed)


def reindex(run_state: RunState, layout: Layout, steps: list[int] | None = None) -> dict[int, int]:
    """Rebuild the done index from the sinks (Redis was flushed, restarted empty, or is new; or a
    finalize merged the sinks, so the offsets it held are stale). Sorted externally, so the
    producer holds a chunk of pairs at a time, not every image.

    ``steps``: the run's steps. An image with a record in each of them and an ordinal in the
    seed becomes bits (``bits:<step>``), as if it had settled; every other record a done entry
    (its offset). Without ``steps`` every record is a done entry (``unpack_bits``).

    Holds the finalize lock: no finalize merges the sinks while they are read, and a killed
    reindex's spill folder (``.reindex-*``) is removed by the next finalize (``remove_stale_temps``)."""
    with finalize_lock(layout):
        return _reindex(run_state, layout, list(steps or []))


def _reindex(run_state: RunState, layout: Layout, steps: list[int]) -> dict[int, int]:
    # Every step, even one whose sink is gone (a step dir deleted to redo it): the index is
    # replaced, so no entry survives whose record is not in the sink any more.
    rebuild = run_state.rebuild_index(ALL_STEPS)  # before the sinks are read: no bit is set meanwhile
    try:
        written = _rebuild(rebuild, layout, steps)
    except BaseException:
        with contextlib.suppress(redis.RedisError):
            rebuild.abort()
        raise
    run_state.set_meta(sink_generations=sink_generations(layout))
    return written


def _rebuild(rebuild: IndexRebuild, layout: Layout, steps: list[int]) -> dict[int, int]:
    """The merge of ``_reindex``: every sink's last record per image and the seed's ordinals,
    by image id, into ``rebuild``; returns the entries and bits written per existing sink."""
    exists = {s: layout.sink(s).exists() for s in ALL_STEPS}
    chunk = max(1, CHUNK // (len(ALL_STEPS) + 1))  # the sorts are built side by side
    with tempfile.TemporaryDirectory(prefix=".reindex-", dir=layout.root) as tmp, ExitStack() as stack:
        streams = []
        readers = {}
        ordinals: SortedPairs | None = None
        for step in ALL_STEPS:
            sink = layout.sink(step)
            pairs = stack.enter_context(SortedPairs(((str(rec["image_id"]), off) for off, rec in sink.scan()),
                                                    Path(tmp), chunk=chunk))
            readers[step] = stack.enter_context(sink.reader())
            streams.append(_tagged(last_per_key(pairs), step))
        if steps and layout.seed.exists():
            seeded = ((str(rec["image_id"]), seed_ordinal(rec)) for _, rec in iter_seed(layout.seed))
            ordinals = stack.enter_context(SortedPairs(((i, o) for i, o in seeded if o is not None),
                                                       Path(tmp), chunk=chunk))
            streams.append(_tagged(last_per_key(ordinals), -1))
        for image_id, group in groupby(heapq.merge(*streams), key=itemgetter(0)):
            found: dict[int, int] = {}
            ordinal = None
            for _, s, v in group:
                if s < 0:
                    ordinal = v
                else:
                    found[s] = v
            as_bits = ordinal is not None and bool(steps) and all(s in found for s in steps)
            for s, offset in found.items():
                if as_bits and s in steps:
                    rebuild.bit(s, ordinal)
                else:
                    rebuild.done(s, image_id, offset)
        join = None if ordinals is None else (lambda pairs: _join_ordinals(pairs, ordinals, Path(tmp), chunk))
        written = rebuild.commit({s: (lambda i, off, r=readers[s]: _record_at(r, i, off)) for s in ALL_STEPS}, join)
    return {s: n for s, n in written.items() if exists[s]}


def _join_ordinals(pairs: Iterable[tuple[str, int]], ordinals: SortedPairs, workdir: Path, chunk: int
                   ) -> Iterator[tuple[str, int, int | None]]:
    """``(image_id, offset, ordinal)`` for each of ``pairs`` (done entries the rebuild did not
    write), the ordinal from the seed's sorted ``(image_id, ordinal)``: a merge by id, both
    sorted externally, so the carry-over of ``IndexRebuild.commit`` stays in bounded memory."""
    with SortedPairs(pairs, workdir, chunk=chunk) as entries:
        merged = heapq.merge(_tagged(entries, 0), _tagged(last_per_key(ordinals), -1))
        for image_id, group in groupby(merged, key=itemgetter(0)):
            ordinal, offsets = None, []
            for _, tag, v in group:
                if tag < 0:
                    ordinal = v
                else:
                    offsets.append(v)
            for offset in offsets:
                yield image_id, offset, ordinal


def _tagged(pairs: Iterable[tuple[str, int]], tag: int) -> Iterator[tuple[str, int, int]]:
    """``(key, tag, value)``: a sorted stream marked with its source, for a merge by key."""
    for key, value in pairs:
        yield key, tag, value


def unpack_bits(run_state: RunState, layout: Layout) -> dict[int, int]:
    """Turn the bitmaps back into done entries with offsets (one reindex without ``steps``).

    For an enqueue that must know the record offsets of images done in every step: a
    ``reprocess: changed`` re-run sets each published image's records aside for a check, and a
    run given steps it did not have reads the old steps' records as upstream. Redis then holds
    an offset per image-step again (O(N), ~80 B each) until the images settle anew and move
    back to the bitmaps."""
    return reindex(run_state, layout, None)


def _record_at(reader: SinkReader, image_id: str, offset: int) -> bool:
    """Whether the sink holds ``image_id``'s record at ``offset`` (a done mark set during a reindex)."""
    try:
        record = loads(reader.read_line_at(offset))
    except (OSError, ValueError):  # StaleOffset, a file gone, a line that is not one
        return False
    return isinstance(record, dict) and str(record.get("image_id")) == image_id


def sink_generations(layout: Layout) -> dict[str, int]:
    """Each merged step sink's generation (``JsonlSink.main_generation``); a finalize changes it."""
    gens = {str(s): layout.sink(s).main_generation() for s in ALL_STEPS}
    return {s: g for s, g in gens.items() if g}


def index_is_current(meta: dict, layout: Layout) -> bool:
    """Whether the done index was built for the sinks as they are (no finalize merged them since)."""
    return bool(meta.get("indexed")) and (meta.get("sink_generations") or {}) == sink_generations(layout)


def submit(
    spec: Spec,
    client: redis.Redis,
    *,
    max_inflight: int = DEFAULT_MAX_INFLIGHT,
    progress: Progress | None = None,
    publishers: int = 0,
    held: Claim | None = None,
    on_seeded: Callable[[SeedReport, list[str]], None] | None = None,
    on_wait: OnWait | None = None,
) -> Submission:
    """Validate, seed, store the run, and enqueue every image that still has work.

    ``held``: the results dir as this producer holds it (``producer.guard.claim``), when the
    caller keeps holding it afterwards (``--wait``); without it, submit holds the dir itself
    while it runs (and raises ``guard.Busy`` / ``InputsChanged`` like ``claim``).
    ``publishers``: processes publishing canvases (0 = by the run's size, ``auto_publishers``).
    ``on_seeded(report, notes)`` runs once the seed is written, before anything is published
    (the CLI prints the seed summary then, not after a publish that may wait on the window);
    ``on_wait`` is called while the window is full (``enqueue.wait_for_window``).
    The enqueue rides out Redis outages (``_enqueue_through_outages``).
    """
    if held is None:
        spec, layout = prepare(spec)
        with claim(layout, client, spec, command="enqueue") as held:
            return submit(spec, client, max_inflight=max_inflight, progress=progress, publishers=publishers,
                          held=held, on_seeded=on_seeded, on_wait=on_wait)
    run = open_run(spec, client)
    notes = [] if run.state.meta().get("spec_hash") else other_fleet_notes(held, client)
    write_spec_file(run)
    run.state.set_meta(seeding=True)  # so that status and wait see the run while it seeds (minutes at 1M images)
    report = SeedReport()
    tick = (lambda e: progress("seed", 1, None)) if progress else None
    for stale in run.layout.root.glob(f".{SEED_FILE}.*.tmp"):
        stale.unlink(missing_ok=True)  # a killed producer's half seed (we hold the dir: no one else seeds)
    try:
        write_seed(run.spec, run.layout.root, report, on_record=tick)
    except BaseException:
        run.state.set_meta(seeding=False)  # a Ctrl-C or an error: nobody is seeding any more
        raise
    for image_id, path, message in report.failures:
        run.layout.record_failure(image_id=image_id, step="seed", error=message, attempts=1, image_path=path)
    steps = run.spec.ire.workflow.steps
    seed = {"images": report.images, "sha256": report.sha256}
    before = held.bound.get("seed")
    if isinstance(before, dict) and before.get("sha256") not in (None, report.sha256):
        notes.append(f"the seed changed since the last enqueue ({before.get('images')} -> {report.images} images; "
                     "same inputs, so this is a resume: done image-steps are kept)")
    if on_seeded is not None:
        on_seeded(report, notes)
    # The binding: from now on this results dir belongs to these inputs (producer/binding.py).
    update_run_file(run.layout, inputs=inputs_of(run.spec), steps=steps, seed=seed)
    reindexed = register(run, report)
    if progress:
        progress("enqueue", 0, report.images)
    last_done = run.state.meta()["done_at_start"]
    with Publisher(publishers or auto_publishers(report.images - last_done)) as publisher:
        enq = _enqueue_through_outages(run, report, client, max_inflight=max_inflight, publisher=publisher,
                                       on_wait=on_wait,
                                       progress=(lambda n: progress("enqueue", n, report.images)) if progress
                                       else None)
    run.state.set_meta(enqueue_complete=True)
    return Submission(run, report, enq, reindexed, notes)


def register(run: Run, report: SeedReport) -> dict[int, int]:
    """Store the run in Redis (its public spec and meta), first rebuilding the done index from the
    sinks if this Redis has not got it (new, flushed, or restarted empty); returns what was
    reindexed per step."""
    reindexed = {}
    meta = run.state.meta()
    steps = run.spec.ire.workflow.steps
    # The enqueue needs the record offsets of images done in every step when it sets their
    # records aside for a check (`changed`) or gives them a step they had not (its upstream):
    # their bits become done entries again (``unpack_bits``), and move back as they settle.
    wants_offsets = (run.spec.ire.workflow.reprocess == "changed"
                     or bool(set(steps) - set(meta.get("steps") or steps)))
    # A seed numbered afresh (its file was deleted) leaves the run's bits at ordinals other
    # images may hold now: they are rebuilt from the sinks at the new ordinals.
    renumbered = report.renumbered and run.state.has_bits(ALL_STEPS)
    if renumbered or not index_is_current(meta, run.layout):
        reindexed = reindex(run.state, run.layout, None if wants_offsets else steps)
    elif wants_offsets and run.state.has_bits(ALL_STEPS):
        reindexed = unpack_bits(run.state, run.layout)
    # `changed` and `all` publish every image again (its done marks set aside or cleared): the
    # run's progress starts from nothing, not from the records already there.
    last_done = 0 if run.spec.ire.workflow.reprocess != "missing" else run.state.counts([steps[-1]])[steps[-1]]["done"]
    run.state.store_spec(run.spec_hash, run.spec.public_dict(), {
        "images": report.images, "steps": steps, "spec_hash": run.spec_hash, "indexed": True,
        "seed_failed": len(report.failures), "enqueued_at": time.time(), "enqueue_complete": False,
        "endpoint": endpoint_key(run.spec.ire.vlm), "done_at_start": last_done,
        "results_dir": str(run.layout.root), "seeding": False, "batch": run.spec.ire.vlm.batch.enabled,
    }, prompts=run.templates)
    if run.spec.ire.vlm.batch.enabled:  # the coordinator looks after the run's jobs (worker/coordinator.py)
        run.state.r.sadd(BATCH_RUNS, run.ref)
    return reindexed


def other_fleet_notes(held: Claim, client: redis.Redis) -> list[str]:
    """A warning when this Redis knows nothing of a run the last producer sent through a fleet.

    The lock stops two live producers, but not a fleet still working after its producer left
    (``enqueue`` without ``--wait``). Rebuilding the index from the sinks is right, yet the images
    that fleet has in flight will be called a second time. A ``producer run``'s Redis and worker
    died with it, so it leaves nothing in flight.
    """
    prev = held.previous
    if not prev or prev.get("command") == "run":
        return []
    return [f"Redis {describe_redis(client)} holds no state for run {held.me.run_id}, last enqueued by "
            f"`producer {prev.get('command')}` (pid {prev.get('pid')} on {prev.get('host')}, {prev.get('started')}) "
            f"through Redis {prev.get('redis')}. The done image-steps are re-indexed from the sinks. If a fleet "
            "is still working on this results dir through that Redis, stop it: the images it has in flight "
            "will be called a second time."]


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
         on_status: Callable[[dict], None] | None = None,
         until: Callable[[dict], bool] | None = None, reconcile: bool = True) -> dict:
    """Poll the run until it is finished, or ``until(status)`` says stop (or ``timeout``
    seconds pass); return the last status.

    While waiting, the reconciler (``producer/reconcile.py``) puts back images that nothing will
    ever move again, so a fault no task could see cannot hold the run open for ever.
    ``status`` raises ``RunNotInRedis`` when Redis holds nothing for the run (never did, or
    restarted empty since): there is nothing left to wait for, and polling would never end.
    """
    from producer.reconcile import Reconciler

    reconciler = Reconciler(state, broker_client(state)) if reconcile else None
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        st = status(state)
        if on_status:
            on_status(st)
        if st["finished"]:
            # The moves to the bitmaps still pending (fewer than TALLY_FOLD images') go now: a
            # finished run's index is all bits (plus its failed and blocked images' offsets).
            state.fold([int(s) for s in st["steps"]])
            return st
        if until is not None and until(st):
            return st
        if reconciler is not None:
            reconciler.tick()
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"run {state.run_id} not finished after {timeout} s")
        time.sleep(poll)


def broker_client(state: RunState | None = None) -> redis.Redis:
    """The broker's Redis (queues and unacked messages), for the reconciler: as patient with a
    stall as the run state's client, and noting outages through the same notes."""
    from worker import settings

    return patient_client(settings.broker_url(), outage_of(state.r) if state is not None else None)


def watch_joined(state: RunState, lock: ResultsLock, *, timeout: float | None = None,
                 on_status: Callable[[dict], None] | None = None, retry_every: float = 1.0) -> dict | None:
    """Watch a run another producer holds, to its end; return its last status.

    If that producer dies before its enqueue is complete, nobody would send the rest: then this
    one takes the lock and returns None, and the caller resumes the enqueue itself. (A holder
    that finished its enqueue and left is no loss: the fleet finishes the run.)
    """
    last_try = [0.0]

    def holder_gone(st: dict) -> bool:
        if st["enqueue_complete"] or time.monotonic() - last_try[0] < retry_every:
            return False
        last_try[0] = time.monotonic()
        return lock.try_acquire()

    st = wait(state, timeout=timeout, on_status=on_status, until=holder_gone, reconcile=False)
    return None if lock.held else st


def retry_failed(run_id: str, layout: Layout, state: RunState, *,
                 max_inflight: int = DEFAULT_MAX_INFLIGHT) -> int:
    """Re-enqueue only the failed image-steps (and the steps after them) of a run."""
    meta = state.meta()
    steps: list[int] = meta.get("steps") or []
    spec_hash = meta.get("spec_hash")
    if not steps or not spec_hash:
        raise RunNotInRedis(run_id)
    if not index_is_current(meta, layout):
        reindex(state, layout, steps)  # a finalize merged the sinks: the offsets workers would read moved
    first_failed: dict[str, int] = {}
    for s in steps:
        for image_id in state.iter_failed(s):
            first_failed[image_id] = min(first_failed.get(image_id, s), s)
    if not first_failed:
        return 0
    run_ref = str(RunRef(run_id, spec_hash))
    todo: Todo = []
    ordinals: dict[str, int | None] = {}
    for offset, rec in iter_seed(layout.seed):
        image_id = rec["image_id"]
        if image_id in first_failed:  # an image with a failed step keeps its offsets in the done hashes
            redo = [s for s in steps if s >= first_failed[image_id] and state.done_offset(s, image_id) is None]
            if redo:
                todo.append((offset, image_id, redo))
                ordinals[image_id] = seed_ordinal(rec)
    state.set_meta(enqueue_complete=False)
    with Publisher(1) as publisher:
        n = dispatch(state, run_ref, todo, steps, publisher, max_inflight=max_inflight, ordinals=ordinals)
    state.set_meta(enqueue_complete=True)
    return n
