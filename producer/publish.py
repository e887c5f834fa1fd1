"""Publishing canvases, in this process or spread over a few publisher processes.

Freezing and sending a Celery chord per image (``canvas(...).apply_async()``) costs about 1.7 ms
of one core and four Redis round trips per image: ~450-600 images/s per process on our 2-core
bench machine. ``publish_items`` instead instantiates each image's messages from a template of
what Celery sends for its canvas (``producer/templates.py``) and sends a chunk in two pipelined
round trips, ~0.5 ms per image (bench/README.md, "enqueue >= 1,000 images/s"). With
``processes=P`` the producer and ``P - 1`` child processes split each batch and publish their
shares side by side; the producer still marks a batch in flight only after every share is
published, so the "publish, then mark" rule that makes a killed producer harmless holds
unchanged.

Children are spawned (not forked: the parent holds Redis connections), ignore Ctrl-C (the parent
decides when to stop, and lets the shares being published finish), and are handed the broker
and result-backend URLs (and the producer's publishing settings) explicitly, since ``producer
run`` repoints its app at runtime. They import the Celery app, this module and
``producer.templates``, nothing else of ours: signatures go by task name.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

from celery import chain, chord, group
from celery.canvas import Signature
from kombu.exceptions import BatchPublishError

from producer.templates import IMAGE_P, OFFSET_P, RUN_P, CanvasTemplate, TemplateError, expected_messages
from worker.stepdefs import RESULTLESS_STEPS, STEP, task_name

log = logging.getLogger("refexp.producer")

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
    """Publish one canvas per item through this process's app; returns how many.

    Each canvas shape is built and recorded once per call (``producer/templates.py``), then every
    item's messages are instantiated from it: the chunk's chord-size keys go out in one pipeline
    on the result backend, then its messages through one ``kombu.Producer.batch()`` (pipelined
    LPUSHes) on the broker, in that order, as ``apply_async`` sets a chord's size before its
    header tasks go out. Returns only once everything is sent; raises if Redis refused any part
    (some messages may be out then: the caller marks nothing, a resume publishes them again).
    A shape a template cannot reproduce goes out with ``apply_async`` per image.
    """
    from worker.app import app

    templates = _templates_for(app)
    chords: list[tuple[CanvasTemplate, list[tuple[str, int]]]] = []
    messages: list[tuple[object, dict]] = []
    plain: list[Item] = []
    for item in items:
        steps, run_ref, image_id, offset = item
        key = tuple(steps)
        if key not in templates:
            templates[key] = _template(app, list(steps))
        template = templates[key]
        if template is None:
            plain.append(item)
            continue
        sizes, msgs = template.instantiate(run_ref, image_id, offset)
        if sizes:
            chords.append((template, sizes))
        messages.extend(msgs)
    if chords:
        with app.backend.client.pipeline(transaction=False) as pipe:
            for template, sizes in chords:
                template.set_chord_sizes(pipe, sizes)
            pipe.execute()
    if messages:
        with app.producer_or_acquire() as producer:
            try:
                with producer.batch(max_size=PIPELINE_COMMANDS):
                    declared: set = set()
                    for body, kwargs in messages:
                        # kombu declares an entity once per channel, but binds a copy of it on
                        # every publish first (a third of a message's cost): once per call.
                        fresh = [e for e in kwargs["declare"] if e not in declared]
                        declared.update(fresh)
                        kwargs["declare"] = fresh
                        producer.publish(body, **kwargs)
            except BatchPublishError as exc:
                # The Redis error underneath is what the enqueue's outage handling knows.
                raise (exc.__cause__ if isinstance(exc.__cause__, Exception) else exc) from exc
    for steps, run_ref, image_id, offset in plain:
        canvas(steps, run_ref, image_id, offset).apply_async()
    return len(items)


#: LPUSHes per Redis round trip (kombu's batch flushes when it holds this many).
PIPELINE_COMMANDS = 1000


#: Templates built in this process: {(thread, broker URL, backend URL): {steps: template}}. A
#: template holds the building thread's ``reply_to`` and the process's ``origin``, and nothing
#: of the URLs, but a repointed app (``worker.app.repoint``) starts afresh all the same.
_TEMPLATES: dict[tuple, dict[tuple[int, ...], CanvasTemplate | None]] = {}


def _templates_for(app) -> dict[tuple[int, ...], CanvasTemplate | None]:
    key = (threading.get_ident(), str(app.conf.broker_url), str(app.conf.result_backend))
    if key not in _TEMPLATES:
        _TEMPLATES.clear()  # one key in use at a time: nothing accumulates
        _TEMPLATES[key] = {}
    return _TEMPLATES[key]


def _template(app, steps: list[int]) -> CanvasTemplate | None:
    """The template for ``steps``' canvas, or None (then ``apply_async`` per image) when this
    app's canvas cannot be templated (``templates.TemplateError``)."""
    def make(run_ref: str, image_id: str, offset: int) -> Signature:
        return canvas(steps, run_ref, image_id, offset)

    try:
        return CanvasTemplate(app, make, expected_messages(make(RUN_P, IMAGE_P, OFFSET_P)))
    except TemplateError as exc:
        log.warning("publishing %s with apply_async per image: %s", steps, exc)
        return None


def publish_items_plain(items: Sequence[Item]) -> int:
    """``publish_items`` the way Celery's canvas does it, ``apply_async`` per image (the
    baseline ``bench.enqueue --plain`` measures beside the templated path)."""
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
