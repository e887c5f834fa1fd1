"""Publishing chords keeps no per-task state in the producer, nor subscriptions in Redis.

A real Redis and the real Celery app: the producer's canvases are published as ``enqueue`` does
(no worker is running, so they stay queued), then we look at what the sender holds.
"""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import pytest
import redis
from celery import chord as celery_chord
from celery import group

from producer.embedded import embedded_redis
from producer.publish import canvas
from worker.keys import QUEUE_LISTS, queue_list
from worker.result_backend import MAX_PARTS, chord_bits, read_field
from worker.stepdefs import STEP


@pytest.fixture(scope="module")
def redis_url():
    """A private server for this module: the counting tests read ``INFO commandstats``, which is
    server-wide, and under xdist the suite's other worker may use another database of a shared
    server (CI's)."""
    with embedded_redis() as url:
        yield url


@pytest.fixture
def app(redis_client, redis_url):
    from worker.app import app, repoint

    repoint(redis_url)
    yield app
    redis_client.delete(*QUEUE_LISTS)


def test_publishing_chords_registers_no_pending_results_and_no_subscriptions(redis_url):
    """On a private server: pub/sub channels are server-wide (not per database), and the
    suite's other test worker may be using another database of the shared one."""
    from worker.app import app, repoint

    with embedded_redis() as url:
        repoint(url)
        try:
            _publish_and_look(app, redis.Redis.from_url(url))
        finally:
            repoint(redis_url)


def _publish_and_look(app, redis_client: redis.Redis) -> None:
    backend = app.backend
    for i in range(200):
        canvas([0, 1, 2, 3], "run0:spec0", f"img_{i:04d}", i).apply_async()
    assert redis_client.llen(queue_list(STEP[0].priority)) == 400  # both header tasks of every chord are queued
    concrete, weak = backend._pending_results
    assert len(concrete) == 0 and len(weak) == 0, "the sender tracks results it will never wait on"
    channels = redis_client.pubsub_channels("celery-task-meta-*")
    assert channels == [], f"the sender subscribed to {len(channels)} result channels"


def test_every_step_is_sent_to_store_no_result(app, redis_client):
    # The producer sends tasks by name; a request's ignore_result overrides the task's, so the
    # message must say it (worker/stepdefs.RESULTLESS_STEPS). The chord header stores none either:
    # chord counting does not read stored results (test_fleet proves the body still runs).
    canvas([0, 1, 2, 3], "run0:spec0", "img_0000", 0).apply_async()
    raw = redis_client.lindex(queue_list(STEP[0].priority), 0)
    msg = json.loads(raw)
    assert msg["headers"]["ignore_result"] is True
    _args, _kwargs, embed = json.loads(msg["body"])
    body = embed["chord"]
    tails = {t["task"]: t["options"].get("ignore_result") for t in body["kwargs"]["tasks"]}
    assert tails == {"refexp.grounding_expr": True, "refexp.double_check": True}


#: What opening a connection sends (redis-py's ``CLIENT SETINFO``, kombu's handshake): whether a
#: pool opens one during a count depends on which tests ran before in the process.
_HANDSHAKE = ("info", "client", "hello", "select", "ping")


def _calls(r) -> Counter:
    """Commands Redis ran so far, by name, less the ``INFO``s that read them and connections'
    handshakes."""
    calls = Counter({k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in r.info("commandstats").items()})
    for name in _HANDSHAKE:
        calls.pop(name, None)
    return calls


