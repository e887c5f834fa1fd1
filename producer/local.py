"""``producer run``: the fleet's pipeline on one machine, with nothing to install or start.

An embedded real Redis (``producer.embedded``), the same Celery tasks on an in-process worker
with a thread pool of ``workflow.max_workers``, the same enqueue, wait and finalize. Outputs
are the fleet's, byte for byte, because every line of code that writes them is the same.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator

from worker.constants import QUEUE


@contextlib.contextmanager
def in_process_worker(concurrency: int, *, shutdown_timeout: float = 60.0) -> Iterator[object]:
    """A Celery worker on the threads pool, consuming in a background thread of this process."""
    from celery.worker import state as worker_state

    from worker.app import app

    # As a worker process does at start: make this app the current and default one, so the
    # tracer stores results (and counts chords) through it.
    app.finalize()
    app.set_current()
    app.set_default()
    ready = threading.Event()

    class _Controller(app.WorkController):  # type: ignore[name-defined, misc]
        def on_consumer_ready(self, consumer: object) -> None:
            super().on_consumer_ready(consumer)
            ready.set()

    controller = _Controller(
        app=app,
        hostname=f"local-{os.getpid()}@{socket.gethostname()}",
        concurrency=concurrency,
        pool_cls="threads",
        queues=[QUEUE],
        loglevel="WARNING",
        without_heartbeat=True,
        without_mingle=True,
        without_gossip=True,
        ready_callback=None,
    )
    thread = threading.Thread(target=controller.start, name="refexp-local-worker", daemon=True)
    thread.start()
    if not ready.wait(60):
        raise RuntimeError("the in-process worker did not start within 60 s")
    try:
        yield controller
    finally:
        worker_state.should_terminate = 0
        thread.join(shutdown_timeout)
        worker_state.should_terminate = None
