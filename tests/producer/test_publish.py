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


def finish_every_image(state, layout, steps: list[int]) -> None:
    """What a fleet does for every seeded image: its lines, its marks, its settle."""
    from producer.seed import iter_seed
    from worker.constants import seed_ordinal

    for _, rec in iter_seed(layout.seed):
        for s in steps:
            offset = layout.sink(s).append({"image_id": rec["image_id"], "step": s})
            state.finish(s, rec["image_id"], offset, steps, ordinal=seed_ordinal(rec))


def test_a_run_given_a_new_step_turns_the_bits_back_into_offsets_and_publishes_only_that_step(
        app, redis_client, demo_data, tmp_path):
    """Steps [0, 1] finished (the images settled: bits, no offsets), then the run is enqueued
    with [0, 1, 2, 3]: step 2 reads steps 0 and 1, so the enqueue turns their bits back into
    offsets (``submit.unpack_bits``) and publishes steps 2 and 3 alone."""
    from producer.seed import iter_seed
    from worker.keys import run_key

    images, labels = demo_data
    base = [f"results_dir={tmp_path / 'out'}", f"{P}.vlm.backend=offline", f"{P}.data.image_dir={images}",
            f"{P}.data.kitti_label_dir={labels}"]
    first = submit(load_spec(None, [*base, f"{P}.workflow.steps=[0,1]"]), redis_client)
    state, layout = first.run.state, first.run.layout
    redis_client.delete(*QUEUE_LISTS)
    finish_every_image(state, layout, [0, 1])
    assert state.queued_count() == 0
    state.fold([0, 1])  # the moves still pending, as ``producer wait`` folds them at the run's end
    assert redis_client.hlen(run_key(state.run_id, "done", 0)) == 0 and state.counts([1])[1]["done"] == 50

    second = submit(load_spec(None, [*base, f"{P}.workflow.steps=[0,1,2,3]"]), redis_client)
    assert second.enqueue.enqueued == 50 and second.enqueue.already_done == 0
    assert not redis_client.exists(run_key(state.run_id, "bits", 0), run_key(state.run_id, "bits", 1))
    for _, rec in iter_seed(layout.seed):
        for s in (0, 1):
            assert layout.sink(s).read_at(state.done_offset(s, rec["image_id"]))["step"] == s
    assert queued_images(redis_client) == Counter(), "no head step is published again"
    assert redis_client.llen(queue_list(STEP[2].priority)) == 50


def test_a_seed_written_afresh_over_a_run_with_bits_reindexes_and_redoes_nothing(
        app, redis_client, demo_data, tmp_path):
    """The seed file deleted after the images settled into the bits, and an image added: the
    seed written afresh numbers its images above every ordinal given before (their old bits may
    be any image's now), so the enqueue rebuilds the bits from the sinks at the new ordinals:
    only the new image goes out, and status counts each image once."""
    import shutil

    images, labels = (shutil.copytree(d, tmp_path / d.name) for d in demo_data)  # one image is added
    base = [f"results_dir={tmp_path / 'out'}", f"{P}.vlm.backend=offline", f"{P}.data.image_dir={images}",
            f"{P}.data.kitti_label_dir={labels}", f"{P}.workflow.steps=[0,1]"]
    first = submit(load_spec(None, base), redis_client)
    state, layout = first.run.state, first.run.layout
    redis_client.delete(*QUEUE_LISTS)
    finish_every_image(state, layout, [0, 1])
    assert state.queued_count() == 0 and state.counts([1])[1]["done"] == 50
    layout.seed.path.unlink()
    first_image = sorted(images.iterdir())[0]
    shutil.copy(first_image, images / f"zz_new{first_image.suffix}")
    shutil.copy(labels / f"{first_image.stem}.txt", labels / "zz_new.txt")

    second = submit(load_spec(None, base), redis_client)
    assert (second.enqueue.enqueued, second.enqueue.already_done) == (1, 50)
    assert set(queued_images(redis_client)) == {"zz_new"}
    assert state.counts([0, 1]) == {s: {"done": 50, "failed": 0, "blocked": 0} for s in (0, 1)}