@pytest.fixture
def chord(app, redis_client):
    """``(backend, part, body_sent)`` for one chord ``g-test`` of the given size, counted as a
    worker counts a header task that returns (worker/result_backend.py)."""
    backend = app.backend
    assert type(backend).__name__ == "RefexpRedisBackend"
    body = app.signature("refexp.grounding_expr", args=("run0:spec0", "img", 0), immutable=True)

    def part(tid: str, index: int | None, state: str = "SUCCESS", gid: str = "g-test", chord_body=None) -> None:
        request = SimpleNamespace(id=tid, group=gid, group_index=index, chord=dict(chord_body or body))
        backend.on_chord_part_return(request, state, "done")

    def body_sent() -> int:
        return redis_client.llen("refexp")

    # Warm the publishing path, as a worker's first task does: the app's first publish declares
    # the queue (kombu's bindings) and opens the producer's connection, which the counting
    # tests must not count as chord counting's.
    body.apply_async()
    redis_client.delete(*QUEUE_LISTS)
    yield backend, part, body_sent
    redis_client.delete("refexp")


def chord_keys(redis_client, gid: str = "g-test") -> list[str]:
    return sorted(k.decode().rsplit("-", 1)[-1] for k in redis_client.scan_iter(f"celery-taskset-meta-{gid}*"))


def test_chord_counting_counts_each_header_task_once_sends_the_body_once_and_leaves_nothing(chord, redis_client, app):
    backend, part, body_sent = chord
    backend.set_chord_size("g-test", 2)
    assert 0 < redis_client.ttl("celery-taskset-meta-g-test.b") <= app.conf.result_chord_expires
    before = _calls(redis_client)
    part("t0", 0)
    assert +(_calls(redis_client) - before) == Counter(bitfield=1)  # one command per header task
    part("t0", 0)  # a redelivered header task counts once
    assert body_sent() == 0 and chord_keys(redis_client) == ["test.b"]
    before = _calls(redis_client)
    part("t1", 1)
    # the last part: its count, the claim, the body's LPUSH, and the chord's keys deleted
    assert +(_calls(redis_client) - before) == Counter(bitfield=1, set=1, lpush=1, **{"del": 1})
    assert body_sent() == 1  # the body, sent once
    assert json.loads(redis_client.lindex("refexp", 0))["headers"]["task"] == "refexp.grounding_expr"
    assert chord_keys(redis_client) == []  # no join state, no marker
    part("t1", 1)  # a late duplicate sends nothing and leaves nothing
    part("t0", 0)
    assert body_sent() == 1 and chord_keys(redis_client) == []


def test_the_body_waits_for_every_header_task_whatever_their_order_and_duplicates(chord, redis_client):
    backend, part, body_sent = chord
    backend.set_chord_size("g-test", 3)
    for tid, index in (("t2", 2), ("t2", 2), ("t0", 0), ("t2", 2), ("t0", 0)):
        part(tid, index)
        assert body_sent() == 0
    part("t1", 1)
    assert body_sent() == 1
    for tid, index in (("t0", 0), ("t1", 1), ("t2", 2)):
        part(tid, index)
    assert body_sent() == 1


def test_a_part_redelivered_after_the_claimant_died_sends_the_body(chord, redis_client):
    """The worker that counted the last part died before sending the body (its BITFIELD ran, then
    nothing): the redelivered part finds the chord complete and the claim free, and sends it."""
    backend, part, body_sent = chord
    backend.set_chord_size("g-test", 2)
    part("t0", 0)
    # t1 counted, then its worker died
    redis_client.execute_command("BITFIELD", "celery-taskset-meta-g-test.b", "SET", "u1", 3, 0)
    assert body_sent() == 0
    part("t1", 1)  # the redelivery
    assert body_sent() == 1 and chord_keys(redis_client) == []


def test_a_part_finding_the_chord_complete_while_the_claimant_sends_sends_nothing(chord, redis_client):
    backend, part, body_sent = chord
    backend.set_chord_size("g-test", 2)
    part("t0", 0)
    redis_client.execute_command("BITFIELD", "celery-taskset-meta-g-test.b", "SET", "u1", 3, 0)
    redis_client.set("celery-taskset-meta-g-test.c", "the-claimants-token", ex=30)  # claimed, being sent
    part("t0", 0)
    part("t1", 1)
    assert body_sent() == 0
    assert chord_keys(redis_client) == ["test.b", "test.c"]  # the claimant deletes them once it has sent


