"""Faults on real parts: retries, permanent errors, a worker killed or stopped, Redis restarted,
the producer killed mid-enqueue, and tasks delivered twice.

Real Redis, real ``celery -A worker worker`` processes, the producer CLI, and the OpenAI SDK
against the in-process FakeVLM. Every wait is on a condition, with a timeout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import redis
from PIL import Image

from producer.embedded import embedded_redis, free_port
from tests.support.fleet import ROOT, Fleet, producer, wait_until
from worker.constants import SEED_ORDINAL
from worker.sinks import JsonlSink
from worker.stepdefs import STEP_NAMES, step_dir_name

pytestmark = pytest.mark.integration

STEPS = (0, 1, 2, 3)
SHORT_VT = "6"  # REFEXP_VISIBILITY_TIMEOUT for the workers: redelivery after 6 s, retry countdowns <= 3 s


# --------------------------------------------------------------------------- helpers

def vlm_args(fake, *extra: str) -> list[str]:
    return [
        "image_referring_expression.vlm.backend=openai",
        f"image_referring_expression.vlm.openai.base_url={fake.openai_base_url}",
        "image_referring_expression.vlm.openai.model_name=fake-vl",
        "image_referring_expression.vlm.openai.timeout=20",
        "image_referring_expression.workflow.output_format=jsonl",
        *extra,
    ]


def job(fake, data: tuple[Path, Path | None], results: Path, *extra: str) -> list[str]:
    image_dir, label_dir = data
    args = [*vlm_args(fake, *extra), "--image-dir", str(image_dir), "--results-dir", str(results)]
    return args + (["--label-dir", str(label_dir)] if label_dir else [])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def seed_records(results: Path) -> list[dict]:
    return read_jsonl(results / "seed_annotations.jsonl")


def normal_calls(rec: dict) -> int:
    """VLM calls one image costs without faults: steps 0, 2 and 3 skip the model without boxes."""
    return 4 if rec["kitti_bboxes"] else 1


def status_json(env: dict, results: Path) -> dict:
    return json.loads(producer(env, "status", "--results-dir", str(results), "--json").stdout)


def sink_lines(results: Path) -> dict[int, Counter]:
    """Per step, how many sink lines each image has (more than one = processed more than once),
    across the main file and every part not merged yet (``annotations.parts/*.jsonl``): before
    a finalize the lines are in the writers' parts. Every line must be whole JSON."""
    out = {}
    for s in STEPS:
        sink = JsonlSink(results / step_dir_name(s) / "annotations.jsonl")
        out[s] = Counter(json.loads(line)["image_id"] for _, path in sink.files()
                         for line in path.read_text().splitlines())
    return out


def assert_finalized_once(results: Path, ids: list[str]) -> list[dict]:
    final = read_jsonl(results / "annotations.jsonl")
    got = [r["image_id"] for r in final]
    assert got == sorted(ids), f"annotations.jsonl: missing {sorted(set(ids) - set(got))}, " \
                               f"duplicated {[i for i, n in Counter(got).items() if n > 1]}"
    for rec in final:
        assert rec["pipeline_steps"] == [f"step{s}_{STEP_NAMES[s]}" for s in STEPS]
    return final


def failures(results: Path) -> list[dict]:
    path = results / "failures.jsonl"
    return read_jsonl(path) if path.exists() else []


def run_state(redis_url: str, results: Path):
    from worker.runstate import RunState

    run_id = json.loads((results / "run.json").read_text())["run_id"]
    return RunState(redis.Redis.from_url(redis_url), run_id)


def hash_ids(client: redis.Redis, run_id: str, kind: str, step: int) -> set[str]:
    from worker.keys import run_key

    return {k.decode() for k in client.hkeys(run_key(run_id, kind, step))}


def done_ids(state, results: Path, step: int) -> set[str]:
    """The images done in ``step`` as the index says: a done entry (an offset), or the bit at
    the image's seed ordinal (it settled done in every step, and its offsets left Redis)."""
    from worker.keys import run_key

    ids = hash_ids(state.r, state.run_id, "done", step)
    key = run_key(state.run_id, "bits", step)
    return ids | {r["image_id"] for r in seed_records(results)
                  if isinstance(r.get(SEED_ORDINAL), int) and state.r.getbit(key, r[SEED_ORDINAL])}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """8 drawn road scenes with KITTI labels (one has no label file, so no boxes)."""
    from producer.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("faults-data"), n_images=8, seed=5)


def tiny_images(directory: Path, n: int) -> tuple[Path, None]:
    """``n`` tiny unlabelled PNGs: one VLM call (the caption) per image, four tasks."""
    directory.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (16, 12), (i % 251, (i * 7) % 251, 90)).save(directory / f"img_{i:04d}.png")
    return directory, None


# --------------------------------------------------------------------------- 1. retries

def test_transient_errors_are_retried_and_a_permanent_one_fails_at_once(fleet, fleet_env, fake_vlm, data,
                                                                         tmp_path, redis_url):
    fleet.start(2, concurrency=4, extra_env={"REFEXP_VISIBILITY_TIMEOUT": SHORT_VT})
    fake_vlm.latency = 0.02
    # In call order: one "model not found", two 429s asking for 2 s, three 500s.
    fake_vlm.fail_next(1, 404, message="The model `fake-vl` does not exist or you do not have access to it.")
    fake_vlm.fail_next(2, 429, retry_after=2)
    fake_vlm.fail_next(3, 500)
    results = tmp_path / "results"
    out = producer(fleet_env, "enqueue", *job(fake_vlm, data, results), "--wait", "--timeout", "90", check=False)
    assert out.returncode == 3, f"one image failed: exit 3\n{out.stderr[-3000:]}"

    seeds = {r["image_id"]: r for r in seed_records(results)}
    fails = failures(results)
    assert len(fails) == 1, fails
    bad = fails[0]
    assert bad["attempts"] == 1 and bad["error"] == "PermanentClientError"
    assert "fake-vl" in bad["message"] and "not found" in bad["message"]
    assert bad["step"] in (0, 1)
    x = bad["image_id"]

    counts = fake_vlm.stats()["status_counts"]
    assert {k: counts.get(k) for k in ("404", "429", "500")} == {"404": 1, "429": 2, "500": 3}
    baseline = sum(normal_calls(r) for r in seeds.values())
    x_ok = 1 if seeds[x]["kitti_bboxes"] else 0  # x's other header step still succeeds
    assert counts["200"] == baseline - normal_calls(seeds[x]) + x_ok

    # Retry-After was honoured: both 429 retries were scheduled at least 2 s out.
    logs = "\n".join(w.text() for w in fleet.workers)
    waits = [float(w) for w in re.findall(r"\(RateLimited: [^\n]*\); retry in ([\d.]+)s", logs)]
    assert len(waits) == 2 and min(waits) >= 2.0, waits

    st = status_json(fleet_env, results)
    assert st["finished"]
    n = len(seeds)
    assert st["steps"][str(bad["step"])]["failed"] == 1
    assert st["steps"]["2"]["blocked"] == 1 and st["steps"]["3"]["blocked"] == 1
    assert st["steps"]["3"]["done"] == n - 1
    assert st["budget"]["rate_limited_last_minute"] + st["budget"]["rate_limited_this_minute"] == 2
    state = run_state(redis_url, results)
    assert hash_ids(state.r, state.run_id, "blocked", 2) == {x} == hash_ids(state.r, state.run_id, "blocked", 3)
    assert "1 failed" in out.stdout
    assert_finalized_once(results, [i for i in seeds if i != x])

    # retry-failed re-runs only x's failed step and the steps after it.
    calls_before = fake_vlm.stats()["calls"]
    lines_before = sink_lines(results)
    again = producer(fleet_env, "retry-failed", "--results-dir", str(results))
    assert "re-enqueued 1 images" in again.stdout
    producer(fleet_env, "wait", "--results-dir", str(results), "--timeout", "60")
    assert fake_vlm.stats()["calls"] - calls_before == normal_calls(seeds[x]) - x_ok
    assert_finalized_once(results, list(seeds))
    lines = sink_lines(results)
    for s in STEPS:
        assert lines[s] - lines_before[s] == (Counter() if lines_before[s][x] else Counter({x: 1}))
        assert set(lines[s].values()) == {1}, f"step {s}: an image-step ran twice"


def test_retries_exhausted_record_every_attempt_then_retry_failed_finishes(fleet, fleet_env, fake_vlm, data,
                                                                           tmp_path):
    fleet.start(2, concurrency=4, extra_env={"REFEXP_VISIBILITY_TIMEOUT": SHORT_VT})
    image_dir, label_dir = data
    target = next(p for p in sorted(image_dir.iterdir())
                  if (label_dir / f"{p.stem}.txt").exists() and (label_dir / f"{p.stem}.txt").read_text().strip())
    target_bytes = target.read_bytes()

    def broken_for_target(prompt, image, protocol):
        if image == target_bytes:
            raise RuntimeError("backend exploded")  # the fake answers 500
        from tests.support.fake_vlm import default_answer

        return default_answer(prompt, image, protocol)

    fake_vlm.answer_fn = broken_for_target
    results = tmp_path / "results"
    first = producer(fleet_env, "enqueue",
                     *job(fake_vlm, data, results, "image_referring_expression.vlm.max_retries=1"),
                     "--wait", "--timeout", "90", check=False)
    assert first.returncode == 3, f"one image failed: exit 3\n{first.stderr[-3000:]}"

    fails = failures(results)
    assert sorted((f["image_id"], f["step"]) for f in fails) == [(target.stem, 0), (target.stem, 1)], fails
    for f in fails:
        assert f["attempts"] == 2, f
        assert f["error"] == "ClientError" and "500" in f["message"]
    assert fake_vlm.stats()["status_counts"]["500"] == 4  # two steps, two attempts each
    st = status_json(fleet_env, results)
    assert st["finished"] and st["steps"]["2"]["blocked"] == 1 and st["steps"]["3"]["blocked"] == 1

    fake_vlm.answer_fn = None  # the backend recovers
    calls_before = fake_vlm.stats()["calls"]
    producer(fleet_env, "retry-failed", "--results-dir", str(results))
    producer(fleet_env, "wait", "--results-dir", str(results), "--timeout", "60")
    assert fake_vlm.stats()["calls"] - calls_before == 4  # only the target's four steps
    assert_finalized_once(results, [r["image_id"] for r in seed_records(results)])
    assert all(set(c.values()) == {1} for c in sink_lines(results).values())


# --------------------------------------------------------------------------- 2. crash safety

def restore_sweep_seconds(visibility_timeout: str) -> float:
    """How often (at worst) a worker looks for unacked messages older than the visibility
    timeout, as the app configures kombu (its defaults: every 10 s, scanning on every 10th)."""
    from worker.app import make_app

    old = os.environ.get("REFEXP_VISIBILITY_TIMEOUT")
    os.environ["REFEXP_VISIBILITY_TIMEOUT"] = visibility_timeout
    try:
        opts = make_app().conf.broker_transport_options
    finally:
        if old is None:
            del os.environ["REFEXP_VISIBILITY_TIMEOUT"]
        else:
            os.environ["REFEXP_VISIBILITY_TIMEOUT"] = old
    return float(opts.get("unacked_restore_interval", 10)) * float(opts.get("unacked_restore_throttle", 10))


def test_unacked_tasks_are_looked_for_at_least_once_per_visibility_timeout():
    # Without unacked_restore_interval/throttle in worker/app.py kombu sweeps only every 100 s,
    # whatever the visibility timeout: the kill -9 run below then took ~105 s instead of ~15 s.
    for vt in (SHORT_VT, "3600"):
        assert restore_sweep_seconds(vt) <= int(vt) / 2


def _some_but_not_all_done(url: str, results: Path, n: int) -> bool:
    """Some images are finished and at least two are not (read straight from Redis: fast)."""
    if not (results / "run.json").exists():
        return False
    return 1 <= run_state(url, results).counts([3])[3]["done"] <= n - 2


def _mid_run(fleet, fleet_env, fake_vlm, data, tmp_path, redis_url, extra_env=None):
    """Two workers with two threads each, a job enqueued, and returns once some images are done
    and calls are in flight on both: (worker 1, worker 2, results dir)."""
    w1, w2 = fleet.start(2, concurrency=2, extra_env=extra_env)
    fake_vlm.latency = 0.4
    results = tmp_path / "results"
    producer(fleet_env, "enqueue", *job(fake_vlm, data, results))
    n = len(seed_records(results))
    wait_until(lambda: _some_but_not_all_done(redis_url, results, n) and fake_vlm.stats()["in_flight"] >= 3, 60,
               "some images to finish, and calls in flight on both workers", interval=0.05)
    return w1, w2, results


def test_kill_9_of_a_worker_mid_run_redelivers_its_tasks(fleet, fleet_env, fake_vlm, data, tmp_path, redis_url):
    w1, w2, results = _mid_run(fleet, fleet_env, fake_vlm, data, tmp_path, redis_url,
                               {"REFEXP_VISIBILITY_TIMEOUT": SHORT_VT})
    fleet.kill(w1, signal.SIGKILL)
    w1.proc.wait(timeout=10)
    # Its unacked tasks come back after the visibility timeout (10 s) plus one restore sweep.
    wait_until(lambda: status_json(fleet_env, results)["finished"], int(SHORT_VT) + 35,
               "the run to finish on the surviving worker (were the killed worker's tasks redelivered?)",
               interval=0.5)
    producer(fleet_env, "finalize", "--results-dir", str(results))
    seeds = seed_records(results)
    assert_finalized_once(results, [r["image_id"] for r in seeds])
    assert failures(results) == []
    assert w2.proc.poll() is None
    twice = sum(sum(c.values()) - len(c) for c in sink_lines(results).values())
    print(f"kill -9: {fake_vlm.stats()['calls'] - sum(normal_calls(r) for r in seeds)} VLM calls repeated, "
          f"{twice} image-steps appended twice")


def test_sigterm_warm_shutdown_mid_run_loses_nothing(fleet, fleet_env, fake_vlm, data, tmp_path, redis_url):
    # The default (long) visibility timeout: nothing may depend on redelivery here.
    w1, w2, results = _mid_run(fleet, fleet_env, fake_vlm, data, tmp_path, redis_url)
    fleet.kill(w1, signal.SIGTERM)
    assert w1.proc.wait(timeout=30) == 0, w1.text()[-3000:]
    assert "warm shutdown" in w1.text().lower()
    producer(fleet_env, "wait", "--results-dir", str(results), "--timeout", "60")
    assert w2.proc.poll() is None
    assert_finalized_once(results, [r["image_id"] for r in seed_records(results)])
    assert failures(results) == []
    lines = sink_lines(results)
    assert all(set(c.values()) == {1} for c in lines.values()), "an image-step ran twice"
    assert fake_vlm.stats()["calls"] == sum(normal_calls(r) for r in seed_records(results))


# An upstream bug (Celery/kombu 5.7): on losing the broker, the consumer closes a connection whose
# transport it already dropped, and the worker dies with this error (about 1 restart in 20 here).
KOMBU_RECONNECT_CRASH = "Unrecoverable error: AttributeError(\"'NoneType' object has no attribute 'hostname'\")"


def test_redis_restart_mid_run_with_aof(fleet_env, fake_vlm, data, tmp_path):
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    port = free_port()
    env = {**fleet_env}
    results = tmp_path / "results"
    fleet = Fleet(env=env, logdir=tmp_path)
    worker_env = {"REFEXP_VISIBILITY_TIMEOUT": SHORT_VT}
    server = embedded_redis(appendonly=True, data_dir=str(redis_dir), port=port)
    env["REDIS_URL"] = server.__enter__()
    watcher = None
    try:
        fleet.start(2, concurrency=2, extra_env=worker_env)
        fake_vlm.latency = 0.3
        producer(env, "enqueue", *job(fake_vlm, data, results))
        n = len(seed_records(results))
        wait_until(lambda: _some_but_not_all_done(env["REDIS_URL"], results, n), 60, "some images to finish",
                   interval=0.05)
        watcher = subprocess.Popen([sys.executable, "-m", "producer.cli", "wait", "--results-dir", str(results),
                                    "--timeout", "90"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        server.__exit__(None, None, None)  # SIGTERM: Redis flushes the AOF and exits ...
        server = embedded_redis(appendonly=True, data_dir=str(redis_dir), port=port)
        server.__enter__()  # ... and comes back on the same port with the same data

        crashed: dict[str, float] = {}

        def note_dead() -> None:
            for w in list(fleet.workers):
                if w.proc.poll() is not None and w.name not in crashed:
                    assert KOMBU_RECONNECT_CRASH in w.text(), f"worker {w.name} died:\n{w.text()[-4000:]}"
                    crashed[w.name] = time.monotonic()

        def supervise() -> bool:
            """Restart a worker that hit the known upstream crash, as `restart: unless-stopped` does,
            once its unacked tasks are older than the visibility timeout (so they are restored)."""
            note_dead()
            due = [k for k, t in crashed.items() if t and time.monotonic() - t > int(SHORT_VT) + 1]
            for k in due:
                crashed[k] = 0.0
                fleet.start(1, concurrency=4, extra_env=worker_env)
            return watcher.poll() is not None

        wait_until(supervise, 110, "producer wait to return", interval=0.2)
        out, err = watcher.communicate()
        assert watcher.returncode == 0, (f"producer wait did not survive the restart:\n{out}\n{err[-1500:]}\n"
                                         f"{failures(results)}\n{fleet.logs()}")
        note_dead()  # every worker reconnected, or died of the known upstream crash only
        print(f"workers reconnected: {sum(w.proc.poll() is None for w in fleet.workers)}, "
              f"hit the upstream reconnect crash: {sorted(crashed)}")
        ids = [r["image_id"] for r in seed_records(results)]
        assert_finalized_once(results, ids)
        assert failures(results) == [], failures(results)  # a Redis outage is not an image failure
        logs = "\n".join(w.text() for w in fleet.workers)
        print(f"tasks retried for the outage: {logs.count('Redis unreachable')}")
    finally:
        if watcher is not None and watcher.poll() is None:
            watcher.kill()
            watcher.wait()
        fleet.stop_all()
        server.__exit__(None, None, None)


def test_producer_killed_mid_enqueue_rerun_finishes_without_duplicates(fleet, fleet_env, fake_vlm, tmp_path,
                                                                         redis_url):
    n = 80  # the window of 2 holds the producer mid-enqueue
    images = tiny_images(tmp_path / "images", n)
    fleet.start(2, concurrency=8)
    fake_vlm.latency = 0.05
    results = tmp_path / "results"
    args = ["enqueue", *job(fake_vlm, images, results), "--max-inflight", "2"]
    first = subprocess.Popen([sys.executable, "-m", "producer.cli", *args], cwd=ROOT, env=fleet_env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def mid_enqueue():
            if not (results / "run.json").exists():
                return False
            state = run_state(redis_url, results)
            return state.counts([1])[1]["done"] >= 30 and not state.meta().get("enqueue_complete", True)

        wait_until(mid_enqueue, 60, "the producer to be mid-enqueue, held by its window of 2")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    state = run_state(redis_url, results)
    assert state.meta()["enqueue_complete"] is False

    out = producer(fleet_env, *args, "--wait", "--timeout", "90").stdout
    m = re.search(r"enqueued (\d+) images \((\d+) already done, (\d+) already queued\)", out)
    assert m, out
    enqueued, done, queued = map(int, m.groups())
    assert enqueued + done + queued == n and done >= 30 and queued <= 2, out
    assert_finalized_once(results, [f"img_{i:04d}" for i in range(n)])
    assert fake_vlm.stats()["calls"] == n, "an image was captioned twice"
    lines = sink_lines(results)
    assert all(len(c) == n and set(c.values()) == {1} for c in lines.values()), "an image-step ran twice"


REPUBLISH = """
import sys
from producer.publish import canvas
from producer.runs import connect, existing_run
from producer.seed import iter_seed

run_id, layout, state = existing_run(sys.argv[1], connect())
meta = state.meta()
ref = f"{run_id}:{meta['spec_hash']}"
n = 0
for offset, rec in iter_seed(layout.seed):
    canvas(meta["steps"], ref, rec["image_id"], offset).apply_async()
    n += 1
print(n)
"""


def test_tasks_delivered_twice_leave_one_correct_record_per_image(fleet, fleet_env, fake_vlm, data, tmp_path):
    # Reference output, no duplicates.
    fleet.start(2, concurrency=4)
    clean = tmp_path / "clean"
    producer(fleet_env, "enqueue", *job(fake_vlm, data, clean), "--wait", "--timeout", "90")
    fleet.stop_all()

    # Enqueue with no worker running, then publish every image's canvas a second time by hand.
    fake_vlm.latency = 0.15
    results = tmp_path / "results"
    producer(fleet_env, "enqueue", *job(fake_vlm, data, results))
    # A second publish of every image's canvas, by hand, from another process.
    republish = subprocess.run([sys.executable, "-c", REPUBLISH, str(results)], cwd=ROOT, env=fleet_env,
                               capture_output=True, text=True, timeout=60)
    assert republish.returncode == 0, republish.stderr
    assert int(republish.stdout) == len(seed_records(results))
    calls_before = fake_vlm.stats()["calls"]
    fleet.start(2, concurrency=4)
    producer(fleet_env, "wait", "--results-dir", str(results), "--timeout", "90")

    ids = [r["image_id"] for r in seed_records(results)]
    assert_finalized_once(results, ids)
    assert (results / "annotations.jsonl").read_bytes() == (clean / "annotations.jsonl").read_bytes()
    assert failures(results) == []
    from worker.sinks import ReadStats

    for s in STEPS:
        stats = ReadStats()
        latest = JsonlSink(results / step_dir_name(s) / "annotations.jsonl").latest_offsets(stats)
        assert stats.bad_lines == 0 and sorted(latest) == sorted(ids)
    extra = sum(sum(c.values()) - len(c) for c in sink_lines(results).values())
    calls = fake_vlm.stats()["calls"] - calls_before
    # Each duplicate either skipped (done already) or ran concurrently and appended a second line.
    assert calls >= sum(normal_calls(r) for r in seed_records(results))
    print(f"duplicate deliveries: {extra} image-steps processed twice, {calls} VLM calls")


FINISH_BEFORE_THE_MARK = """
import sys, time
from producer.enqueue import publish_chunk
from producer.publish import Publisher
from producer.runs import connect, existing_run
from producer.seed import iter_seed
from worker.constants import seed_ordinal

run_id, layout, state = existing_run(sys.argv[1], connect())
meta = state.meta()
steps = meta["steps"]
seeded = [(offset, rec["image_id"], seed_ordinal(rec)) for offset, rec in iter_seed(layout.seed)]
ids, ords = [i for _, i, _ in seeded], [o for _, _, o in seeded]
assert None not in ords, "a seed without ordinals: the bits would not be looked at"


class FinishedBeforeTheMark(Publisher):
    # Returns only once the workers have redone every image it published: each image's last
    # step settles before publish_chunk marks the chunk in flight.
    def publish(self, items):
        sent = super().publish(items)
        deadline = time.monotonic() + 60
        while not all(state.settled_in(steps[-1], ids, ords)):
            if time.monotonic() > deadline:
                raise SystemExit("the workers did not redo the images within 60 s")
            time.sleep(0.05)
        return sent


with FinishedBeforeTheMark(1) as publisher:
    publish_chunk(state, f"{run_id}:{meta['spec_hash']}", [(o, i, steps) for o, i, _ in seeded], steps,
                  publisher, force=True, ordinals=dict(zip(ids, ords)))
print(state.queued_count())
"""


def test_a_chunk_the_workers_finished_before_its_mark_leaves_the_window(fleet, fleet_env, fake_vlm, tmp_path):
    """``publish_chunk`` with real workers, made to lose the race every time: the publisher
    returns only once the workers have done every image of the chunk again (a forced redo of a
    finished run), so each image's last task settled while the image was not in flight yet and
    found nothing to drop. The settle after the mark must find them all (their bits, as they
    moved to the bitmaps when they finished), or they stay "in flight" for ever."""
    fleet.start(2, concurrency=4)
    n = 6
    images = tiny_images(tmp_path / "images", n)
    results = tmp_path / "results"
    producer(fleet_env, "enqueue", *job(fake_vlm, images, results), "--wait", "--timeout", "60")
    calls = fake_vlm.stats()["calls"]
    redo = subprocess.run([sys.executable, "-c", FINISH_BEFORE_THE_MARK, str(results)], cwd=ROOT, env=fleet_env,
                          capture_output=True, text=True, timeout=120)
    assert redo.returncode == 0, redo.stderr
    assert fake_vlm.stats()["calls"] - calls == n, "the workers did not redo every image before the mark"
    assert int(redo.stdout) == 0, "an image finished before its mark stayed in flight"
    st = status_json(fleet_env, results)
    assert st["finished"] and st["in_flight_images"] == 0
    assert all(st["steps"][str(s)]["done"] == n for s in STEPS)


def test_images_finished_before_they_are_marked_in_flight_do_not_hang_the_run(fleet, fleet_env, fake_vlm,
                                                                              tmp_path):
    # Warm workers finish a one-task image faster than the producer publishes a 200-image batch and
    # marks it in flight; such images must still leave the in-flight set, or the run never ends.
    fleet.start(2, concurrency=8)
    warm = tiny_images(tmp_path / "warm", 4)
    producer(fleet_env, "enqueue", *job(fake_vlm, warm, tmp_path / "warm-results",
                                        "image_referring_expression.workflow.steps=[1]"), "--wait", "--timeout", "30")
    n = 300
    images = tiny_images(tmp_path / "images", n)
    results = tmp_path / "results"
    producer(fleet_env, "enqueue", *job(fake_vlm, images, results, "image_referring_expression.workflow.steps=[1]"),
             "--wait", "--timeout", "40")
    st = status_json(fleet_env, results)
    assert st["finished"] and st["in_flight_images"] == 0 and st["steps"]["1"]["done"] == n
