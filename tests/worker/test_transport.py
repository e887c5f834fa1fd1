"""kombu's ack emulation in one sorted set (worker/transport.py), on a real kombu Redis channel.

Killed workers' tasks coming back after the visibility timeout, with real worker processes, are
tests/integration/test_depth_first.py, test_hosts.py and test_faults.py; here the channel is
driven directly.
"""

from __future__ import annotations

import base64
import json
import time
from collections import Counter

import pytest
import redis
from kombu import Connection
from kombu.transport import redis as kombu_redis

from producer.embedded import embedded_redis
from worker.clock import GuardedQoS
from worker.transport import SEP, PipelinedQoS, split_member, unacked_payloads

QUEUE = "transport-test"
MESSAGES, INDEX, HASH = "unacked_messages", "unacked_index", "unacked"


@pytest.fixture(scope="module")
def redis_url():
    """A private server for this module: ``INFO commandstats`` is server-wide, and under xdist the
    suite's other worker may use another database of a shared server (CI's)."""
    with embedded_redis() as url:
        yield url


def _calls(r) -> Counter:
    return Counter({k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in r.info("commandstats").items()})


def _connect(redis_url, monkeypatch, qos=PipelinedQoS, **options):
    monkeypatch.setattr(kombu_redis.Channel, "QoS", qos)
    return Connection(redis_url, transport_options={"visibility_timeout": 6, **options})


@pytest.fixture
def channel(redis_url, redis_client, monkeypatch):
    """A real kombu Redis channel with PipelinedQoS (as worker/clock.py's install() sets it)."""
    with _connect(redis_url, monkeypatch) as conn:
        channel = conn.channel()
        queue = conn.SimpleQueue(QUEUE, channel=channel)
        yield channel, queue
        queue.close()


def _age(redis_client, key: str = MESSAGES, seconds: float = 60) -> None:
    """Make every entry of ``key`` look taken ``seconds`` ago (past the visibility timeout)."""
    for member in redis_client.zrange(key, 0, -1):
        redis_client.zadd(key, {member: time.time() - seconds})


def test_the_worker_qos_is_this_one():
    assert issubclass(GuardedQoS, PipelinedQoS)


def test_receipt_and_ack_are_one_command_each(channel, redis_client):
    _, queue = channel
    queue.put({"n": 1})
    queue.put({"n": 0})
    queue.get(timeout=5).ack()  # warm: the connection, the bindings
    before = _calls(redis_client)
    msg = queue.get(timeout=5)
    mid = _calls(redis_client)
    msg.ack()
    after = _calls(redis_client)
    receipt, ack = mid - before, after - mid - Counter({"info": 1})  # less the reading of mid
    assert ack == Counter({"zrem": 1})
    # The receipt is the pop (kombu's SimpleQueue reads with RPOP; a worker with BRPOP) and one ZADD.
    assert receipt["zadd"] == 1 and set(receipt) <= {"zadd", "rpop", "brpop", "info"}
    assert not redis_client.exists(MESSAGES, HASH, INDEX)


def _body(message: dict) -> dict:
    return json.loads(base64.b64decode(message["body"]))


def test_the_member_carries_the_message(channel, redis_client):
    _, queue = channel
    queue.put({"n": 3})
    msg = queue.get(timeout=5)
    (member,) = redis_client.zrange(MESSAGES, 0, -1)
    tag, raw = split_member(member)
    payload, exchange, routing_key = json.loads(raw)
    assert tag == msg.delivery_tag and member.decode().count(SEP) == 1
    assert _body(payload) == {"n": 3} and (exchange, routing_key) == (QUEUE, QUEUE)
    assert [json.loads(p)[0]["body"] for p in unacked_payloads(redis_client)] == [payload["body"]]
    msg.ack()
    assert list(unacked_payloads(redis_client)) == []


def test_a_dead_workers_message_is_handed_out_again_with_its_payload(channel, redis_url, redis_client, monkeypatch):
    ch, queue = channel
    queue.put({"n": 7})
    with _connect(redis_url, monkeypatch) as dead:  # another worker's connection
        dead.SimpleQueue(QUEUE, channel=dead.channel()).get(timeout=5)  # taken, never acked: its worker died
        ch.qos.restore_visible(num=10, interval=1)
        assert redis_client.zcard(MESSAGES) == 1, "younger than the visibility timeout: left alone"
        _age(redis_client)
        ch.qos.restore_visible(num=10, interval=1)
        assert redis_client.zcard(MESSAGES) == 0
        again = queue.get(timeout=5)
    # (leaving the dead worker's block closed its connection, whose restore found nothing to push)
    assert redis_client.llen(QUEUE) == 0
    assert again.payload == {"n": 7} and again.headers.get("redelivered") is True
    assert again.delivery_info.get("redelivered") is True
    again.ack()
    assert redis_client.zcard(MESSAGES) == 0