def test_a_retried_count_sends_the_body_once_whichever_reply_was_lost(chord, redis_client, app):
    """``on_chord_part_return`` retries a count whose connection broke (the backend's ``ensure``)
    with the same claim token and memory of what it sent: a claim taken in a lost reply is its own
    (it sends), and a body already sent is not sent again (it only deletes the keys)."""
    backend, part, body_sent = chord
    body = app.signature("refexp.grounding_expr", args=("run0:spec0", "img", 0), immutable=True)
    request = SimpleNamespace(id="t1", group="g-test", group_index=1, chord=dict(body))
    for sent, expected in (([], 1), ([True], 0)):
        backend.set_chord_size("g-test", 2)
        part("t0", 0)
        redis_client.execute_command(
            "BITFIELD", "celery-taskset-meta-g-test.b", "SET", "u1", 3, 0)  # the first attempt counted
        redis_client.set("celery-taskset-meta-g-test.c", "tok", ex=30)  # ... and took the claim
        backend._count_part(request, "SUCCESS", "done", 1, "tok", sent)
        assert body_sent() == expected and chord_keys(redis_client) == []
        redis_client.delete("refexp")


def test_a_failed_header_task_fails_the_body_instead_of_sending_it(chord, redis_client):
    backend, part, body_sent = chord
    backend.set_chord_size("g-test", 2)
    part("t0", 0, state="FAILURE")
    part("t1", 1)
    assert body_sent() == 0 and chord_keys(redis_client) == []


def test_a_body_that_takes_the_header_results_is_failed_not_called_without_them(chord, redis_client, app):
    backend, part, body_sent = chord
    backend.set_chord_size("g-test", 1)
    part("t0", 0, chord_body=app.signature("refexp.grounding_expr", args=("run0:spec0",)))
    assert body_sent() == 0 and chord_keys(redis_client) == []


def test_chords_this_path_does_not_take_are_joined_by_celery(chord, redis_client):
    """A chord published the Celery way (a producer of an earlier version: a ``.s`` size key),
    one too big for a bit string, and a part without a group index: Celery's join counts them."""
    from celery.backends.redis import RedisBackend

    backend, part, body_sent = chord
    RedisBackend.set_chord_size(backend, "g-old", 2)
    part("t0", 0, gid="g-old")
    part("t0", 0, gid="g-old")
    assert body_sent() == 0 and "old.b" not in chord_keys(redis_client, "g-old")
    part("t1", 1, gid="g-old")
    assert body_sent() == 1
    big = MAX_PARTS + 1
    backend.set_chord_size("g-big", big)
    assert chord_keys(redis_client, "g-big") == ["big.s"]
    for i in range(big):
        part(f"b{i}", i, gid="g-big")
    assert body_sent() == 2
    backend.set_chord_size("g-none", 1)
    part("n0", None, gid="g-none")  # not counted on the bit string: the chord waits (as Celery's would)
    assert body_sent() == 2


def test_a_chords_bits_read_back(chord):
    backend, _, _ = chord
    for size in (0, 1, 2, MAX_PARTS, MAX_PARTS + 1):
        backend.set_chord_size("g-size", size)
        assert backend.pop_chord_size("g-size") == size
    assert read_field(int.from_bytes(chord_bits(2), "big") >> 1) == (True, False, 0b11 << (MAX_PARTS - 2))
    with pytest.raises(ValueError):
        chord_bits(MAX_PARTS + 1)


