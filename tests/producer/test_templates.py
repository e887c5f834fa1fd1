"""Templated publishing (``producer/templates.py``): what reaches Redis is what Celery's own
``apply_async`` sends, field by field, for every canvas shape; and a publish cut by Redis leaves
nothing marked in flight.

A real Redis and the real Celery app, no worker: the messages stay queued for us to read. The
chord still joining under real workers is ``tests/integration/test_fleet.py``'s to show.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import redis

from producer.embedded import embedded_redis
from producer.enqueue import publish_chunk
from producer.publish import Publisher, publish_items, publish_items_plain
from worker.keys import QUEUE_LISTS
from worker.result_backend import chord_bits
from worker.runstate import RunState

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@pytest.fixture
def app(redis_client, redis_url):
    from worker.app import app, repoint

    repoint(redis_url)
    yield app
    redis_client.delete(*QUEUE_LISTS)


def take_sent(r: redis.Redis) -> tuple[list[dict], dict[str, tuple[bytes, int]]]:
    """Everything published since the last call, removed from Redis: the queued messages (oldest
    first, envelope and body decoded) and the chord-size keys (value, TTL)."""
    raw = [m for q in QUEUE_LISTS for m in r.lrange(q, 0, -1)[::-1]]  # each priority's list
    r.delete(*QUEUE_LISTS)
    messages = []
    for m in raw:
        env = json.loads(m)
        assert env["properties"]["body_encoding"] == "utf-8"
        env["body"] = json.loads(env["body"])
        messages.append(env)
    sizes = {}
    for key in r.scan_iter(match="celery-taskset-meta-*"):
        sizes[key.decode()] = (r.get(key), r.ttl(key))
        r.delete(key)
    return messages, sizes


def normalised(messages: list[dict], sizes: dict) -> tuple[str, list]:
    """Messages and chord-size keys with every uuid named by its order of first appearance
    (``id0``, ``id1``...), so two publishes of one canvas compare equal iff they have the same
    shape of ids; TTLs rounded to the hour."""
    text = json.dumps(messages, sort_keys=True)
    names: dict[str, str] = {}
    for u in UUID.findall(text):
        names.setdefault(u, f"id{len(names)}")
    keys = sorted((UUID.sub(lambda m: names.get(m.group(0), "unknown"), k), v, round(ttl, -4))
                  for k, (v, ttl) in sizes.items())
    return UUID.sub(lambda m: names[m.group(0)], text), keys


SHAPES = [[0, 1, 2, 3], [0, 1, 2], [0, 1, 3], [0, 1], [0, 2, 3], [1, 2, 3], [2, 3], [0], [1], [2], [3]]
ODD_IDS = ["img_0000001", "it's a \"quoted\" id", "ünïcödé_ßtem", "back\\slash", "x" * 300]


@pytest.mark.parametrize("steps", SHAPES, ids=lambda s: "steps" + "".join(map(str, s)))
def test_templated_messages_are_what_apply_async_sends_field_by_field(app, redis_client, steps):
    for image_id in ODD_IDS:
        item = (steps, "run7:spec9", image_id, 1234)
        publish_items_plain([item])
        plain = take_sent(redis_client)
        publish_items([item])
        templated = take_sent(redis_client)
        assert plain[0], "apply_async published nothing: the comparison would prove nothing"
        assert len(templated[0]) == len(plain[0])
        assert normalised(*templated) == normalised(*plain)
        assert all(m["body"][0] == ["run7:spec9", image_id, 1234] for m in templated[0])
    # a chord sets one key: its bit string, 2 header tasks to count (worker/result_backend.py)
    if steps[:2] == [0, 1] and len(steps) > 2:
        assert [v for v, _ttl in plain[1].values()] == [chord_bits(2)]
        assert [k.rsplit(".", 1)[1] for k in plain[1]] == ["b"]


def test_every_image_gets_its_own_ids(app, redis_client):
    publish_items([([0, 1, 2, 3], "run7:spec9", f"img_{i:03d}", i) for i in range(50)])
    messages, sizes = take_sent(redis_client)
    assert len(messages) == 100 and len(sizes) == 50
    task_ids = [m["headers"]["id"] for m in messages]
    groups = Counter(m["headers"]["group"] for m in messages)
    bodies = [m["body"][2]["chord"]["options"]["task_id"] for m in messages]
    assert len(set(task_ids)) == 100
    assert len(groups) == 50 and set(groups.values()) == {2}, "the two header tasks of an image share a group"
    assert len(set(bodies)) == 50, "one chord body per image"
    assert {f"celery-taskset-meta-{g}.b" for g in groups} == set(sizes)


def test_a_publish_cut_by_redis_marks_nothing_and_the_resume_publishes_everything(app, redis_url):
    """Redis refuses writes (maxmemory reached) in the middle of a chunk's pipelined LPUSHes:
    some messages are out, the publish raises, and no image of the chunk is marked in flight.
    Once Redis takes writes again, publishing the chunk again marks every image (the images
    published twice are duplicates, which the workers' done check absorbs).

    On a private server: ``maxmemory`` is server-wide, and the suite's other test worker may be
    using another database of the shared one."""
    from worker.app import repoint

    with embedded_redis() as url:
        repoint(url)
        try:
            _publish_cut_then_resumed(redis.Redis.from_url(url))
        finally:
            repoint(redis_url)


def _publish_cut_then_resumed(redis_client: redis.Redis) -> None:
    state = RunState(redis_client, "run-cut")
    chunk = [(i * 10, f"img_{i:04d}", [0, 1, 2, 3]) for i in range(1000)]
    config = redis_client.config_get("maxmemory*")
    used = int(redis_client.info("memory")["used_memory"])
    redis_client.config_set("maxmemory-policy", "noeviction")
    # Room for the chunk's chord-size keys (~150 KB) and part of its 2,000 messages (~1.5 MB).
    redis_client.config_set("maxmemory", used + 400_000)
    try:
        with Publisher(1) as pub, pytest.raises(redis.exceptions.ResponseError, match="maxmemory"):
            publish_chunk(state, "run-cut:h", chunk, [0, 1, 2, 3], pub)
    finally:
        redis_client.config_set("maxmemory", config["maxmemory"])
        redis_client.config_set("maxmemory-policy", config["maxmemory-policy"])
    out = sum(redis_client.llen(q) for q in QUEUE_LISTS)
    assert 0 < out < 2000, f"the cut was not mid-chunk ({out} messages out): the test proves nothing"
    assert state.queued_count() == 0, "an image was marked in flight although its publish failed"
    with Publisher(1) as pub:
        publish_chunk(state, "run-cut:h", chunk, [0, 1, 2, 3], pub)
    assert state.queued_count() == 1000
    per_image = Counter(json.loads(json.loads(m)["body"])[0][1]
                       for q in QUEUE_LISTS for m in redis_client.lrange(q, 0, -1))
    assert set(per_image) == {image_id for _, image_id, _ in chunk}
    assert min(per_image.values()) >= 2
