"""Clock skew between workers and Redis (worker/clock.py), with real wrong clocks.

One worker runs under libfaketime (tests/support/faketime.py): its ``time.time()`` is off, while
Redis (started by the suite, without libfaketime) and the other worker keep the true time. Real
Redis, real ``celery -A worker worker`` processes, the producer CLI, the OpenAI SDK against
FakeVLM, which counts the calls: a task handed out again while it runs costs a second call.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from tests.integration.test_faults import (
    assert_finalized_once,
    failures,
    job,
    normal_calls,
    seed_records,
    sink_lines,
    status_json,
    tiny_images,
)
from tests.support.faketime import ClockFile, faketime_env, remove_shm
from tests.support.fleet import WorkerProc, producer, wait_until
from worker.clock import EXIT_SKEWED

pytestmark = pytest.mark.integration

VT = {"REFEXP_VISIBILITY_TIMEOUT": "8"}  # tolerance 2 s; every worker sweeps every 2 s
SKEW_LINE = "clock skew:"
BACK_LINE = "clock back within tolerance"


_SKEW_SECONDS = re.compile(r"clock is (\d+(?:\.\d+)?) s (?:ahead of|behind) Redis")


def skew_logged(w: WorkerProc) -> float:
    """The offset (s) a worker's first clock-skew line reports. It is measured over a round trip
    (Redis's time minus the middle of it), so it is off by up to half that: a few ms under load,
    which the log's three decimals show (3599.998 for a clock an hour ahead)."""
    line = w.text().split(SKEW_LINE)[1].splitlines()[0]
    found = _SKEW_SECONDS.search(line)
    assert found, f"no offset in the skew line: {line}"
    return float(found.group(1))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """8 drawn road scenes with KITTI labels: about 30 VLM calls."""
    from producer.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("clock-data"), n_images=8, seed=5)


@pytest.fixture
def workers(fleet):
    """The fleet; at teardown its workers are killed and libfaketime's /dev/shm leftovers removed."""
    yield fleet
    fleet.discard()
    for w in fleet.workers:
        remove_shm(w.proc.pid)


def no_duplicates(results: Path, calls: int) -> None:
    """Every image-step ran once: one sink line each, and no more VLM calls than the images need."""
    seeds = seed_records(results)
    assert_finalized_once(results, [r["image_id"] for r in seeds])
    assert failures(results) == []
    lines = sink_lines(results)
    assert all(set(c.values()) == {1} for c in lines.values()), "an image-step ran twice"
    assert calls == sum(normal_calls(r) for r in seeds), "a running task was handed out again"


@pytest.mark.parametrize(("offset", "way"), [("+1h", "ahead of"), ("-1h", "behind")])
def test_a_worker_whose_clock_is_an_hour_off_refuses_to_start(workers, offset, way):
    (w,) = workers.launch(1, concurrency=2, extra_env={**VT, **faketime_env(offset)})
    code = w.proc.wait(timeout=60)
    log = w.text()
    assert code == EXIT_SKEWED, log[-3000:]
    m = re.search(r"CRITICAL/MainProcess\] refusing to start: this host's clock is ([\d.]+) s (ahead of|behind) "
                  r"Redis \(round trip [\d.]+ ms\); the tolerance is 2 s \(a quarter of the visibility timeout, "
                  r"REFEXP_VISIBILITY_TIMEOUT=8 s, at most 60 s\)\..*Fix this host's time sync \(NTP", log)
    assert m, log[-3000:]
    # libfaketime moved the worker's time.time() by the hour, and not Redis's TIME.
    assert m.group(2) == way and abs(float(m.group(1)) - 3600) < 1, m.group(0)
    assert "ready." not in log


def pair(workers, tmp_path) -> tuple[WorkerProc, WorkerProc, ClockFile]:
    """Worker a with the true clock, worker b with a clock file (offset 0 for now)."""
    clock = ClockFile(tmp_path / "clock")
    a, b = workers.launch(1, concurrency=2, extra_env=VT) + workers.launch(1, concurrency=2,
                                                                           extra_env={**VT, **clock.env()})
    for w in (a, b):
        wait_until(lambda w=w: "ready." in w.text() or w.proc.poll() is not None, 60, f"worker {w.name} to start")
        assert "clock: " in w.text() and "tolerance 2 s" in w.text(), w.text()[-3000:]
    return a, b, clock