def test_a_restore_and_an_ack_never_both_win(channel, redis_client):
    """The sweep's script removes the member and pushes only if it was still there: a message
    acked first is not pushed, and one restored twice is pushed once."""
    ch, queue = channel
    queue.put({"n": 1})
    msg = queue.get(timeout=5)
    (member,) = redis_client.zrange(MESSAGES, 0, -1)
    msg.ack()
    with ch.conn_or_acquire() as client:
        assert ch.qos._restore_member(member, client) is False
    assert redis_client.llen(QUEUE) == 0
    queue.put({"n": 2})
    queue.get(timeout=5)
    (member,) = redis_client.zrange(MESSAGES, 0, -1)
    with ch.conn_or_acquire() as client:
        assert ch.qos._restore_member(member, client) is True
        assert ch.qos._restore_member(member, client) is False
    assert redis_client.llen(QUEUE) == 1


def test_reject_with_and_without_requeue(channel, redis_client):
    _, queue = channel
    queue.put({"n": 1})
    queue.get(timeout=5).reject()
    assert redis_client.zcard(MESSAGES) == 0 and redis_client.llen(QUEUE) == 0
    queue.put({"n": 2})
    queue.put({"n": 3})
    queue.get(timeout=5).requeue()  # {"n": 2} back, behind {"n": 3} (kombu's LPUSH)
    assert redis_client.zcard(MESSAGES) == 0
    assert [queue.get(timeout=5).payload for _ in range(2)] == [{"n": 3}, {"n": 2}]


def test_warm_shutdown_gives_back_the_messages_still_held(redis_url, redis_client, monkeypatch):
    with _connect(redis_url, monkeypatch) as conn:
        ch = conn.channel()
        queue = conn.SimpleQueue(QUEUE, channel=ch)
        for n in range(3):
            queue.put({"n": n})
        held = [queue.get(timeout=5) for _ in range(3)]
        held[1].ack()
        ch.qos.restore_unacked()
        assert redis_client.zcard(MESSAGES) == 0 and ch.qos._members == {}
        back = sorted(queue.get(timeout=5).payload["n"] for _ in range(2))
        assert back == [0, 2] and redis_client.llen(QUEUE) == 0
        queue.close()


def _legacy_entry(redis_client, body: dict, stamp: float) -> str:
    """A message held the way kombu and the earlier release keep it: the tag in ``unacked_index``,
    ``[message, exchange, routing key]`` in the ``unacked`` hash."""
    raw = redis_client.rpop(QUEUE)
    message = json.loads(raw)
    assert _body(message) == body
    tag = message["properties"]["delivery_tag"]
    redis_client.hset(HASH, tag, json.dumps([message, QUEUE, QUEUE]))
    redis_client.zadd(INDEX, {tag: stamp})
    return tag


def test_an_earlier_workers_entry_is_restored_by_the_sweep(channel, redis_client):
    ch, queue = channel
    queue.put({"n": 5})
    _legacy_entry(redis_client, {"n": 5}, time.time() - 60)
    assert [json.loads(p)[0]["properties"]["delivery_tag"] for p in unacked_payloads(redis_client)] != []
    ch.qos.restore_visible(num=10, interval=1)
    assert not redis_client.exists(HASH, INDEX)
    again = queue.get(timeout=5)
    assert again.payload == {"n": 5} and again.headers.get("redelivered") is True
    again.ack()


def test_an_index_entry_left_without_its_message_is_dropped_by_the_sweep(channel, redis_client):
    ch, _ = channel
    redis_client.zadd(INDEX, {"half-acked": time.time() - 60})
    ch.qos.restore_visible(num=10, interval=1)
    assert redis_client.zcard(INDEX) == 0 and redis_client.llen(QUEUE) == 0


