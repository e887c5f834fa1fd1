"""refexp workers: the Celery app, the tasks, the pure step logic, VLM clients and sinks.

``celery -A worker worker`` finds the app through the lazy ``app`` attribute below, so importing
``worker.steps`` or ``worker.clients`` never imports Celery.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        from worker.app import app

        return app
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
