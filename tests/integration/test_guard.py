"""One producer per results dir, through the real CLI: two producers, two fleets, `producer run`
against `enqueue`, and a producer killed with the lock held.

Real Redis servers, real ``celery -A worker worker`` processes, the OpenAI SDK against the
in-process FakeVLM (which counts every call). The first producer is held live deterministically:
no worker runs until the second one has been refused or has joined.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import redis

from producer.embedded import embedded_redis
from tests.integration.test_faults import (
    assert_finalized_once,
    failures,
    job,
    normal_calls,
    seed_records,
    sink_lines,
    tiny_images,
)
from tests.support.fleet import ROOT, Fleet, producer, wait_until
from worker.keys import QUEUE_LISTS

pytestmark = pytest.mark.integration


def queued_messages(redis_url: str) -> int:
    """Messages queued in every priority list of the Celery queue."""
    client = redis.Redis.from_url(redis_url)
    return sum(client.llen(k) for k in QUEUE_LISTS)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """8 drawn road scenes with KITTI labels."""
    from producer.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("guard-data"), n_images=8, seed=11)


@pytest.fixture(scope="module")
def other_data(tmp_path_factory) -> tuple[Path, Path]:
    """5 other scenes: other inputs."""
    from producer.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("guard-other"), n_images=5, seed=12)


class Background:
    """A producer CLI command running in the background, its output in files we can poll."""

    def __init__(self, env: dict, logdir: Path, name: str, *args: str):
        self.out, self.err = logdir / f"{name}.out", logdir / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "producer.cli", *args], cwd=ROOT, env=env,
                                         stdout=out, stderr=err, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.err.read_text()

    def finish(self, timeout: float = 120) -> tuple[int, str, str]:
        rc = self.proc.wait(timeout=timeout)
        return rc, self.out.read_text(), self.err.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def background(tmp_path):
    started: list[Background] = []

    def start(env: dict, name: str, *args: str) -> Background:
        b = Background(env, tmp_path, name, *args)
        started.append(b)
        return b

    yield start
    for b in started:
        b.kill()


def lock_holder(results: Path) -> dict:
    path = results / ".producer.lock"
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        return {}  # being written


def meta(url: str, results: Path) -> dict:
    from worker.runstate import RunState

    run_id = json.loads((results / "run.json").read_text())["run_id"]
    return RunState(redis.Redis.from_url(url), run_id).meta()


def holds_and_has_enqueued(first: Background, results: Path, url: str) -> bool:
    """``first`` holds the results dir and has published everything (it now waits for workers)."""
    if first.proc.poll() is not None:
        raise AssertionError(f"the first producer exited {first.proc.returncode}:\n{first.stderr()[-3000:]}")
    return lock_holder(results).get("pid") == first.pid and meta(url, results).get("enqueue_complete") is True


def one_run_calls(results: Path) -> int:
    return sum(normal_calls(r) for r in seed_records(results))


def test_a_second_enqueue_with_other_inputs_is_refused_and_the_first_loses_nothing(
        fleet, fleet_env, fake_vlm, data, other_data, tmp_path, background, redis_url):
    results = tmp_path / "results"
    first = background(fleet_env, "first", "enqueue", *job(fake_vlm, data, results), "--wait", "--timeout", "90")
    wait_until(lambda: holds_and_has_enqueued(first, results, redis_url), 60, "the first producer to hold and enqueue")
    seed_before, run_before = (results / "seed_annotations.jsonl").read_bytes(), (results / "run.json").read_bytes()

    second = producer(fleet_env, "enqueue", *job(fake_vlm, other_data, results), "--wait", check=False)
    assert second.returncode == 2, second.stderr
    err = second.stderr
    assert "other inputs" in err and f"pid {first.pid}" in err, err
    assert f"image_dir={data[0]}" in err and f"image_dir={other_data[0]}" in err, err
    assert "another --results-dir" in err
    assert (results / "seed_annotations.jsonl").read_bytes() == seed_before
    assert (results / "run.json").read_bytes() == run_before

    fleet.start(2, concurrency=4)
    rc, out, err = first.finish()
    assert rc == 0, err
    ids = sorted(p.stem for p in data[0].iterdir())
    assert f"({len(ids)} images; 0 failed, 0 missing)" in out, out
    assert_finalized_once(results, ids)
    assert failures(results) == []
    assert fake_vlm.stats()["calls"] == one_run_calls(results)


def test_a_second_enqueue_with_the_same_inputs_joins_and_publishes_nothing(
        fleet, fleet_env, fake_vlm, data, tmp_path, background, redis_url):
    results = tmp_path / "results"
    args = ["enqueue", *job(fake_vlm, data, results)]
    first = background(fleet_env, "first", *args, "--wait", "--timeout", "90")
    wait_until(lambda: holds_and_has_enqueued(first, results, redis_url), 60, "the first producer to hold and enqueue")
    queued = queued_messages(redis_url)

    joiner = background(fleet_env, "joiner", *args, "--wait", "--timeout", "90")
    wait_until(lambda: "joins it" in joiner.stderr() or joiner.proc.poll() is not None, 60, "the second to join")
    quick = producer(fleet_env, *args)  # without --wait: says so and exits 0
    assert "joins it and publishes nothing" in quick.stderr and f"pid {first.pid}" in quick.stderr
    assert "joined run" in quick.stdout
    assert queued_messages(redis_url) == queued  # nothing more was published

    fleet.start(2, concurrency=4)
    ids = sorted(p.stem for p in data[0].iterdir())
    for p in (first, joiner):
        rc, out, err = p.finish()
        assert rc == 0, err
        assert f"({len(ids)} images; 0 failed, 0 missing)" in out, out
    assert_finalized_once(results, ids)
    assert fake_vlm.stats()["calls"] == one_run_calls(results)  # one run's calls, not two
    assert all(set(c.values()) == {1} for c in sink_lines(results).values())


def test_two_fleets_on_one_results_dir(fleet, fleet_env, fake_vlm, data, tmp_path, background, redis_url):
    secret = "guard-fleet-s3cret"
    results = tmp_path / "results"
    args = ["enqueue", *job(fake_vlm, data, results)]
    with embedded_redis(password=secret) as theirs:
        env_a = {**fleet_env, "REDIS_URL": theirs}
        fleet_a = Fleet(env=env_a, logdir=tmp_path)
        try:
            first = background(env_a, "first", *args, "--wait", "--timeout", "90")
            wait_until(lambda: holds_and_has_enqueued(first, results, theirs), 60,
                       "the first fleet's producer to hold and enqueue")
            # A second fleet (the session's Redis) with the same inputs while the first is live.
            second = producer(fleet_env, *args, "--wait", check=False)
            assert second.returncode == 2, second.stderr
            port = theirs.rsplit(":", 1)[1].split("/")[0]
            assert f"Redis redis://***@127.0.0.1:{port}/0" in second.stderr, second.stderr
            assert "another Redis" in second.stderr and f"pid {first.pid}" in second.stderr
            assert secret not in second.stderr + second.stdout
            assert secret not in (results / ".producer.lock").read_text()
            fleet_a.start(2, concurrency=4)
            rc, _, err = first.finish()
            assert rc == 0, err
        finally:
            fleet_a.stop_all()
    calls = fake_vlm.stats()["calls"]
    assert calls == one_run_calls(results)

    # The first fleet is gone: the second one, same inputs, is a resume from the sinks.
    fleet.start(2, concurrency=4)
    again = producer(fleet_env, *args, "--wait", "--timeout", "60")
    assert "holds no state for run" in again.stderr and f"127.0.0.1:{port}" in again.stderr, again.stderr
    assert secret not in again.stderr + again.stdout + (results / "run.json").read_text()
    assert fake_vlm.stats()["calls"] == calls  # no image-step was called again
    ids = sorted(p.stem for p in data[0].iterdir())
    assert_finalized_once(results, ids)
    assert all(set(c.values()) == {1} for c in sink_lines(results).values())


def test_producer_run_holds_the_dir_against_an_enqueue(fleet_env, fake_vlm, data, other_data, tmp_path, background):
    gate = threading.Event()

    def held_answers(prompt, image, protocol):
        from tests.support.fake_vlm import default_answer

        gate.wait(30)
        return default_answer(prompt, image, protocol)

    fake_vlm.answer_fn = held_answers
    results = tmp_path / "results"
    local = background(fleet_env, "local", "run", *job(fake_vlm, data, results))
    try:
        wait_until(lambda: lock_holder(results).get("command") == "run" and fake_vlm.stats()["in_flight"] >= 1, 60,
                   "producer run to hold the dir and call the endpoint")
        seed_before = (results / "seed_annotations.jsonl").read_bytes()
        same = producer(fleet_env, "enqueue", *job(fake_vlm, data, results), check=False)
        assert same.returncode == 2, same.stderr
        assert f"`producer run` (pid {local.pid}" in same.stderr and "another Redis" in same.stderr, same.stderr
        other = producer(fleet_env, "enqueue", *job(fake_vlm, other_data, results), check=False)
        assert other.returncode == 2 and "other inputs" in other.stderr, other.stderr
        assert (results / "seed_annotations.jsonl").read_bytes() == seed_before
    finally:
        gate.set()
    rc, out, err = local.finish()
    assert rc == 0, err
    ids = sorted(p.stem for p in data[0].iterdir())
    assert f"({len(ids)} images; 0 failed, 0 missing)" in out, out
    assert_finalized_once(results, ids)
    assert fake_vlm.stats()["calls"] == one_run_calls(results)


def test_a_lock_left_by_a_producer_killed_with_9_does_not_block_the_next(
        fleet, fleet_env, fake_vlm, data, tmp_path, background, redis_url):
    results = tmp_path / "results"
    args = ["enqueue", *job(fake_vlm, data, results)]
    first = background(fleet_env, "first", *args, "--wait")
    wait_until(lambda: holds_and_has_enqueued(first, results, redis_url), 60, "the first producer to hold and enqueue")
    first.kill()
    assert lock_holder(results)["pid"] == first.pid  # its identity stays in the file; the flock is gone

    fleet.start(2, concurrency=4)
    again = producer(fleet_env, *args, "--wait", "--timeout", "60")
    assert "in use" not in again.stderr, again.stderr
    m = re.search(r"enqueued (\d+) images \((\d+) already done, (\d+) already queued\)", again.stdout)
    assert m and m[1] == "0" and int(m[2]) + int(m[3]) == 8, again.stdout  # the dead one's messages stand
    assert_finalized_once(results, sorted(p.stem for p in data[0].iterdir()))
    assert fake_vlm.stats()["calls"] == one_run_calls(results)
    assert (results / ".producer.lock").read_text() == ""


def test_a_joiner_takes_over_when_the_holder_dies_mid_enqueue(fleet, fleet_env, fake_vlm, tmp_path, background,
                                                             redis_url):
    n = 40  # the first two images go out, the rest wait for a window no worker drains
    images = tiny_images(tmp_path / "images", n)
    results = tmp_path / "results"
    args = ["enqueue", *job(fake_vlm, images, results), "--max-inflight", "2"]
    first = background(fleet_env, "first", *args)

    def blocked_on_window() -> bool:
        if lock_holder(results).get("pid") != first.pid:
            return False
        from worker.runstate import RunState

        m = meta(redis_url, results)
        state = RunState(redis.Redis.from_url(redis_url), json.loads((results / "run.json").read_text())["run_id"])
        return m.get("enqueue_complete") is False and m.get("images") == n and state.queued_count() == 2

    wait_until(blocked_on_window, 60, "the first producer to fill its window of 2 and wait")
    joiner = background(fleet_env, "joiner", *args, "--wait", "--timeout", "90")
    wait_until(lambda: "joins it" in joiner.stderr() or joiner.proc.poll() is not None, 60, "the second to join")
    first.kill()
    wait_until(lambda: lock_holder(results).get("pid") == joiner.pid or joiner.proc.poll() is not None, 30,
               "the joiner to take the results dir over")
    assert "is gone before its enqueue was complete" in joiner.stderr()
    fleet.start(2, concurrency=8)
    rc, out, err = joiner.finish()
    assert rc == 0, err
    assert f"({n} images; 0 failed, 0 missing)" in out, out
    assert_finalized_once(results, [f"img_{i:04d}" for i in range(n)])
    assert fake_vlm.stats()["calls"] == n  # one caption per image, none twice