def test_an_earlier_workers_sweep_leaves_the_new_members_alone(redis_url, redis_client, monkeypatch):
    """A mixed fleet: kombu's own sweep (an earlier worker's) reads only ``unacked_index``, so it
    cannot drop a member it would not know how to restore; a new worker's sweep restores it."""
    with _connect(redis_url, monkeypatch) as conn:
        queue = conn.SimpleQueue(QUEUE, channel=conn.channel())
        queue.put({"n": 9})
        queue.get(timeout=5)  # held by a new worker that dies
        _age(redis_client)
    # close() gave the held message back (warm shutdown): take it back out of the queue and make
    # the member look like a dead worker's again.
    raw = redis_client.rpop(QUEUE)
    payload = json.loads(raw)
    payload["headers"].pop("redelivered", None)
    payload["properties"]["delivery_info"].pop("redelivered", None)
    member = f"dead-tag{SEP}{json.dumps([payload, QUEUE, QUEUE])}"
    redis_client.zadd(MESSAGES, {member: time.time() - 60})
    with _connect(redis_url, monkeypatch, qos=kombu_redis.QoS) as old:
        old.SimpleQueue(QUEUE, channel=old.channel())
        old.default_channel.qos.restore_visible(num=10, interval=1)
        assert redis_client.zcard(MESSAGES) == 1 and redis_client.llen(QUEUE) == 0
    with _connect(redis_url, monkeypatch) as conn:
        queue = conn.SimpleQueue(QUEUE, channel=conn.channel())
        conn.default_channel.qos.restore_visible(num=10, interval=1)
        assert redis_client.zcard(MESSAGES) == 0
        again = queue.get(timeout=5)
        assert again.payload == {"n": 9} and again.headers.get("redelivered") is True
        again.ack()
        queue.close()


def test_a_global_key_prefix_prefixes_every_key_of_the_restore(redis_url, redis_client, monkeypatch):
    """kombu's client prefixes only a script's first key; the script's queue keys are prefixed
    here."""
    with _connect(redis_url, monkeypatch, global_keyprefix="pfx:") as conn:
        ch = conn.channel()
        queue = conn.SimpleQueue(QUEUE, channel=ch)
        queue.put({"n": 4})
        queue.get(timeout=5)
        assert redis_client.zcard(f"pfx:{MESSAGES}") == 1
        _age(redis_client, f"pfx:{MESSAGES}")
        ch.qos.restore_visible(num=10, interval=1)
        assert redis_client.zcard(f"pfx:{MESSAGES}") == 0 and redis_client.llen(f"pfx:{QUEUE}") == 1
        assert not redis_client.exists(QUEUE)
        again = queue.get(timeout=5)
        assert again.payload == {"n": 4}
        again.ack()
        queue.close()


def test_an_unroutable_message_is_logged_and_dropped_as_kombu_does(channel, redis_client, caplog):
    ch, _ = channel
    redis_client.zadd(MESSAGES, {f"bad-tag{SEP}not json": time.time() - 60})
    ch.qos.restore_visible(num=10, interval=1)
    assert redis_client.zcard(MESSAGES) == 0
    assert any("Could not restore message" in r.getMessage() for r in caplog.records)


def _task_message(args: list) -> dict:
    """A Celery task message as kombu stores it (protocol 2 body, base64)."""
    body = base64.b64encode(json.dumps([args, {}, {}]).encode()).decode()
    return {"body": body, "headers": {"task": "t", "argsrepr": repr(args)}, "properties": {"body_encoding": "base64"}}


def test_the_reconciler_sees_the_messages_held_in_either_format(redis_client):
    """An image whose message a worker holds is not stranded, whichever release's worker holds it."""
    from producer.reconcile import referenced

    new = f"tag-1{SEP}{json.dumps([_task_message(['run1:0', 'img-new']), QUEUE, QUEUE])}"
    redis_client.zadd(MESSAGES, {new: time.time()})
    redis_client.hset(HASH, "tag-2", json.dumps([_task_message(["run1:0", "img-old"]), QUEUE, QUEUE]))
    redis_client.zadd(INDEX, {"tag-2": time.time()})
    redis_client.hset(HASH, "tag-3", json.dumps([_task_message(["run2:0", "img-other-run"]), QUEUE, QUEUE]))
    assert referenced(redis_client, "run1") == {"img-new", "img-old"}


