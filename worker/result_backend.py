"""The Redis result backend, minus the result tracking the producer cannot afford.

The producer publishes a chord per image and never waits on a result: outcomes live in the sinks
and the run index. Celery's Redis backend still tracks, in the *sending* process, every result it
could be asked to wait for:

- ``on_task_call`` subscribes the sender to a pub/sub channel for every task it sends, so that
  ``AsyncResult.get()`` can be woken (celery issue 3808);
- ``add_pending_result`` keeps each chord-header result as *pending*, registered when the chord
  builds its ``GroupResult`` ready barrier, and subscribes to its channel as well.

At 100k images that was 489 MB of producer RSS (4 KB per image, never released), a publish rate
40% lower, and two pub/sub subscriptions per image in Redis for as long as the producer stayed
connected (bench/README.md, target 4). This backend keeps neither. Chord counting and result
storage, which workers do, are unchanged. The cost: ``AsyncResult.get()`` cannot be woken in a
process using this backend; nothing in refexp calls it.
"""

from __future__ import annotations

from celery.backends.redis import RedisBackend


class RefexpRedisBackend(RedisBackend):
    def on_task_call(self, producer, task_id):
        return None

    def add_pending_result(self, result, weak=False, start_drainer=True):
        return result