def warm_pair(workers, fleet_env, fake_vlm, tmp_path) -> tuple[WorkerProc, WorkerProc, ClockFile]:
    """:func:`pair`, warm: a worker's first tasks import the SDK and load the run, seconds on a busy
    machine, which a short visibility timeout (rightly) takes for a dead worker. After a warm-up
    job through both, a task lasts about the fake endpoint's latency."""
    a, b, clock = pair(workers, tmp_path)
    fake_vlm.latency = 0.3
    warm = tiny_images(tmp_path / "warm", 12)
    producer(fleet_env, "enqueue", *job(fake_vlm, warm, tmp_path / "warm-results",
                                        "image_referring_expression.workflow.steps=[1]"), "--wait", "--timeout", "60")
    assert "succeeded in" in a.text() and "succeeded in" in b.text(), "the warm-up did not reach both workers"
    fake_vlm.reset()
    return a, b, clock


def test_a_clock_that_jumps_ahead_mid_run_hands_out_no_running_task(workers, fleet_env, fake_vlm, data, tmp_path):
    _, b, clock = warm_pair(workers, fleet_env, fake_vlm, tmp_path)
    # Calls of 2 s (a quarter of the visibility timeout: no task outlives it): the run lasts well
    # past the few seconds b takes to notice its jump (the clock file's 1 s cache, then its next
    # sweep), also on a loaded machine, where 1 s calls had all ended by then.
    fake_vlm.latency = 2.0
    results = tmp_path / "results"
    producer(fleet_env, "enqueue", *job(fake_vlm, data, results))
    wait_until(lambda: fake_vlm.stats()["in_flight"] >= 3, 30, "calls in flight on both workers", interval=0.05)

    clock.set("+1h")  # b now sees every unacked task as an hour older than it is
    wait_until(lambda: SKEW_LINE in b.text(), 20, "worker b to notice its clock jumped")
    # The sweep that noticed would have handed out every task running then; more sweeps follow.
    assert fake_vlm.stats()["in_flight"] >= 1, "no task was running when b noticed: nothing was tested"
    producer(fleet_env, "wait", "--results-dir", str(results), "--timeout", "90")
    no_duplicates(results, fake_vlm.stats()["calls"])
    assert b.text().count(SKEW_LINE) == 1
    assert abs(skew_logged(b) - 3600) < 1, b.text().split(SKEW_LINE)[1].splitlines()[0]


def test_a_clock_back_within_tolerance_sweeps_again(workers, fleet_env, fake_vlm, data, tmp_path):
    a, b, clock = pair(workers, tmp_path)
    clock.set("+1h")
    wait_until(lambda: SKEW_LINE in b.text(), 20, "worker b to notice its clock jumped")
    clock.set("+0")  # time sync fixed
    wait_until(lambda: BACK_LINE in b.text(), 20, "worker b to notice its clock is right again")
    # b sweeps again: it hands out the tasks of a worker killed mid-run, and only b can.
    fake_vlm.latency = 0.5
    results = tmp_path / "results"
    producer(fleet_env, "enqueue", *job(fake_vlm, data, results))
    wait_until(lambda: fake_vlm.stats()["in_flight"] >= 3, 30, "calls in flight on both workers", interval=0.05)
    workers.kill(a, signal.SIGKILL)
    a.proc.wait(timeout=10)
    wait_until(lambda: status_json(fleet_env, results)["finished"], 60,
               "b to hand out the killed worker's tasks again and finish the run", interval=0.5)
    producer(fleet_env, "finalize", "--results-dir", str(results))
    assert_finalized_once(results, [r["image_id"] for r in seed_records(results)])
    assert failures(results) == []
    assert b.text().count(SKEW_LINE) == 1 and b.text().count(BACK_LINE) == 1


def test_a_clock_that_falls_behind_stamps_its_tasks_with_redis_time(workers, fleet_env, fake_vlm, data, tmp_path):
    _, b, clock = warm_pair(workers, fleet_env, fake_vlm, tmp_path)
    taken_before = b.text().count("succeeded in")
    clock.set("-1h")  # b's own stamps would look an hour old to a
    wait_until(lambda: SKEW_LINE in b.text(), 20, "worker b (idle) to notice its clock jumped")
    fake_vlm.latency = 1.0
    results = tmp_path / "results"
    producer(fleet_env, "enqueue", *job(fake_vlm, data, results), "--wait", "--timeout", "90")
    no_duplicates(results, fake_vlm.stats()["calls"])
    assert b.text().count("succeeded in") - taken_before >= 4, "b took no share of the tasks: nothing was tested"
    assert abs(skew_logged(b) - 3600) < 1 and "behind Redis" in b.text()
