"""The producer's side of faults: a Redis that stalls or restarts empty under it, a finalize killed
mid-write, Ctrl-C of ``producer run``.

Real parts: a private redis-server per test (``producer.embedded.RedisServer``, so its pid can be
sent SIGSTOP / SIGCONT, and it can be restarted empty on the same port), real ``celery -A worker
worker`` processes, the producer CLI in a subprocess, and the OpenAI SDK against the FakeVLM.
Every wait is on a condition, with a timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from producer.embedded import RedisServer
from tests.integration.test_faults import (
    KOMBU_RECONNECT_CRASH,
    assert_finalized_once,
    failures,
    job,
    normal_calls,
    run_state,
    seed_records,
    sink_lines,
    tiny_images,
)
from tests.support.fleet import ROOT, Fleet, producer, wait_until
from worker.sinks import dumps
from worker.stepdefs import step_dir_name

pytestmark = pytest.mark.integration

STEPS = (0, 1, 2, 3)
STALL_S = 10.0  # how long Redis is stopped in the stall test


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """8 drawn road scenes with KITTI labels (one has no label file, so no boxes)."""
    from producer.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("outage-data"), n_images=8, seed=5)


class Cli:
    """The producer CLI running in the background, its output in files (read while it runs)."""

    def __init__(self, env: dict, args: list[str], logdir: Path, name: str, *, new_session: bool = False):
        self.out, self.err = logdir / f"{name}.out", logdir / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "producer.cli", *args], cwd=ROOT, env=env,
                                         stdout=out, stderr=err, start_new_session=new_session)

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def wait(self, timeout: float, *, while_waiting=None) -> int:
        def ended() -> bool:
            if while_waiting:
                while_waiting()
            return self.proc.poll() is not None

        wait_until(ended, timeout, "the producer to exit", interval=0.2)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def revive_crashed(fleet: Fleet) -> None:
    """Replace a worker that died of the known upstream crash on losing the broker (see
    test_faults.KOMBU_RECONNECT_CRASH), as ``restart: unless-stopped`` would; any other death fails."""
    for w in list(fleet.workers):
        if w.proc.poll() is not None and not getattr(w, "replaced", False):
            assert KOMBU_RECONNECT_CRASH in w.text(), f"worker {w.name} died:\n{w.text()[-4000:]}"
            w.replaced = True  # type: ignore[attr-defined]
            fleet.start(1, concurrency=8)


def enqueue_in_progress(url: str, results: Path) -> bool:
    """The producer has published a batch and not finished enqueueing."""
    if not (results / "run.json").exists():
        return False
    state = run_state(url, results)
    return state.meta().get("enqueue_complete") is False and state.queued_count() > 0


def missing_calls(results: Path) -> int:
    """VLM calls still needed for the image-steps whose record is not on disk."""
    lines = sink_lines(results)
    n = 0
    for rec in seed_records(results):
        for s in STEPS:
            if lines[s][rec["image_id"]] == 0:
                n += 1 if (s == 1 or rec["kitti_bboxes"]) else 0
    return n


# --------------------------------------------------------------------------- 5. a Redis stall

def test_redis_stalled_during_enqueue_wait_is_ridden_out(fleet_env, fake_vlm, tmp_path):
    n = 400
    images = tiny_images(tmp_path / "images", n)
    results = tmp_path / "results"
    with RedisServer() as server:
        env = {**fleet_env, "REDIS_URL": server.url}
        fleet = Fleet(env=env, logdir=tmp_path)
        cli = None
        try:
            fleet.start(2, concurrency=8)
            cli = Cli(env, ["enqueue", *job(fake_vlm, images, results), "--max-inflight", "100", "--wait",
                            "--timeout", "150"], tmp_path, "enqueue")
            wait_until(lambda: enqueue_in_progress(server.url, results), 60, "the enqueue to be under way",
                       interval=0.02)
            stalled_at = time.monotonic()
            os.kill(server.pid, signal.SIGSTOP)
            try:
                # The fault: Redis stopped for STALL_S seconds, and at least until the producer has seen
                # it stop answering (after its 5 s socket timeout).
                wait_until(lambda: time.monotonic() - stalled_at >= STALL_S and "is not answering" in cli.stderr(),
                           60, "the producer to notice the stall", interval=0.1)
            finally:
                os.kill(server.pid, signal.SIGCONT)
            stall = time.monotonic() - stalled_at
            rc = cli.wait(180)
        finally:
            if cli is not None:
                cli.kill()
            fleet.stop_all()
    err = cli.stderr()
    assert rc == 0, f"{cli.stdout()}\n{err[-3000:]}"
    assert "Traceback" not in err
    assert "is not answering" in err and "answers again" in err
    assert_finalized_once(results, [f"img_{i:04d}" for i in range(n)])
    assert failures(results) == []
    print(f"Redis stopped for {stall:.1f} s; producer notes: "
          f"{[line for line in err.splitlines() if 'Redis' in line or 'enqueue:' in line]}")


def test_a_redis_that_does_not_come_back_ends_wait_with_a_clear_error(fleet_env, fake_vlm, data, tmp_path):
    results = tmp_path / "results"
    with RedisServer() as server:
        env = {**fleet_env, "REDIS_URL": server.url}
        producer(env, "enqueue", *job(fake_vlm, data, results))  # no worker: the run stays pending
        cli = Cli({**env, "REFEXP_REDIS_PATIENCE": "3"}, ["wait", "--results-dir", str(results)], tmp_path, "wait")
        try:
            wait_until(lambda: "images]" in cli.stderr(), 30, "producer wait to show progress")
            os.kill(server.pid, signal.SIGSTOP)
            try:
                rc = cli.wait(90)
            finally:
                os.kill(server.pid, signal.SIGCONT)
        finally:
            cli.kill()
    err = cli.stderr()
    assert rc == 7, err[-3000:]  # ExitCode.REDIS_UNREACHABLE
    assert "Traceback" not in err
    assert "is not answering" in err
    assert f"error: Redis at {server.url} has not answered for" in err
    assert "run the same command to go on" in err


# --------------------------------------------------------------------------- 8. Redis restarted empty

def test_redis_restarted_empty_during_enqueue_wait_is_registered_and_enqueued_again(fleet_env, fake_vlm,
                                                                                    tmp_path):
    n = 400
    images = tiny_images(tmp_path / "images", n)
    results = tmp_path / "results"
    server = RedisServer().start()
    # A short visibility timeout for the producer too: an image published into the old Redis and
    # marked in flight in the new one (the restart fell between the two) has no message anywhere,
    # and the reconciler in `enqueue --wait` puts it back after that long (5 min by default).
    env = {**fleet_env, "REDIS_URL": server.url, "REFEXP_VISIBILITY_TIMEOUT": "6"}
    fleet = Fleet(env=env, logdir=tmp_path)
    cli = None
    try:
        fleet.start(2, concurrency=8)
        cli = Cli(env, ["enqueue", *job(fake_vlm, images, results), "--max-inflight", "100", "--wait",
                        "--timeout", "150"], tmp_path, "enqueue")
        wait_until(lambda: enqueue_in_progress(server.url, results)
                   and run_state(server.url, results).counts([3])[3]["done"] > 0, 60,
                   "the enqueue to be under way and some images done", interval=0.02)
        server.stop()  # no persistence: everything in Redis is gone ...
        server = RedisServer(port=server.port).start()  # ... and an empty one answers on the same port
        rc = cli.wait(180, while_waiting=lambda: revive_crashed(fleet))
    finally:
        if cli is not None:
            cli.kill()
        fleet.stop_all()
        server.stop()
    err = cli.stderr()
    assert rc == 0, f"{cli.stdout()}\n{err[-3000:]}"
    assert "Traceback" not in err
    assert "storing the run again" in err, err[-3000:]
    assert_finalized_once(results, [f"img_{i:04d}" for i in range(n)])
    assert failures(results) == []
    print(f"calls: {fake_vlm.stats()['calls']} for {n} images; producer notes: "
          f"{[line for line in err.splitlines() if 'Redis' in line or 'enqueue:' in line]}")


def test_redis_restarted_empty_after_enqueue_status_wait_and_finalize_say_what_to_run(fleet_env, fake_vlm,
                                                                                       data, tmp_path):
    results = tmp_path / "results"
    server = RedisServer().start()
    env = {**fleet_env, "REDIS_URL": server.url}
    fleet = Fleet(env=env, logdir=tmp_path)
    watcher = None
    try:
        fleet.start(2, concurrency=2)
        fake_vlm.latency = 1.0
        producer(env, "enqueue", *job(fake_vlm, data, results))
        n = len(seed_records(results))
        watcher = Cli(env, ["wait", "--results-dir", str(results), "--timeout", "120"], tmp_path, "wait")
        wait_until(lambda: "images]" in watcher.stderr(), 30, "producer wait to show progress")
        wait_until(lambda: run_state(server.url, results).counts([3])[3]["done"] >= 1, 60, "an image to finish",
                   interval=0.05)
        assert run_state(server.url, results).counts([3])[3]["done"] <= n - 2, "the run ended too soon to test"

        server.stop()
        server = RedisServer(port=server.port).start()

        # A wait that saw the run: it says so and stops, instead of polling for ever.
        assert watcher.wait(60, while_waiting=lambda: revive_crashed(fleet)) == 6, watcher.stderr()[-3000:]
        spec_path = results / "run.spec.yaml"
        resume = f"producer enqueue -c {spec_path}"
        for text in (watcher.stderr(), producer(env, "status", "--results-dir", str(results), check=False).stderr):
            assert "holds nothing for this run" in text and resume in text, text
            assert "Traceback" not in text
        st = producer(env, "status", "--results-dir", str(results), "--json", check=False)
        assert st.returncode == 6
        gone = json.loads(st.stdout)
        assert gone["in_redis"] is False and gone["resume"] == resume and gone["seeded"] == n
        # A wait started now never saw it, and stops too.
        late = producer(env, "wait", "--results-dir", str(results), "--timeout", "60", check=False)
        assert late.returncode == 6 and resume in late.stderr

        # Let the calls in flight finish and write their answers (warm shutdown), then read the files.
        fleet.stop_all()
        missing = missing_calls(results)
        assert missing > 0, "the run finished before Redis restarted: nothing was tested"
        done_on_disk = len(sink_lines(results)[3])

        # finalize needs no Redis at all.
        no_redis = {**env, "REDIS_URL": "redis://127.0.0.1:1/0"}
        fin = producer(no_redis, "finalize", "--results-dir", str(results), check=False)
        assert fin.returncode == 3, fin.stderr  # ExitCode.SOME_FAILED: the run is not finished yet
        assert f"({done_on_disk} images;" in fin.stdout, fin.stdout
        final = [json.loads(line)["image_id"] for line in (results / "annotations.jsonl").read_text().splitlines()]
        assert final == sorted(sink_lines(results)[3])

        # The command the message gave recovers everything. The old workers left retries in the new
        # Redis (their run was gone from it, so they kept retrying); those run again once the
        # resume stores the run, side by side with the resume's own messages, and a few image-steps
        # may be done twice (at-least-once delivery; readers keep one line, finalize one record).
        calls_before = fake_vlm.stats()["calls"]
        fleet.start(2, concurrency=2)
        producer(env, *resume.split()[1:], "--wait", "--timeout", "90")
        made = fake_vlm.stats()["calls"] - calls_before
        assert made >= missing, "an image-step missing on disk was not asked again"
        assert_finalized_once(results, [rec["image_id"] for rec in seed_records(results)])
        assert failures(results) == []
        print(f"Redis restarted empty: {missing} calls were missing on disk; the resume made {made} "
              f"({made - missing} for image-steps the old workers' retries also did)")
    finally:
        if watcher is not None:
            watcher.kill()
        fleet.stop_all()
        server.stop()


# --------------------------------------------------------------------------- 7. finalize killed

def test_finalize_killed_mid_write_leaves_a_temp_file_the_next_finalize_removes(tmp_path):
    results = tmp_path / "results"
    n = 12000
    (results / step_dir_name(3)).mkdir(parents=True)
    (results / "run.json").write_text(json.dumps({"run_id": "killed"}) + "\n")  # an old run.json: no steps
    caption = "a long caption " * 100
    with open(results / "seed_annotations.jsonl", "w") as seed, \
            open(results / step_dir_name(3) / "annotations.jsonl", "w") as sink:
        for i in range(n):
            base = {"image_id": f"im{i:06d}", "image_path": f"/img/{i}.png", "width": 10, "height": 10,
                    "kitti_bboxes": [], "source": "image_referring_expression"}
            seed.write(dumps({**base, "pipeline_steps": []}) + "\n")
            sink.write(dumps({**base, "caption": caption, "expressions": [],
                              "pipeline_steps": ["step3_double_check"]}) + "\n")
    env = {**os.environ, "REDIS_URL": "redis://127.0.0.1:1/0"}  # finalize needs no Redis

    def temps() -> list[Path]:
        return [p for p in results.iterdir() if p.name.startswith(".annotations.jsonl.finalize-")
                and p.name.endswith(".tmp")]

    def leftovers() -> list[Path]:
        """Everything a finalize may leave behind in results_dir but its lock file."""
        return [p for p in results.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]

    first = subprocess.Popen([sys.executable, "-m", "producer.cli", "finalize", "--results-dir", str(results)],
                             cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: [p for p in temps() if p.stat().st_size > 1_000_000] or first.poll() is not None, 60,
                   "finalize to be writing its temp file", interval=0.005)
        assert first.poll() is None, "finalize ended before it could be killed mid-write"
        os.kill(first.pid, signal.SIGKILL)
    finally:
        first.wait()
    (left,) = temps()
    assert f"-{first.pid}.tmp" in left.name and not (results / "annotations.jsonl").exists()
    # Killed mid-write, it also left the folder its sorts spill runs to (made before the write),
    # and the step file it merges in the same pass.
    (spill,) = [p for p in leftovers() if p != left]
    assert spill.is_dir() and spill.name.startswith(".annotations.jsonl.sort-")
    (merging,) = (results / step_dir_name(3)).glob(".annotations.jsonl.compact-*.tmp")
    size = (left.stat().st_size + merging.stat().st_size
            + sum(f.stat().st_size for f in spill.rglob("*") if f.is_file()))

    again = producer(env, "finalize", "--results-dir", str(results))
    assert temps() == [] and leftovers() == []
    assert list((results / step_dir_name(3)).glob(".*.tmp")) == []
    assert f"removed 2 temp file(s) and 1 temp folder(s) an interrupted finalize left in {results}" in again.stderr
    assert f"({size / 1e6:.1f} MB)" in again.stderr
    assert f"({n} images; 0 failed, 0 missing)" in again.stdout
    ids = [json.loads(line)["image_id"] for line in (results / "annotations.jsonl").read_text().splitlines()]
    assert ids == [f"im{i:06d}" for i in range(n)]


# --------------------------------------------------------------------------- 9. Ctrl-C of producer run

def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def test_ctrl_c_of_producer_run_keeps_the_answers_in_flight_and_exits_soon(fake_vlm, data, tmp_path):
    fake_vlm.latency = 1.5
    results = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env["PYTHONUNBUFFERED"] = "1"
    args = ["run", *job(fake_vlm, data, results, "image_referring_expression.workflow.max_workers=4")]
    cli = Cli(env, args, tmp_path, "run", new_session=True)
    try:
        wait_until(lambda: fake_vlm.stats()["calls"] >= 6 and fake_vlm.stats()["in_flight"] >= 2, 90,
                   "calls to be in flight", interval=0.05)
        (redis_pid,) = [c for c in _children(cli.proc.pid)
                        if b"redis-server" in Path(f"/proc/{c}/cmdline").read_bytes()]
        in_flight = fake_vlm.stats()["in_flight"]
        interrupted_at = time.monotonic()
        os.killpg(cli.proc.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
        rc = cli.wait(fake_vlm.latency * 2 + 30)
        took = time.monotonic() - interrupted_at
    finally:
        cli.kill()
    err = cli.stderr()
    assert rc == 130, err[-3000:]
    assert "interrupted:" in err and "run the same command to resume" in err
    assert "Traceback" not in err
    assert not Path(f"/proc/{redis_pid}").exists(), "the embedded redis-server outlived the producer"
    calls_first = fake_vlm.stats()["calls"]
    print(f"Ctrl-C with {in_flight} calls in flight: exit after {took:.1f} s (fake latency {fake_vlm.latency} s)")

    again = producer(env, *args)
    assert "interrupted" not in again.stderr
    seeds = seed_records(results)
    assert fake_vlm.stats()["calls"] > calls_first, "the run was finished at Ctrl-C: nothing was tested"
    assert fake_vlm.stats()["calls"] == sum(normal_calls(r) for r in seeds), \
        "a call was paid twice: an answer in flight at Ctrl-C was lost"
    assert_finalized_once(results, [r["image_id"] for r in seeds])
    assert all(set(c.values()) == {1} for c in sink_lines(results).values())


def test_a_second_ctrl_c_of_producer_run_quits_at_once(fake_vlm, data, tmp_path):
    fake_vlm.latency = 60.0  # calls in flight would keep a drain waiting (up to 2 x the 20 s VLM timeout + 10 s)
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env["PYTHONUNBUFFERED"] = "1"
    args = ["run", *job(fake_vlm, data, tmp_path / "results", "image_referring_expression.workflow.max_workers=2")]
    cli = Cli(env, args, tmp_path, "run", new_session=True)
    try:
        wait_until(lambda: fake_vlm.stats()["in_flight"] >= 1, 90, "a call to be in flight", interval=0.05)
        (redis_pid,) = [c for c in _children(cli.proc.pid)
                        if b"redis-server" in Path(f"/proc/{c}/cmdline").read_bytes()]
        os.killpg(cli.proc.pid, signal.SIGINT)
        wait_until(lambda: "Ctrl-C again to quit now" in cli.stderr(), 30, "the first Ctrl-C to be taken")
        os.killpg(cli.proc.pid, signal.SIGINT)
        rc = cli.wait(15)
        assert fake_vlm.stats()["in_flight"] >= 1, "the calls in flight ended first: the quit was not tested"
    finally:
        cli.kill()
    err = cli.stderr()
    assert rc == 130, err[-3000:]
    assert "quitting now" in err and "run the same command to resume" in err
    assert "Traceback" not in err
    assert not Path(f"/proc/{redis_pid}").exists(), "the embedded redis-server outlived the producer"
