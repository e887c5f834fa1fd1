"""kombu's ack emulation in plain pipelines (worker/transport.py), on a real kombu Redis channel.

Killed workers' tasks coming back after the visibility timeout, with real worker processes, are
tests/integration/test_hosts.py and test_faults.py; here the channel is driven directly.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
from kombu import Connection
from kombu.transport import redis as kombu_redis

from producer.embedded import embedded_redis
from worker.clock import GuardedQoS
from worker.transport import PipelinedQoS

QUEUE = "transport-test"


@pytest.fixture(scope="module")
def redis_url():
    """A private server for this module: ``INFO commandstats`` is server-wide, and under xdist the
    suite's other worker may use another database of a shared server (CI's)."""
    with embedded_redis() as url:
        yield url


def _calls(r) -> Counter:
    return Counter({k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in r.info("commandstats").items()})


@pytest.fixture
def channel(redis_url, redis_client, monkeypatch):
    """A real kombu Redis channel with PipelinedQoS (as worker/clock.py's install() sets it)."""
    monkeypatch.setattr(kombu_redis.Channel, "QoS", PipelinedQoS)
    with Connection(redis_url, transport_options={"visibility_timeout": 6}) as conn:
        channel = conn.channel()
        queue = conn.SimpleQueue(QUEUE, channel=channel)
        yield channel, queue
        queue.close()


def test_the_worker_qos_is_the_pipelined_one():
    assert issubclass(GuardedQoS, PipelinedQoS)


def test_receipt_and_ack_are_four_commands_with_no_transaction(channel, redis_client):
    _, queue = channel
    queue.put({"n": 1})
    before = _calls(redis_client)
    msg = queue.get(timeout=5)
    tag = msg.delivery_tag
    assert redis_client.hexists("unacked", tag) and redis_client.zscore("unacked_index", tag) is not None
    mid = _calls(redis_client)
    msg.ack()
    after = _calls(redis_client)
    assert not redis_client.hexists("unacked", tag) and redis_client.zscore("unacked_index", tag) is None
    receipt, ack = mid - before, after - mid
    for used in (receipt, ack):
        assert used["multi"] == 0 and used["exec"] == 0
    assert receipt["zadd"] == 1 and receipt["hset"] == 1
    assert ack["hdel"] == 1 and ack["zrem"] == 1


def test_the_ack_removes_the_message_before_its_index_entry(channel):
    """A connection lost between the two leaves an index entry without a message (swept away,
    below), never a message without an index entry (which no sweep would ever find)."""
    ch, _ = channel
    with ch.conn_or_acquire() as client:
        pipe = ch.qos._remove_from_indices("some-tag", client.pipeline(transaction=False))
        assert [c[0][0] for c in pipe.command_stack] == ["HDEL", "ZREM"]
        pipe.reset()


def test_an_index_entry_left_without_its_message_is_dropped_by_the_sweep(channel, redis_client):
    ch, _ = channel
    redis_client.zadd("unacked_index", {"half-acked": time.time() - 60})
    ch.qos.restore_visible(num=10, interval=1)
    assert redis_client.zcard("unacked_index") == 0 and redis_client.llen(QUEUE) == 0


def test_a_dead_workers_message_is_still_handed_out_again(channel, redis_client):
    ch, queue = channel
    queue.put({"n": 7})
    msg = queue.get(timeout=5)  # taken, never acked: its worker died
    redis_client.zadd("unacked_index", {msg.delivery_tag: time.time() - 60})  # past the visibility timeout
    ch.qos.restore_visible(num=10, interval=1)
    assert redis_client.hlen("unacked") == 0 and redis_client.zcard("unacked_index") == 0
    again = queue.get(timeout=5)
    assert again.payload == {"n": 7} and again.headers.get("redelivered") is True
    again.ack()
