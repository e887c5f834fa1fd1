"""Publishing canvases, in this process or spread over a few publisher processes.

Building and sending a Celery chord is pure-Python work (freezing the canvas, one chord-size
key, two messages through kombu): about 2 ms of one core per image, so one process tops out
near 450 images/s on our 2-core bench machine, whatever Redis can take (bench/README.md,
target 4). A million-image enqueue is then 40 minutes of a producer at 100% CPU. With
``processes=P`` the producer and ``P - 1`` child processes split each batch and publish their
shares side by side; the producer still marks a batch in flight only after every share is
published, so the "publish, then mark" rule that makes a killed producer harmless holds
unchanged.

Children are spawned (not forked: the parent holds Redis connections), ignore Ctrl-C (the parent
decides when to stop, and lets the shares being published finish), and are handed the broker
and result-backend URLs (and the producer's publishing settings) explicitly, since ``producer
run`` repoints its app at runtime. They import the Celery app and nothing else of ours:
signatures go by task name.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

from celery import chain, chord, group
from celery.canvas import Signature

from worker.stepdefs import RESULTLESS_STEPS, STEP, task_name

#: (steps still to run, run_ref, image_id, seed offset) for one image.
Item = tuple[list[int], str, str, int]

#: Below this many images to enqueue, one process: spawning publishers costs ~1 s.
AUTO_MIN_IMAGES = 20_000
AUTO_MAX_PUBLISHERS = 4


def auto_publishers(images: int) -> int:
    """How many publisher processes a run of ``images`` images is worth on this machine."""
    if images < AUTO_MIN_IMAGES:
        return 1
    return max(1, min(AUTO_MAX_PUBLISHERS, os.cpu_count() or 1))


def _sig(step: int, args: tuple) -> Signature:
    """One step's signature. Its options travel with it: the chord body and the chain's next
    step are sent by a worker from the signature as published, and a retry re-sends its
    delivery_info's priority, so a later step keeps its (higher) priority on every path."""
    from worker.app import app

    return app.signature(task_name(step), args=args, immutable=True,
                         options={"ignore_result": step in RESULTLESS_STEPS, "priority": STEP[step].priority})


def canvas(steps: list[int], run_ref: str, image_id: str, seed_offset: int) -> Signature:
    """The canvas running ``steps`` (sorted) for one image.

    Signatures are by task name, so a publisher needs the Celery app but not the task module
    and everything it imports (clients, step logic, Pillow): a publisher process stays ~30 MB.
    """
    args = (run_ref, image_id, seed_offset)
    header = [_sig(s, args) for s in steps if STEP[s].head]
    tail = [_sig(s, args) for s in steps if not STEP[s].head]
    if len(header) == 2 and tail:
        return chord(group(header), chain(*tail) if len(tail) > 1 else tail[0])
    if len(header) == 2:
        return group(header)
    parts = header + tail
    return chain(*parts) if len(parts) > 1 else parts[0]


def publish_items(items: Sequence[Item]) -> int:
    """Publish one canvas per item through this process's app; returns how many."""
    for steps, run_ref, image_id, offset in items:
        canvas(steps, run_ref, image_id, offset).apply_async()
    return len(items)


#: The settings a publisher child takes from its parent's app (which may have been repointed, or
#: given the producer's publishing settings, ``producer.outage.publishing_conf``).
CHILD_CONF = ("broker_url", "result_backend", "broker_transport_options", "redis_socket_timeout",
              "redis_socket_connect_timeout", "result_backend_transport_options")


def _init_child(conf: dict) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from worker.app import app

    app.conf.update(conf)


class Publisher:
    """Publishes batches in this process alone (``processes=1``) or split over this process and
    ``processes - 1`` children (this one would otherwise only wait for them)."""

    def __init__(self, processes: int = 1):
        self.processes = max(1, processes)
        self._pool: ProcessPoolExecutor | None = None
        if self.processes > 1:
            from worker.app import app

            self._pool = ProcessPoolExecutor(
                self.processes - 1, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_child, initargs=({k: app.conf[k] for k in CHILD_CONF},))

    def publish(self, items: Sequence[Item]) -> int:
        """Publish every item; returns only once all of them are sent (or raises)."""
        if self._pool is None or len(items) < 2 * self.processes:
            return publish_items(items)
        share = -(-len(items) // self.processes)
        futures = [self._pool.submit(publish_items, list(items[i:i + share]))
                   for i in range(share, len(items), share)]
        try:
            sent = publish_items(items[:share])
        finally:
            sent_by_children = sum(f.result() for f in futures)  # every share is out before we return
        return sent + sent_by_children

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
