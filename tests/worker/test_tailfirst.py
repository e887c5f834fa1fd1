"""The end-of-run order (worker/tailfirst.py) on a real Redis through kombu's own consumer: the
head steps' list is read first only while fewer head messages than the threshold are left."""

from __future__ import annotations

import pytest
from kombu import Connection, Exchange, Queue
from kombu.transport import redis as kombu_redis

from worker import tailfirst
from worker.app import app
from worker.keys import QUEUE, QUEUE_LISTS
from worker.stepdefs import PRIORITY_HEAD, PRIORITY_LAST, PRIORITY_MIDDLE


@pytest.fixture
def installed(redis_client):
    saved = kombu_redis.Channel._brpop_start, tailfirst.TailOrder.below
    redis_client.delete(*QUEUE_LISTS)
    yield tailfirst.install
    kombu_redis.Channel._brpop_start, tailfirst.TailOrder.below = saved
    redis_client.delete(*QUEUE_LISTS)


def first_taken(redis_url: str, queued: list[tuple[str, int]]) -> str:
    """Publish ``(body, priority)`` messages, then take one the way a worker does (BRPOP)."""
    got: list[str] = []
    with Connection(redis_url, transport_options=app.conf.broker_transport_options) as conn:
        queue = Queue(QUEUE, Exchange(QUEUE), routing_key=QUEUE)
        producer = conn.Producer()
        for body, priority in queued:
            producer.publish(body, exchange=queue.exchange, routing_key=QUEUE, priority=priority, declare=[queue])

        def take(body, message):
            got.append(body)
            message.ack()

        with conn.Consumer(queue, callbacks=[take]):
            conn.drain_events(timeout=10)
    return got[0]


BACKLOG = [("head a", PRIORITY_HEAD), ("head b", PRIORITY_HEAD), ("step 2", PRIORITY_MIDDLE),
           ("step 3", PRIORITY_LAST)]


def test_few_heads_left_are_taken_first(installed, redis_url):
    installed(below=3)  # two head messages left: fewer than three
    assert first_taken(redis_url, BACKLOG) == "head a"


def test_a_head_backlog_waits_behind_later_steps(installed, redis_url):
    installed(below=2)  # two head messages left: not fewer than two
    assert first_taken(redis_url, BACKLOG) == "step 3"


def test_without_head_messages_later_steps_go_in_priority_order(installed, redis_url):
    installed(below=100)
    assert first_taken(redis_url, [("step 2", PRIORITY_MIDDLE), ("step 3", PRIORITY_LAST)]) == "step 3"
