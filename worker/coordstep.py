"""The worker bootstep that runs batch mode's coordinator thread (``worker/coordinator.py``).

Kept apart from the coordinator so that importing the Celery app (publisher processes do) does
not import the clients and step logic the coordinator needs: it is imported when a worker starts.
"""

from __future__ import annotations

from celery import bootsteps


class BatchCoordinatorStep(bootsteps.StartStopStep):
    """Every worker runs a coordinator thread; the lease in Redis lets one act at a time."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: object, **kwargs: object):
        super().__init__(parent, **kwargs)
        self.thread = None

    def start(self, parent: object) -> None:
        if self.thread is None:
            from worker.coordinator import CoordinatorThread

            self.thread = CoordinatorThread(name=str(getattr(parent, "hostname", "") or "")).start()

    def stop(self, parent: object) -> None:
        if self.thread is not None:
            self.thread.stop()
            self.thread = None

    shutdown = stop