def test_a_redis_that_refuses_writes_loses_no_held_message(monkeypatch):
    """``maxmemory`` with ``noeviction`` refuses ``RPUSH`` but not ``ZREM``. A requeue and a warm
    shutdown's restore remove the member and push the message in ONE script, and Redis lets a
    script that has written go on writing, so each message is pushed; the sweep takes kombu's
    mutex first, which a full Redis refuses, so it changes nothing. Were the ``ZREM`` and the
    push two commands, the push would be refused after the member was gone: the message lost.
    On a private server (CONFIG SET is server-wide)."""
    with embedded_redis() as url:
        r = redis.Redis.from_url(url)
        with _connect(url, monkeypatch, qos=GuardedQoS) as conn:
            ch = conn.channel()
            queue = conn.SimpleQueue(QUEUE, channel=ch)
            for n in range(3):
                queue.put({"n": n, "pad": "x" * 2000})
            held = [queue.get(timeout=5) for _ in range(3)]
            _age(r)
            r.config_set("maxmemory-policy", "noeviction")
            r.config_set("maxmemory", str(max(1, int(r.info("memory")["used_memory"]) - 100_000)))
            try:
                with pytest.raises(redis.exceptions.ResponseError, match="maxmemory"):
                    r.rpush("probe", "x" * 1000)
                ch.qos.restore_visible(num=10, interval=1)  # refused: logged, nothing changed
                assert r.zcard(MESSAGES) == 3 and r.llen(QUEUE) == 0
                held[0].reject(requeue=True)  # a task's Reject(requeue=True)
                ch.qos.restore_unacked()  # warm shutdown: the two still held
            finally:
                r.config_set("maxmemory", "0")
            assert r.zcard(MESSAGES) == 0 and r.llen(QUEUE) == 3
            back = sorted(queue.get(timeout=5).payload["n"] for _ in range(3))
            assert back == [0, 1, 2]
            queue.close()


def _hand_out_again(redis_client, ch) -> None:
    """The sweep finds the held messages older than the visibility timeout (their holder looks
    dead: a task that outran the timeout, a paused worker) and hands them out again."""
    _age(redis_client)
    ch.qos.restore_visible(num=10, interval=1)


def test_an_earlier_holders_ack_leaves_a_later_holders_record(redis_url, redis_client, monkeypatch):
    """A message handed out again while its first holder still runs it is held twice, under one
    delivery tag. The first holder's ack must remove its own delivery's record only: were the
    second holder's record removed too, its worker dying would leave the message nowhere (not
    in the queue, not held). Here the message is handed out again twice (so both deliveries
    carry the same redelivered flags: the same payload), to workers on two connections."""
    with _connect(redis_url, monkeypatch) as conn_a, _connect(redis_url, monkeypatch) as conn_b:
        ch_a, ch_b = conn_a.channel(), conn_b.channel()
        queue_a, queue_b = conn_a.SimpleQueue(QUEUE, channel=ch_a), conn_b.SimpleQueue(QUEUE, channel=ch_b)
        queue_a.put({"n": 5})
        queue_a.get(timeout=5)  # its worker died
        _hand_out_again(redis_client, ch_a)
        first = queue_a.get(timeout=5)  # a redelivery, run for longer than the visibility timeout
        _hand_out_again(redis_client, ch_b)
        second = queue_b.get(timeout=5)
        assert second.delivery_tag == first.delivery_tag and redis_client.zcard(MESSAGES) == 1
        first.ack()
        assert redis_client.zcard(MESSAGES) == 1, "the first holder's ack removed the second holder's record"
        _hand_out_again(redis_client, ch_a)  # the second holder died: its message comes back
        assert queue_a.get(timeout=5).payload == {"n": 5}
        queue_a.close()
        queue_b.close()


def test_a_message_held_twice_by_one_worker_keeps_the_later_record(channel, redis_client):
    """The same within one worker: the message it runs is handed out again (the visibility
    timeout passed) and taken by another of its threads. The ack of the earlier delivery leaves
    the later one's record (the sweep removed the earlier's), and the later ack removes it."""
    ch, queue = channel
    queue.put({"n": 6})
    first = queue.get(timeout=5)
    _hand_out_again(redis_client, ch)
    second = queue.get(timeout=5)
    assert second.delivery_tag == first.delivery_tag and redis_client.zcard(MESSAGES) == 1
    first.ack()
    assert redis_client.zcard(MESSAGES) == 1, "the earlier delivery's ack removed the later one's record"
    second.ack()
    assert redis_client.zcard(MESSAGES) == 0 and redis_client.llen(QUEUE) == 0


def test_a_warm_shutdown_gives_back_a_message_held_twice_once(channel, redis_client):
    """kombu's ``_delivered`` lists a tag held twice once (and forgets it at the first ack): the
    warm shutdown's restore goes by the members held, so the later delivery, still running, goes
    back to the queue, once."""
    ch, queue = channel
    queue.put({"n": 8})
    first = queue.get(timeout=5)
    _hand_out_again(redis_client, ch)
    queue.get(timeout=5)  # the later delivery, still running at the shutdown
    first.ack()
    ch.qos._flush()  # kombu drops the tag from _delivered at its next receipt
    ch.qos.restore_unacked()
    assert redis_client.zcard(MESSAGES) == 0 and redis_client.llen(QUEUE) == 1
    assert queue.get(timeout=5).payload == {"n": 8}