def test_each_step_is_published_with_its_priority_and_the_tail_carries_its_own(app, redis_client):
    # Depth-first: the header messages sit in the head steps' priority list, and the chord body
    # (step 2 chained to step 3), which a worker sends later from this very signature, carries
    # each later step's own priority (worker/stepdefs.py).
    canvas([0, 1, 2, 3], "run0:spec0", "img_0000", 0).apply_async()
    assert STEP[3].priority < STEP[2].priority < STEP[0].priority == STEP[1].priority
    assert [redis_client.llen(k) for k in QUEUE_LISTS] == [0, 0, 2, 0]
    msg = json.loads(redis_client.lindex(queue_list(STEP[0].priority), 0))
    assert msg["properties"]["priority"] == STEP[0].priority
    _args, _kwargs, embed = json.loads(msg["body"])
    tails = {t["task"]: t["options"].get("priority") for t in embed["chord"]["kwargs"]["tasks"]}
    assert tails == {"refexp.grounding_expr": STEP[2].priority, "refexp.double_check": STEP[3].priority}


@pytest.mark.parametrize("size", [2, MAX_PARTS + 1])
def test_a_header_task_that_returns_before_celery_sets_the_chord_size_is_counted(chord, redis_client, app, size):
    """Celery's canvas (``apply_async``, the producer's fallback when a canvas has no template)
    sends a chord's first header task before it sets the chord's size (``group._apply_tasks``
    calls ``set_chord_size`` just before the last one). A first header task that returns in
    between (a worker skipping a step already done takes milliseconds) must still count: its
    bit must not be set pending again after it cleared it, or the body never goes out."""
    from celery.signals import after_task_publish

    _, part, body_sent = chord
    sent: dict[int, tuple[str, str]] = {}

    def returns_at_once(sender=None, headers=None, **_: object) -> None:
        index = (headers or {}).get("group_index")
        if index is not None and headers.get("group"):
            sent[index] = (headers["id"], headers["group"])
            if index == 0:  # a worker took it and returned before Celery went on
                part(headers["id"], 0, gid=headers["group"])

    after_task_publish.connect(returns_at_once, weak=False)
    try:
        if size == 2:
            canvas([0, 1, 2, 3], "run0:spec0", "img_early", 0).apply_async()
        else:  # too big for a bit string: Celery's join, whose size key must be there first too
            header = [app.signature("refexp.grounding_expr", args=("run0:spec0", f"img_{i}", i), immutable=True,
                                    options={"priority": STEP[0].priority}) for i in range(size)]
            celery_chord(group(header), app.signature("refexp.double_check", args=("run0:spec0", "img", 0),
                                                      immutable=True, options={"priority": STEP[0].priority})
                         ).apply_async()
    finally:
        after_task_publish.disconnect(returns_at_once)
    assert sorted(sent) == list(range(size))
    gid = sent[0][1]
    for index in range(1, size):
        assert body_sent() == 0
        part(sent[index][0], index, gid=gid)
    assert body_sent() == 1
    if size == 2:
        assert chord_keys(redis_client, gid) == []


def test_sizes_remembered_for_publishes_that_failed_midway_stay_bounded(chord, redis_client, app):
    """A publish that fails between ``apply_chord`` and ``set_chord_size`` leaves its size
    remembered: the oldest go, and a chord being published keeps its counts."""
    from celery.result import AsyncResult

    from worker.result_backend import PRESET_KEPT

    backend, part, body_sent = chord
    for i in range(PRESET_KEPT + 5):
        backend.apply_chord((f"g-lost{i}", [AsyncResult(f"x{i}-0", app=app), AsyncResult(f"x{i}-1", app=app)]), None)
    assert len(backend._preset) == PRESET_KEPT
    backend.apply_chord(("g-test", [AsyncResult("t0", app=app), AsyncResult("t1", app=app)]), None)
    part("t0", 0)  # returned before Celery set the size
    backend.set_chord_size("g-test", 2)
    part("t1", 1)
    assert body_sent() == 1
    redis_client.delete(*(f"celery-taskset-meta-g-lost{i}.b" for i in range(PRESET_KEPT + 5)))
    backend._preset.clear()
