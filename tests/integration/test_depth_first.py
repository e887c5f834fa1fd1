"""Depth-first scheduling on real parts: an image's later steps run before new images' head
steps, and a later step's message keeps its priority when a killed worker's task comes back.

Real Redis, real ``celery -A worker worker`` processes, the producer CLI, the OpenAI SDK against
the in-process FakeVLM (which records its calls in the order it admits them). Every wait is on
a condition, with a timeout.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import pytest
import redis
from kombu.transport import redis as kombu_redis

from tests.integration.test_faults import SHORT_VT, assert_finalized_once, failures, job, seed_records, status_json
from tests.support.fake_vlm import STRUCTURED_MARKERS
from tests.support.fleet import producer, wait_until
from worker.clock import GuardedQoS
from worker.keys import QUEUE_LISTS, UNACKED, UNACKED_INDEX, UNACKED_MESSAGES, queue_list
from worker.stepdefs import STEP
from worker.transport import unacked_payloads

pytestmark = pytest.mark.integration


def step_of(prompt: str) -> int:
    """Which step a prompt the fake VLM saw belongs to (text or structured prompts)."""
    if STRUCTURED_MARKERS["region_expr"] in prompt or '"bbox_2d": [x1, y1, x2, y2]' in prompt:
        return 0
    if prompt.startswith("You are an AI visual assistant that specializes"):
        return 1
    if STRUCTURED_MARKERS["grounding_expr"] in prompt or "classify the provided objects into groups" in prompt:
        return 2
    if STRUCTURED_MARKERS["double_check"] in prompt or prompt.startswith("You are verifying grounding expressions"):
        return 3
    raise AssertionError(f"a prompt of no known step: {prompt[:80]!r}")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """8 drawn road scenes with KITTI labels (one has no label file: its caption is its only call)."""
    from producer.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("depth-data"), n_images=8, seed=5)


def test_an_images_later_steps_run_before_the_backlogs_head_steps(fleet, fleet_env, fake_vlm, data, tmp_path):
    # One worker, two threads, every image's head steps queued at once: a FIFO queue would call
    # every head step (14 or so) before the first step 2. Depth-first, the first image's steps 2 and 3
    # are called while most of the backlog's head steps still wait.
    fake_vlm.latency = 0.2
    fleet.start(1, concurrency=2)
    results = tmp_path / "results"
    producer(fleet_env, "enqueue", *job(fake_vlm, data, results), "--wait", "--timeout", "120")
    steps = [step_of(r.prompt) for r in fake_vlm.requests]
    heads = [i for i, s in enumerate(steps) if s in (0, 1)]
    first_2, first_3 = steps.index(2), steps.index(3)
    print(f"call order by step: {''.join(map(str, steps))}")
    assert len(heads) >= 12 and steps.count(3) >= 6, steps  # a backlog, and images that reach step 3
    assert first_3 < heads[len(heads) // 2], (
        f"the first step-3 call was call {first_3}, after half the head steps ({steps})")
    assert first_2 < first_3 < heads[-1]
    producer(fleet_env, "finalize", "--results-dir", str(results))
    assert_finalized_once(results, [r["image_id"] for r in seed_records(results)])
    assert failures(results) == []


def hold_first_call(fake_vlm, step: int) -> tuple[threading.Event, threading.Event]:
    """Make the fake hold the first call of ``step`` until ``release`` is set (``held`` tells
    it arrived); every other call is answered as usual."""
    held = threading.Event()
    release = threading.Event()

    def answer(prompt: str, image: bytes | None, protocol: str) -> str:
        from tests.support.fake_vlm import default_answer

        if step_of(prompt) == step and not held.is_set():
            held.set()
            release.wait(60)
        return default_answer(prompt, image, protocol)

    fake_vlm.answer_fn = answer
    return held, release


def test_a_killed_workers_later_step_comes_back_into_its_own_priority_list(
        fleet, fleet_env, fake_vlm, data, tmp_path, redis_url, monkeypatch):
    # Hold the first step-2 call at the fake, kill -9 its worker: the unacked step-2 message must
    # be put back into step 2's priority list (ahead of the head steps still queued), not into
    # the head steps' list, and the run then finishes on a fresh worker.
    held, release = hold_first_call(fake_vlm, 2)
    fake_vlm.latency = 0.05
    vt = {"REFEXP_VISIBILITY_TIMEOUT": SHORT_VT}
    (w1,) = fleet.start(1, concurrency=1, extra_env=vt)
    results = tmp_path / "results"
    producer(fleet_env, "enqueue", *job(fake_vlm, data, results))
    assert held.wait(60), "no step-2 call reached the fake"
    fleet.kill(w1, signal.SIGKILL)
    w1.proc.wait(timeout=10)
    release.set()

    client = redis.Redis.from_url(redis_url)
    # Held as one member of the unacked sorted set, payload included (worker/transport.py).
    assert client.zcard(UNACKED_MESSAGES) == 1 and client.hlen(UNACKED) == 0 and client.zcard(UNACKED_INDEX) == 0
    unacked = [json.loads(raw)[0] for raw in unacked_payloads(client)]
    assert [m["headers"]["task"] for m in unacked] == [STEP[2].task_name], "the killed worker held one step 2"
    assert unacked[0]["properties"]["priority"] == STEP[2].priority
    heads_queued = client.llen(queue_list(STEP[0].priority))
    assert heads_queued > 0, "the backlog's head steps should still be queued"

    # Nothing but the sweep, as a live worker runs it (kombu's, with the QoS the worker installs:
    # worker/clock.py, worker/transport.py), restores the message.
    monkeypatch.setattr(kombu_redis.Channel, "QoS", GuardedQoS)
    monkeypatch.setenv("REFEXP_VISIBILITY_TIMEOUT", SHORT_VT)
    monkeypatch.setenv("REDIS_URL", redis_url)
    from worker.app import make_app

    app = make_app()
    with app.connection_for_read() as conn:
        channel = conn.default_channel

        def restored() -> bool:
            channel.qos.restore_visible(num=100)
            return client.llen(queue_list(STEP[2].priority)) == 1

        wait_until(restored, int(SHORT_VT) + 20, "the killed worker's step 2 to be restored", interval=0.5)
    msg = json.loads(client.lindex(queue_list(STEP[2].priority), 0))
    assert msg["headers"]["task"] == STEP[2].task_name and msg["headers"]["redelivered"] is True
    assert client.llen(queue_list(STEP[0].priority)) == heads_queued, "the restored step 2 went to the head list"
    assert sum(client.llen(k) for k in QUEUE_LISTS) == heads_queued + 1
    assert client.zcard(UNACKED_MESSAGES) == 0, "the restore removed the killed worker's member"

    fake_vlm.answer_fn = None
    fleet.start(1, concurrency=2, extra_env=vt)
    wait_until(lambda: status_json(fleet_env, results)["finished"], 90, "the run to finish", interval=0.5)
    producer(fleet_env, "finalize", "--results-dir", str(results))
    assert_finalized_once(results, [r["image_id"] for r in seed_records(results)])
    assert failures(results) == []


def test_step_3_sent_by_the_chain_after_step_2_has_step_3s_priority(fleet, fleet_env, fake_vlm, data, tmp_path,
                                                                      redis_url):
    # Celery sends a chain's next task with priority=None (task_inherit_parent_priority is off),
    # which the transport files under its default, 0: step 3 must be the priority-0 step
    # (worker/stepdefs.py). Hold the first step-3 call and look at its message.
    held, release = hold_first_call(fake_vlm, 3)
    fleet.start(1, concurrency=1)
    results = tmp_path / "results"
    producer(fleet_env, "enqueue", *job(fake_vlm, data, results))
    try:
        assert held.wait(60), "no step-3 call reached the fake"
        client = redis.Redis.from_url(redis_url)
        unacked = [json.loads(raw)[0] for raw in unacked_payloads(client)]
        assert [m["headers"]["task"] for m in unacked] == [STEP[3].task_name]
        assert unacked[0]["properties"]["priority"] == STEP[3].priority == 0
    finally:
        release.set()
    wait_until(lambda: status_json(fleet_env, results)["finished"], 90, "the run to finish", interval=0.5)


def test_a_retried_step_2_keeps_step_2s_priority(fleet, fleet_env, fake_vlm, data, tmp_path, redis_url):
    # The first step-2 call gets a 500 (a raising answer): the task is retried with a countdown,
    # and the retry's message (held unacked by the worker until its ETA) carries step 2's priority.
    failed = threading.Event()

    def answer(prompt: str, image: bytes | None, protocol: str) -> str:
        from tests.support.fake_vlm import default_answer

        if step_of(prompt) == 2 and not failed.is_set():
            failed.set()
            raise RuntimeError("one server error")
        return default_answer(prompt, image, protocol)

    fake_vlm.answer_fn = answer
    fleet.start(1, concurrency=1, extra_env={"REFEXP_VISIBILITY_TIMEOUT": SHORT_VT})
    results = tmp_path / "results"
    producer(fleet_env, "enqueue", *job(fake_vlm, data, results))
    client = redis.Redis.from_url(redis_url)

    def retried() -> list[dict]:
        msgs = [json.loads(raw)[0] for raw in unacked_payloads(client)]
        return [m for m in msgs if m["headers"]["task"] == STEP[2].task_name and m["headers"].get("retries")]

    (msg, *_) = wait_until(retried, 60, "the step-2 retry's message", interval=0.05)
    assert msg["properties"]["priority"] == STEP[2].priority
    wait_until(lambda: status_json(fleet_env, results)["finished"], 90, "the run to finish", interval=0.5)
    assert failures(results) == []
