"""Publishing chords keeps no per-task state in the producer, nor subscriptions in Redis.

A real Redis and the real Celery app: the producer's canvases are published as ``enqueue`` does
(no worker is running, so they stay queued), then we look at what the sender holds.
"""

from __future__ import annotations

import json

import pytest
import redis

from producer.embedded import embedded_redis
from producer.publish import canvas
from worker.keys import QUEUE_LISTS, queue_list
from worker.stepdefs import STEP


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


def test_chord_counting_counts_each_header_task_once_sends_the_body_once_and_leaves_no_join_state(app, redis_client):
    # worker/result_backend.py replaces Celery's part-return script with a leaner one: the same
    # contract, driven here as a worker drives it when a header task returns.
    from types import SimpleNamespace

    backend = app.backend
    assert type(backend).__name__ == "RefexpRedisBackend"
    body = app.signature("refexp.grounding_expr", args=("run0:spec0", "img", 0), immutable=True)
    gid = "g-test"
    backend.set_chord_size(gid, 2)

    def part(tid: str, index: int) -> None:
        request = SimpleNamespace(id=tid, group=gid, group_index=index, chord=dict(body))
        backend.on_chord_part_return(request, "SUCCESS", "done")

    part("t0", 0)
    part("t0", 0)  # a redelivered header task counts once
    assert redis_client.llen("refexp") == 0
    for suffix in (".j", ".d", ".s"):
        assert 0 < redis_client.ttl(f"celery-taskset-meta-{gid}{suffix}") <= app.conf.result_chord_expires
    part("t1", 1)
    assert redis_client.llen("refexp") == 1  # the body, sent once
    assert json.loads(redis_client.lindex("refexp", 0))["headers"]["task"] == "refexp.grounding_expr"
    left = sorted(k.decode() for k in redis_client.scan_iter(f"celery-taskset-meta-{gid}*"))
    assert left == [f"celery-taskset-meta-{gid}.c"]  # Celery's short-lived "done" marker only
    part("t1", 1)  # a late duplicate sends nothing and recreates nothing
    assert redis_client.llen("refexp") == 1
    assert sorted(k.decode() for k in redis_client.scan_iter(f"celery-taskset-meta-{gid}*")) == left


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
