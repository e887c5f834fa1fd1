"""Process settings read from the environment (never from task messages).

``REDIS_URL`` is the one address a fleet shares; ``CELERY_BROKER_URL`` and
``CELERY_RESULT_BACKEND`` override it for Celery alone. Run state lives on the broker's Redis.
"""

from __future__ import annotations

import os

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_VISIBILITY_TIMEOUT = 3600
#: Seconds any Redis socket operation may take before it fails (a healthy command takes ms; the
#: longest blocking ones, BRPOP and the budget's BLPOP, wait 1 s). Without a bound a stalled
#: Redis holds a thread for ever.
REDIS_SOCKET_TIMEOUT = 20.0


def redis_url() -> str:
    return os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL


def broker_url() -> str:
    return os.environ.get("CELERY_BROKER_URL") or redis_url()


def result_backend() -> str:
    return os.environ.get("CELERY_RESULT_BACKEND") or redis_url()


def state_url() -> str:
    """Run state (indexes, budget) lives on the broker's Redis unless REFEXP_STATE_URL says otherwise."""
    return os.environ.get("REFEXP_STATE_URL") or broker_url()


def visibility_timeout() -> int:
    raw = os.environ.get("REFEXP_VISIBILITY_TIMEOUT")
    if not raw:
        return DEFAULT_VISIBILITY_TIMEOUT
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"REFEXP_VISIBILITY_TIMEOUT must be whole seconds, got {raw!r}") from None
    if value < 5:
        raise ValueError(f"REFEXP_VISIBILITY_TIMEOUT must be at least 5 seconds, got {value}")
    return value
