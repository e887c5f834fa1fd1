"""The in-process worker of ``producer run`` (the command itself is ``producer.cli.run_local``).

``producer run`` is the fleet's pipeline on one machine: an embedded real Redis
(``producer.embedded``), the same Celery tasks on this in-process worker with a thread pool of
``workflow.max_workers``, the same enqueue, wait and finalize. Outputs are the fleet's, byte for
byte, because every line of code that writes them is the same.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator

from worker.keys import QUEUE


class LocalWorker:
    """A Celery worker on the threads pool, consuming in a background thread of this process."""

    def __init__(self, concurrency: int):
        from worker.app import app

        # As a worker process does at start: make this app the current and default one, so the
        # tracer stores results (and counts chords) through it.
        app.finalize()
        app.set_current()
        app.set_default()
        ready = self._ready = threading.Event()

        class _Controller(app.WorkController):  # type: ignore[name-defined, misc]
            def on_consumer_ready(self, consumer: object) -> None:
                super().on_consumer_ready(consumer)
                ready.set()

        self.controller = _Controller(
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
        self._thread = threading.Thread(target=self.controller.start, name="refexp-local-worker", daemon=True)

    def start(self) -> LocalWorker:
        self._thread.start()
        if not self._ready.wait(60):
            raise RuntimeError("the in-process worker did not start within 60 s")
        return self

    @staticmethod
    def tasks_in_flight() -> int:
        """Tasks this process is running now (each holds at most one VLM call at a time)."""
        from celery.worker import state as worker_state

        return len(worker_state.active_requests)

    def drain(self, timeout: float) -> bool:
        """Warm shutdown: stop taking tasks, let the running ones finish (their answers are written
        and indexed, so a resume does not pay for them again); True if they did within ``timeout``.

        A KeyboardInterrupt (a second Ctrl-C) while waiting propagates at once.
        """
        return self._stop("should_stop", timeout)

    def stop(self, timeout: float = 60.0) -> bool:
        """Cold shutdown, for when nothing is left to run."""
        return self._stop("should_terminate", timeout)

    def _stop(self, flag: str, timeout: float) -> bool:
        from celery.worker import state as worker_state

        if not self._thread.is_alive():
            return True
        setattr(worker_state, flag, 0)  # the consumer loop checks it (celery.worker.state.maybe_shutdown)
        self._thread.join(timeout)
        stopped = not self._thread.is_alive()
        if stopped:
            setattr(worker_state, flag, None)  # a later in-process worker in this process starts afresh
        return stopped


@contextlib.contextmanager
def in_process_worker(concurrency: int, *, shutdown_timeout: float = 60.0) -> Iterator[LocalWorker]:
    """A started ``LocalWorker``, stopped on exit."""
    worker = LocalWorker(concurrency).start()
    try:
        yield worker
    finally:
        worker.stop(shutdown_timeout)
