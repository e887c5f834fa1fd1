"""Publisher processes: every image published exactly once, and only then marked in flight.

A real Redis and the real Celery app, no worker: the messages stay queued for us to count.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from producer.publish import AUTO_MIN_IMAGES, Publisher, auto_publishers
from producer.submit import submit
from worker.keys import QUEUE_LISTS, queue_list
from worker.spec import load_spec
from worker.stepdefs import STEP

P = "image_referring_expression"


@pytest.fixture
def app(redis_client, redis_url):
    from worker.app import app, repoint

    repoint(redis_url)
    yield app
    redis_client.delete(*QUEUE_LISTS)


def queued_images(redis_client) -> Counter:
    """image_id -> messages in the queue (a chord header message per step 0 and 1)."""
    out: Counter = Counter()
    for raw in redis_client.lrange(queue_list(STEP[0].priority), 0, -1):
        args, _kwargs, _embed = json.loads(json.loads(raw)["body"])
        out[args[1]] += 1
    return out


@pytest.mark.parametrize("publishers", [1, 2])
def test_each_image_is_published_once_and_marked_in_flight(app, redis_client, demo_data, tmp_path, publishers):
    images, labels = demo_data
    spec = load_spec(None, [f"results_dir={tmp_path / 'out'}", f"{P}.vlm.backend=offline",
                            f"{P}.data.image_dir={images}", f"{P}.data.kitti_label_dir={labels}"])
    sub = submit(spec, redis_client, publishers=publishers)
    assert sub.enqueue.enqueued == sub.seed.images == 50
    per_image = queued_images(redis_client)
    assert len(per_image) == 50 and set(per_image.values()) == {2}
    assert sub.run.state.queued_count() == 50
    # A second enqueue finds every image in flight and publishes nothing more.
    again = submit(spec, redis_client, publishers=publishers)
    assert again.enqueue.already_queued == 50 and again.enqueue.enqueued == 0
    assert sum(redis_client.llen(k) for k in QUEUE_LISTS) == 100


def test_a_publisher_process_sends_to_the_broker_this_process_points_at(app, redis_client):
    with Publisher(2) as pub:
        sent = pub.publish([([0, 1, 2, 3], "run0:spec0", f"img_{i:03d}", i) for i in range(40)])
    assert sent == 40
    assert queued_images(redis_client) == Counter({f"img_{i:03d}": 2 for i in range(40)})


def test_small_runs_publish_in_process():
    assert auto_publishers(AUTO_MIN_IMAGES - 1) == 1
    assert 1 <= auto_publishers(10 * AUTO_MIN_IMAGES) <= 4
