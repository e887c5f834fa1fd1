"""kombu's Redis ack emulation in plain pipelines: 4 Redis commands per task instead of 8.

kombu's Redis transport records a message it hands to a worker as *unacked*: on receipt it adds
the delivery tag to a sorted set scored by the time (``unacked_index``) and the message to a hash
(``unacked``), and on the ack it removes both. Each pair goes out as a transactional pipeline,
``MULTI``, the two commands, ``EXEC``: 8 commands per task for 4 that do work (bench/README.md,
issue 16). :class:`PipelinedQoS` sends the same pairs as plain pipelines, in the same single
round trip each.

Why the transaction is not needed: what reads these keys is the sweep that hands out again the
messages of a dead worker (``QoS.restore_visible``). It picks only tags scored older than the
visibility timeout, so a tag still being recorded, a few microseconds old, is never among them.
It restores a tag with its own transaction that ``WATCH``es the hash (``restore_by_tag``,
unchanged): an ack landing meanwhile modifies the hash, so the restore's ``EXEC`` fails and it
is retried, and then it finds the message gone. What a transaction would add is all-or-nothing
when the connection drops in the middle of the pipeline, and the order below makes either half
harmless:

- on receipt the index entry goes first (``ZADD``, then ``HSET``): a tag indexed without its
  message is dropped by the next sweep, which is what the transaction's abort left (the message
  was already popped from the queue in both cases: the task runs from memory and settles itself;
  `producer wait`'s reconciler covers a worker that dies before that);
- on ack the message goes first (``HDEL``, then ``ZREM``; kombu's order is the reverse): a tag
  left indexed without its message is dropped by the next sweep, whereas a message left without
  its index entry would never be swept and would stay in the hash for ever.

The sweep's restore and kombu's other transactions (``Channel._restore``) pass their own
``MULTI`` pipeline in and are not changed. Installed in worker processes with the clock guard
(worker/clock.py ``GuardedQoS`` derives from this class), through the ``Channel.QoS`` attribute
rather than a transport class of our own, which would replace the transport kombu picks from
the URL's scheme (``rediss://``, ``sentinel://``).
"""

from __future__ import annotations

from contextlib import contextmanager

from kombu.transport import redis as kombu_redis


class PipelinedQoS(kombu_redis.QoS):
    """kombu's Redis QoS (kombu 5.7, pinned through celery<5.8) with its receipt and ack writes
    in non-transactional pipelines, and the ack's removals in the order that never strands a
    message in the hash (see the module docstring)."""

    @contextmanager
    def pipe_or_acquire(self, pipe=None, client=None):
        """The caller's pipeline if it gave one (a restore's ``MULTI``), else a plain pipeline."""
        if pipe is not None:
            yield pipe
        else:
            with self.channel.conn_or_acquire(client) as client:
                yield client.pipeline(transaction=False)

    def _remove_from_indices(self, delivery_tag, pipe=None):
        with self.pipe_or_acquire(pipe) as pipe:
            return pipe.hdel(self.unacked_key, delivery_tag).zrem(self.unacked_index_key, delivery_tag)
