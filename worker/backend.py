"""The Redis result backend, minus one behaviour the producer cannot afford.

Celery's Redis backend subscribes the *sending* process to a pub/sub channel for every task it
sends, so that ``AsyncResult.get()`` can be woken (celery issue 3808). Our producer never waits
on a result — outcomes live in the sinks and the run index — so a 1M-image enqueue would only
pile up a million subscriptions. This backend skips that subscription; chord counting and
result storage are unchanged.
"""

from __future__ import annotations

from celery.backends.redis import RedisBackend


class RefexpRedisBackend(RedisBackend):
    def on_task_call(self, producer, task_id):
        return None
