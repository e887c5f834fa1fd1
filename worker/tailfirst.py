"""The end of a run: start what is left before finishing what is started.

Depth-first (worker/stepdefs.py priorities) makes an image's later steps jump ahead of new
images' head steps, which is what gets first records out in a few call latencies. At the end of
a run it is the wrong order: the work that finishes a run soonest is the longest remaining one,
and an image that has not started has three calls in a row ahead of it (head, step 2, step 3)
where a started one has one or two. Served last, the final images' chains drain while most
endpoint slots sit idle (bench/README.md, "Depth-first": the makespan it cost).

So a worker reads the head steps' list first once few head messages are left: fewer than two
per thread of this worker, i.e. when every image still to start fits in its threads at once.
Until then it reads the lists in priority order, as kombu does. The check is one ``LLEN`` per
channel at most every ``CHECK_EVERY`` seconds, on a pooled connection, just before the channel's
``BRPOP`` is sent; if it fails, the priority order is kept (Redis failing is the task layer's
business, not this heuristic's). Nothing else changes: the same lists, the same ``BRPOP``, every
message still found, so nothing can be stranded by this order.

kombu builds the ``BRPOP`` in ``Channel._brpop_start`` (kombu 5.7, pinned through celery<5.8);
``_brpop_start`` below is that method with the lists' order chosen here, and is installed by a
consumer bootstep the way worker/clock.py installs its QoS.
"""

from __future__ import annotations

import logging
from time import monotonic

from celery import bootsteps
from kombu.transport import redis as kombu_redis

from worker.keys import PRIORITY_STEPS, QUEUE
from worker.stepdefs import PRIORITY_HEAD

log = logging.getLogger("refexp.worker")

#: Seconds between two looks at the head list's length, per channel.
CHECK_EVERY = 1.0
#: The lists in priority order, and with the head steps' list first.
DEPTH_FIRST = tuple(PRIORITY_STEPS)
TAIL_FIRST = (PRIORITY_HEAD, *(p for p in PRIORITY_STEPS if p != PRIORITY_HEAD))


class TailOrder:
    """Which order a channel reads the queue's priority lists in, from how many head messages
    are left (``below``: the head list's length under which heads come first)."""

    below = 0

    def __init__(self) -> None:
        self.checked_at = float("-inf")
        self.order: tuple[int, ...] = DEPTH_FIRST

    def current(self, channel: kombu_redis.Channel) -> tuple[int, ...]:
        now = monotonic()
        if now - self.checked_at >= CHECK_EVERY:
            self.checked_at = now
            self.order = DEPTH_FIRST
            try:
                with channel.conn_or_acquire() as client:
                    left = int(client.llen(channel._q_for_pri(QUEUE, PRIORITY_HEAD)))
            except Exception as exc:  # keep the priority order; the consumer will see Redis fail
                log.debug("head list length unknown (%s: %s): depth-first order kept", type(exc).__name__, exc)
                return self.order
            if 0 < left < self.below:
                self.order = TAIL_FIRST
        return self.order


def order_for(channel: kombu_redis.Channel) -> tuple[int, ...]:
    tail = getattr(channel, "_refexp_tail", None)
    if tail is None:
        tail = channel._refexp_tail = TailOrder()
    return tail.current(channel)


def _brpop_start(self: kombu_redis.Channel, timeout: float | None = None) -> None:
    """kombu's ``Channel._brpop_start``, with the priority lists named in ``order_for``'s order
    (kombu's own: ``self.priority_steps`` ascending)."""
    if timeout is None:
        timeout = self.brpop_timeout
    queues = self._queue_cycle.consume(len(self.active_queues))
    if not queues:
        return
    keys = [self._q_for_pri(queue, pri) for pri in order_for(self) for queue in queues] + [timeout or 0]
    self._in_poll = self.client.connection
    self._brpop_sent_at = monotonic()
    command_args = ["BRPOP", *keys]
    if self.global_keyprefix:
        command_args = self.client._prefix_args(command_args)
    self.client.connection.send_command(*command_args)


def install(below: int) -> None:
    """Make every kombu Redis channel of this process read heads first under ``below`` head messages."""
    TailOrder.below = below
    kombu_redis.Channel._brpop_start = _brpop_start


class TailFirst(bootsteps.StartStopStep):
    """Consumer bootstep: installs the order with this worker's threads (its prefetch count:
    one message per thread) as the measure of "few"."""

    requires = ("celery.worker.consumer.connection:Connection",)

    def __init__(self, c, **kwargs):
        super().__init__(c, **kwargs)
        install(2 * max(1, int(getattr(c, "initial_prefetch_count", 0) or 1)))
