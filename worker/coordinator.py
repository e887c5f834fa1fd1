"""Batch mode's coordinator: one worker of the fleet at a time gathers parked requests into
provider jobs, submits them, polls them, and puts their answers back into the flow.

Why a worker: keys stay on the workers (invariant 5), so only a worker can submit or poll. Why
one: a lease in Redis (``keys.BATCH_LEASE``, ``lease_seconds_default``, renewed on every tick) names
the holder; every worker process runs a ``CoordinatorThread`` that tries to take it, so when the
holder dies another worker takes over within a lease. Everything it knows is in the ledger on
the results volume (``worker/ledger.py``), read again by whoever takes over: a job submitted
before a crash is polled and collected, never submitted again.

Per results dir (``Desk``), on each tick:

1. *gather*: read the parked requests past the cursors; a request whose step and image are
   already waiting (in a job not yet released, or gathered) is a duplicate and is dropped;
2. *form*: a job per run version and step of ``max_requests_per_job`` requests, or of fewer
   once the oldest has waited ``gather_seconds`` (requests first, record second, cursors last);
3. *submit* formed jobs (the images are read again, from the image cache when converted);
4. *poll* submitted jobs every ``poll_seconds``; a finished job's answers (or, for a job that
   failed or expired whole, a ``BatchJobFailed`` per request: retried, i.e. parked into a new
   job, until ``vlm.max_retries``) are written to the ledger: *collected*;
5. *release*: one answer task per request (the image is marked in flight first), then
   *released*.

Redis holds one small entry per job (``run:<id>:batch:jobs``) for ``producer status``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import redis

from worker.batchflow import publish_step
from worker.clients.batch import BatchBackend, BatchItem
from worker.clients.factory import get_batch_backend
from worker.context import RunContext, RunNotInRedis, get_context, state_redis
from worker.errors import ClientError, ConfigError, PermanentClientError
from worker.images import load_payload
from worker.keys import BATCH_LEASE, BATCH_RUNS, run_key
from worker.ledger import Job, Ledger, Parked
from worker.parking import BatchJobFailed, answer_to_json, request_from_json
from worker.settings import env_seconds

log = logging.getLogger("refexp.batch")

def lease_seconds_default() -> float:
    """How long the coordinator's lease lasts unrenewed (``REFEXP_BATCH_LEASE_SECONDS``, 30 by
    default; tests lower it so a killed holder is replaced quickly)."""
    return float(os.environ.get("REFEXP_BATCH_LEASE_SECONDS") or 30.0)


def claim_stale_seconds(lease_seconds: float) -> float:
    """How old the submit claim of a job still ``formed`` must be before another coordinator
    takes it over (``Ledger.claim_submit``): ten leases, at least 60 s, so a slow upload is not
    taken for a dead coordinator. ``REFEXP_BATCH_CLAIM_STALE_SECONDS`` sets it (tests lower it
    with the lease, so a killed coordinator's job is not waited on for a minute)."""
    return env_seconds("REFEXP_BATCH_CLAIM_STALE_SECONDS", max(60.0, 10 * lease_seconds), minimum=1)


#: Ticks are at most this far apart (and at most a third of the lease).
MAX_TICK = 5.0
MIN_TICK = 0.05
#: Answer tasks published per in-flight mark.
RELEASE_CHUNK = 500

# Take the lease if free, renew it if ours: 1 held, 0 someone else's.
_LEASE = """
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

BackendFor = Callable[[RunContext], BatchBackend]


class LeaseLost(Exception):
    """Another worker holds the coordinator's lease now: this one drops its desks."""


def default_backend(ctx: RunContext) -> BatchBackend:
    return get_batch_backend(ctx.spec.ire.vlm)


def _summary(job: Job) -> str:
    return json.dumps({"step": job.step, "n": job.n, "state": job.state, "provider_state": job.provider_state,
                       "created": job.created, "submitted_at": job.submitted_at, "finished_at": job.finished_at,
                       "released_at": job.released_at})


@contextlib.contextmanager
def renewing(holds: Callable[[], bool], every: float) -> Iterator[None]:
    """Keep renewing the lease while a long provider call runs (an upload of a thousand images
    can outlast it): a lease that ran out mid-upload would let a second coordinator act."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every):
            with contextlib.suppress(Exception):
                holds()

    thread = threading.Thread(target=loop, name="refexp-batch-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class Desk:
    """The coordinator's working state for one results dir, rebuilt from its ledger on takeover."""

    def __init__(self, ledger: Ledger, backend_for: BackendFor, *, token: str = "",
                 holds: Callable[[], bool] = lambda: True, claim_stale_after: float = 300.0,
                 renew_every: float = 10.0):
        self.ledger = ledger
        self.backend_for = backend_for
        self.token = token or uuid.uuid4().hex[:8]
        self.holds = holds
        self.claim_stale_after = claim_stale_after
        self.renew_every = renew_every
        self.jobs: dict[str, Job] = {j.job_id: j for j in ledger.jobs() if j.state != "released"}
        self.waiting: set[tuple[int, str]] = set()
        for job in self.jobs.values():
            self.waiting.update((job.step, e["image_id"]) for e in ledger.requests(job))
        self.cursors = ledger.cursors()
        self.read_pos = dict(self.cursors)
        self.pending: dict[tuple[str, int], list[Parked]] = {}
        self.pending_keys: set[tuple[int, str]] = set()
        self.polled: dict[str, float] = {}
        self.noted: dict[str, float] = {}
        self.backends: dict[str, BatchBackend] = {}
        for job in self.jobs.values():  # a Redis that restarted empty shows them again
            with contextlib.suppress(RunNotInRedis):
                self.publish_summary(job)

    # -- helpers ---------------------------------------------------------------------------
    def backend(self, ctx: RunContext) -> BatchBackend:
        b = self.backends.get(ctx.ref)
        if b is None:
            b = self.backends[ctx.ref] = self.backend_for(ctx)
        return b

    def publish_summary(self, job: Job) -> None:
        ctx = get_context(job.run_ref)
        ctx.state.r.hset(run_key(ctx.run_id, "batch", "jobs"), job.job_id, _summary(job))

    def tick(self, now: float) -> None:
        self.gather()
        self.form(now)
        for job in list(self.jobs.values()):
            if not self.holds():  # the lease went to another worker mid-tick: stop acting
                raise LeaseLost()
            try:
                if job.state == "formed":
                    self.submit(job)
                if job.state == "submitted":
                    self.poll(job, now)
                if job.state == "collected":
                    self.release(job)
            except RunNotInRedis:
                self.note(job, "run %s is not in Redis; the job waits for the run to be enqueued again", job.run_ref)
            except redis.RedisError:
                raise  # the coordinator's loop waits for Redis
            except Exception as exc:  # one broken job (a provider's odd answer, a bug) does not stop the others
                self.note(job, "%s: %s; trying again next tick", type(exc).__name__, exc, exc_info=True)

    def note(self, job: Job, msg: str, *args: object, exc_info: bool = False) -> None:
        """Log a job's trouble at most once a minute (the tick retries it every few seconds)."""
        now = time.monotonic()
        if now - self.noted.get(job.job_id, float("-inf")) >= 60.0:
            self.noted[job.job_id] = now
            log.warning("batch job %s: " + msg, job.job_id, *args, exc_info=exc_info)

    # -- 1. gather --------------------------------------------------------------------------
    def gather(self) -> None:
        dropped: dict[str, int] = {}
        for p in self.ledger.read_parked(self.read_pos):
            self.read_pos[p.part] = p.end
            if not p.entry:
                continue
            if p.key in self.waiting or p.key in self.pending_keys:  # parked twice (a duplicate message)
                ref = str(p.entry["run_ref"])
                dropped[ref] = dropped.get(ref, 0) + 1
                continue
            self.pending.setdefault((str(p.entry["run_ref"]), p.key[0]), []).append(p)
            self.pending_keys.add(p.key)
        for ref, n in dropped.items():
            with contextlib.suppress(RunNotInRedis):
                ctx = get_context(ref)
                ctx.state.r.decrby(run_key(ctx.run_id, "batch", "gathering"), n)
        if not self.pending:
            self.save_cursors()

    # -- 2. form ----------------------------------------------------------------------------
    def form(self, now: float) -> None:
        formed = False
        for (ref, step), items in list(self.pending.items()):
            try:
                cfg = get_context(ref).spec.ire.vlm.batch
            except RunNotInRedis:
                continue
            while items and (len(items) >= cfg.max_requests_per_job
                             or now - min(float(p.entry.get("t") or 0) for p in items) >= cfg.gather_seconds):
                chunk, items = items[:cfg.max_requests_per_job], items[cfg.max_requests_per_job:]
                self.new_job(ref, step, chunk)
                formed = True
            if items:
                self.pending[(ref, step)] = items
            else:
                del self.pending[(ref, step)]
        if formed:
            self.save_cursors()

    def new_job(self, ref: str, step: int, chunk: list[Parked]) -> None:
        job = self.ledger.create_job(step, ref, [p.entry for p in chunk])
        keys = {p.key for p in chunk}
        self.pending_keys -= keys
        self.waiting |= keys
        self.jobs[job.job_id] = job
        ctx = get_context(ref)
        pipe = ctx.state.r.pipeline(transaction=False)
        pipe.hset(run_key(ctx.run_id, "batch", "jobs"), job.job_id, _summary(job))
        pipe.decrby(run_key(ctx.run_id, "batch", "gathering"), len(chunk))
        pipe.execute()
        log.info("batch job %s formed: step %d, %d requests", job.job_id, step, job.n)

    def save_cursors(self) -> None:
        """Each part's cursor: before its first request still gathering, else as far as read."""
        cursors = dict(self.read_pos)
        for items in self.pending.values():
            for p in items:
                cursors[p.part] = min(cursors.get(p.part, p.start), p.start)
        if cursors != self.cursors:
            self.ledger.save_cursors(cursors)
            self.cursors = cursors

    # -- 3. submit --------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        ctx = get_context(job.run_ref)
        claim = self.ledger.claim_submit(job, self.token, self.claim_stale_after)
        if claim is None:
            now = self.ledger.reload(job)  # another coordinator is sending it, or has
            if now.state != "formed":
                job.__dict__.update(now.__dict__)
            return
        if claim == "taken over" and self.adopt(job, ctx):
            return
        vlm, opts = ctx.spec.ire.vlm, ctx.options

        def load(path: str):
            return load_payload(path, max_pixels=vlm.max_image_pixels, downscale_to_pixels=opts.downscale_to_pixels,
                                cache_dir=opts.image_cache_dir or None)

        items, prefailed = [], {}
        for e in self.ledger.requests(job):
            try:
                items.append(BatchItem(e["key"], request_from_json(e["request"], load)))
            except OSError:
                raise
            except Exception as exc:  # this image cannot be sent: its answer is the error
                prefailed[e["key"]] = answer_to_json(exc)
        job.counts = {"prefailed": prefailed} if prefailed else {}
        if items:
            try:
                with renewing(self.holds, self.renew_every):
                    job.provider_id = self.backend(ctx).submit(items, display_name=f"refexp-{job.job_id}")
            except (PermanentClientError, ConfigError) as exc:
                log.error("batch job %s: the provider refused it: %s", job.job_id, exc)
                self.collect(job, {e["key"]: answer_to_json(exc) for e in self.ledger.requests(job)})
                return
            except ClientError as exc:
                log.warning("batch job %s: submit failed (%s); trying again next tick", job.job_id, exc)
                return
            job.state, job.submitted_at = "submitted", time.time()
            self.ledger.save(job)
            self.publish_summary(job)
            log.info("batch job %s submitted as %s (%d requests)", job.job_id, job.provider_id, len(items))
        else:
            self.collect(job, {})

    def adopt(self, job: Job, ctx: RunContext) -> bool:
        """A coordinator died holding this job's claim, before recording the provider's id: if the
        provider lists a job under the job's name, that is the job; record it instead of sending
        the requests again (twice the bill). A provider that cannot be asked sends it anew."""
        try:
            with renewing(self.holds, self.renew_every):
                found = self.backend(ctx).find(f"refexp-{job.job_id}")
        except ClientError as exc:
            log.warning("batch job %s: could not ask the provider whether it was sent (%s); sending it", job.job_id,
                        exc)
            return False
        if found is None:
            return False
        job.provider_id, job.state, job.submitted_at = found, "submitted", time.time()
        self.ledger.save(job)
        self.publish_summary(job)
        log.warning("batch job %s: a coordinator died after sending it as %s; picked up, not sent again",
                    job.job_id, found)
        return True

    # -- 4. poll ----------------------------------------------------------------------------
    def poll(self, job: Job, now: float) -> None:
        ctx = get_context(job.run_ref)
        if now - self.polled.get(job.job_id, float("-inf")) < ctx.spec.ire.vlm.batch.poll_seconds:
            return
        self.polled[job.job_id] = now
        backend = self.backend(ctx)
        try:
            st = backend.status(job.provider_id)
        except ClientError as exc:
            log.warning("batch job %s: status failed (%s); asking again next poll", job.job_id, exc)
            return
        if st.state != job.provider_state or st.counts != job.counts.get("provider"):
            job.provider_state = st.state
            job.counts = {**job.counts, "provider": st.counts}
            self.ledger.save(job)
            self.publish_summary(job)
        if not st.final:
            return
        keys = [e["key"] for e in self.ledger.requests(job)]
        answers: dict[str, dict] = {}
        state, error = st.state, st.error
        if state in ("succeeded", "expired"):
            # An expired job keeps the answers it finished in time (OpenAI writes them to its
            # output file): they are used, and only the rest is asked again.
            try:
                with renewing(self.holds, self.renew_every):
                    answers = {k: answer_to_json(a) for k, a in backend.results(job.provider_id, expected_keys=keys)
                               if not (state == "expired" and isinstance(a, ClientError))}
            except ClientError as exc:
                if state == "succeeded":  # a download cut: read again at the next poll
                    log.warning("batch job %s: its answers could not be read (%s); reading them next poll",
                                job.job_id, exc)
                    return
                log.warning("batch job %s expired and its partial answers could not be read (%s)", job.job_id, exc)
            except PermanentClientError as exc:  # never readable: the job is lost as a whole
                log.warning("batch job %s: its answers cannot be read (%s)", job.job_id, exc)
                answers, state, error = {}, "failed", f"its answers cannot be read: {exc}"
        if state == "succeeded":
            missing = ClientError(f"batch job {job.provider_id}: no answer for this request in its output")
            answers = {k: answers.get(k) or answer_to_json(missing) for k in keys}
        else:
            failed = BatchJobFailed(f"batch job {job.provider_id} {state}: {error or 'no reason given'}")
            answers = {k: answers.get(k) or answer_to_json(failed) for k in keys}
            log.warning("batch job %s: %s as a whole; %d of its %d requests are retried", job.job_id, state,
                        sum(1 for k in keys if answers[k].get("error")), len(keys))
        self.collect(job, answers)

    def collect(self, job: Job, answers: dict[str, dict]) -> None:
        prefailed = (job.counts or {}).get("prefailed") or {}
        keys = [e["key"] for e in self.ledger.requests(job)]
        lines = [{"key": k, **(prefailed.get(k) or answers.get(k) or {})} for k in keys]
        self.ledger.write_answers(job, lines)
        job.state, job.finished_at = "collected", time.time()
        self.ledger.save(job)
        self.publish_summary(job)

    # -- 5. release -------------------------------------------------------------------------
    def release(self, job: Job) -> None:
        ctx = get_context(job.run_ref)
        entries = {e["key"]: e for e in self.ledger.requests(job)}
        chunk: list[tuple[int, dict]] = []

        def flush() -> None:
            ctx.state.mark_queued({e["image_id"]: int(e["seed_offset"]) for _, e in chunk})
            for at, e in chunk:
                publish_step(job.run_ref, job.step, e["image_id"], int(e["seed_offset"]),
                             batch_answer={"job": job.job_id, "at": at}, vlm_retries=int(e.get("vlm_retries") or 0))
            chunk.clear()

        for at, answer in self.ledger.answers(job):
            e = entries.get(answer.get("key"))
            if e is not None:
                chunk.append((at, e))
            if len(chunk) >= RELEASE_CHUNK:
                flush()
        if chunk:
            flush()
        job.state, job.released_at = "released", time.time()
        self.ledger.save(job)
        self.publish_summary(job)
        self.waiting -= {(job.step, e["image_id"]) for e in entries.values()}
        self.jobs.pop(job.job_id, None)
        self.polled.pop(job.job_id, None)
        log.info("batch job %s released: %d answers back into the flow", job.job_id, len(entries))


class Coordinator:
    """Holds the lease (or tries to) and ticks the desks of every run with batch work."""

    def __init__(self, r: redis.Redis | None = None, *, name: str = "", lease_seconds: float | None = None,
                 backend_for: BackendFor = default_backend):
        self.r = r or state_redis()
        self.token = f"{name or 'worker'}:{uuid.uuid4().hex[:8]}"
        self.lease_seconds = lease_seconds or lease_seconds_default()
        self.backend_for = backend_for
        self.desks: dict[str, Desk] = {}
        self._lease = self.r.register_script(_LEASE)
        self._release = self.r.register_script(_RELEASE)

    def holds_lease(self) -> bool:
        return bool(self._lease(keys=[BATCH_LEASE], args=[self.token, int(self.lease_seconds * 1000)]))

    def release_lease(self) -> None:
        self._release(keys=[BATCH_LEASE], args=[self.token])

    def tick(self) -> float:
        """One round; returns the seconds until the next."""
        if not self.r.exists(BATCH_RUNS):  # no run has batch work: take no lease, cost one command
            return MAX_TICK
        if not self.holds_lease():
            self.desks.clear()  # whoever holds it has the truth; read the ledger again on takeover
            return min(self.lease_seconds / 3, MAX_TICK)
        interval = min(self.lease_seconds / 3, MAX_TICK)
        seen: dict[str, list[str]] = {}
        for raw in self.r.smembers(BATCH_RUNS):
            ref = raw.decode()
            try:
                ctx = get_context(ref)
            except RunNotInRedis:  # its spec is gone from Redis: an enqueue adds it again
                self.r.srem(BATCH_RUNS, ref)
                continue
            batch = ctx.spec.ire.vlm.batch
            if not batch.enabled:
                self.r.srem(BATCH_RUNS, ref)
                continue
            interval = min(interval, batch.gather_seconds / 2, batch.poll_seconds / 2)
            root = str(Path(ctx.spec.results_dir))
            seen.setdefault(root, []).append(ref)
            if root not in self.desks:
                self.desks[root] = Desk(Ledger(root), self.backend_for, token=self.token, holds=self.holds_lease,
                                        claim_stale_after=claim_stale_seconds(self.lease_seconds),
                                        renew_every=self.lease_seconds / 3)
        now = time.time()
        try:
            for root in seen:
                self.desks[root].tick(now)
        except LeaseLost:
            log.warning("batch coordinator: the lease went to another worker mid-tick; stepping down")
            self.desks.clear()
            return max(MIN_TICK, interval)
        for root, refs in seen.items():
            self.retire_if_idle(self.desks[root], refs)
        return max(MIN_TICK, interval)

    def retire_if_idle(self, desk: Desk, refs: list[str]) -> None:
        """A results dir with nothing gathering and no job unreleased leaves the set of batch runs,
        so an idle fleet holds no lease and ticks no desk. The ledger is read once more *after*
        the removal: a task parks (ledger line) before it adds its run (SADD), so a request parked
        meanwhile is either seen by that read or adds the run again itself."""
        if desk.pending or desk.jobs:
            return
        self.r.srem(BATCH_RUNS, *refs)
        desk.gather()
        back = {ref for (ref, _), items in desk.pending.items() if items}
        if back:
            self.r.sadd(BATCH_RUNS, *back)

    def run(self, stop: threading.Event) -> None:
        """Tick until ``stop`` is set; an error in a tick is logged and the next tick tries again
        (from the ledger: the desk is read again)."""
        delay = 0.0
        while not stop.wait(delay):
            try:
                delay = self.tick()
            except redis.RedisError as exc:
                log.warning("batch coordinator: Redis failed (%s: %s); trying again", type(exc).__name__, exc)
                self.desks.clear()
                delay = 1.0
            except Exception:
                log.exception("batch coordinator: tick failed; reading the ledger again next tick")
                self.desks.clear()
                delay = 1.0
        with contextlib.suppress(redis.RedisError):
            self.release_lease()


class CoordinatorThread:
    """The coordinator loop in a daemon thread of a worker process."""

    def __init__(self, name: str = "", **kwargs: object):
        self.stop_event = threading.Event()
        self.coordinator: Coordinator | None = None
        self.kwargs = kwargs
        self.name = name
        self.thread = threading.Thread(target=self._run, name="refexp-batch-coordinator", daemon=True)

    def _run(self) -> None:
        self.coordinator = Coordinator(name=self.name, **self.kwargs)  # type: ignore[arg-type]
        self.coordinator.run(self.stop_event)

    def start(self) -> CoordinatorThread:
        self.thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        self.thread.join(timeout)
