"""One producer per results dir: the lock file, the holder's identity, joining and refusing.

Real flocks on a real file system and a real Redis (two, where a second fleet is the point).
The CLI-level behaviour with worker processes is in tests/integration/test_guard.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import redis
from PIL import Image

from producer.binding import InputsChanged, inputs_of
from producer.embedded import embedded_redis
from producer.guard import Busy, ResultsBusy, ResultsLock, claim, hold, joinable, same_fleet
from producer.runs import describe_redis, prepare, read_run_file, redact
from worker.keys import QUEUE_LISTS, run_key
from worker.layout import Layout
from worker.runstate import RunState
from worker.spec import load_spec

P = "image_referring_expression"


@pytest.fixture
def dirs(tmp_path):
    out = {name: tmp_path / name for name in ("images", "other", "results")}
    for name in ("images", "other"):
        out[name].mkdir()
        for i in range(3):
            Image.new("RGB", (8, 6), (i, 0, 0)).save(out[name] / f"{name}_{i}.png")
    return out


def spec(dirs, images="images"):
    s, _ = prepare(load_spec(None, [f"results_dir={dirs['results']}", f"{P}.vlm.backend=offline",
                                    f"{P}.data.image_dir={dirs[images]}"]))
    return s


# --------------------------------------------------------------------------- the lock file


def test_one_holder_at_a_time_and_the_file_names_it(dirs, redis_client):
    s = spec(dirs)
    layout = Layout(dirs["results"])
    with claim(layout, redis_client, s, command="enqueue") as held:
        text = json.loads(layout.lock_file.read_text())
        assert text["pid"] == os.getpid() and text["command"] == "enqueue"
        assert text["run_id"] == held.me.run_id == read_run_file(layout)["run_id"]
        assert text["redis"] == describe_redis(redis_client)
        assert text["inputs"] == inputs_of(s)
        second = ResultsLock(layout.lock_file)
        assert not second.try_acquire()
        with pytest.raises(Busy) as exc, claim(layout, redis_client, s, command="enqueue"):
            pass
        assert exc.value.holder == held.me
        assert f"pid {os.getpid()}" in str(exc.value)
    assert layout.lock_file.read_text() == ""  # released: nobody named
    assert ResultsLock(layout.lock_file).try_acquire()


def test_a_lock_left_by_a_killed_process_blocks_nobody(dirs, redis_client):
    layout = Layout(dirs["results"])
    dirs["results"].mkdir()
    layout.lock_file.write_text('{"stale": "a dead producer wrote this"}\n')
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(layout.lock_file)!r}, os.O_RDWR)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(120)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert not ResultsLock(layout.lock_file).try_acquire()
    finally:
        holder.kill()
        holder.wait()
    with claim(layout, redis_client, spec(dirs), command="run") as held:
        assert json.loads(layout.lock_file.read_text())["token"] == held.me.token


def test_a_taken_lock_with_no_identity_is_reported_after_a_wait(dirs):
    dirs["results"].mkdir()
    path = Layout(dirs["results"]).lock_file
    first = ResultsLock(path)
    assert first.try_acquire()  # taken, never announced
    with pytest.raises(ResultsBusy, match="has not said who it is"):
        ResultsLock(path).acquire_or_holder(wait=0.3)
    first.release()
    assert ResultsLock(path).acquire_or_holder(wait=0.3) is None


def test_the_holder_is_marked_in_its_redis_and_unmarked_on_release(dirs, redis_client):
    layout = Layout(dirs["results"])
    with claim(layout, redis_client, spec(dirs), command="enqueue") as held:
        assert same_fleet(redis_client, held.me)
        assert RunState(redis_client, held.me.run_id).meta()["enqueue_complete"] is False
    assert redis_client.get(run_key(held.me.run_id, "producer")) is None
    assert not same_fleet(redis_client, held.me)


def test_last_producer_is_recorded_in_run_json_and_handed_to_the_next(dirs, redis_client):
    layout = Layout(dirs["results"])
    with claim(layout, redis_client, spec(dirs), command="run") as first:
        assert first.previous is None
    with claim(layout, redis_client, spec(dirs), command="enqueue") as second:
        assert second.previous["pid"] == os.getpid() and second.previous["command"] == "run"
        assert "token" not in second.previous
    assert read_run_file(layout)["last_producer"]["command"] == "enqueue"


# --------------------------------------------------------------------------- joining and refusing


def test_same_inputs_on_the_same_redis_may_join(dirs, redis_client):
    layout = Layout(dirs["results"])
    with claim(layout, redis_client, spec(dirs), command="enqueue") as held:
        with pytest.raises(Busy) as busy, claim(layout, redis_client, spec(dirs), command="enqueue"):
            pass
        assert joinable(busy.value, redis_client, spec(dirs)) == held.me


def test_other_inputs_while_held_are_refused_naming_both(dirs, redis_client):
    layout = Layout(dirs["results"])
    with claim(layout, redis_client, spec(dirs), command="enqueue"):
        with pytest.raises(Busy) as busy, claim(layout, redis_client, spec(dirs, "other"), command="enqueue"):
            pass
        with pytest.raises(InputsChanged) as exc:
            joinable(busy.value, redis_client, spec(dirs, "other"))
    msg = str(exc.value)
    assert str(dirs["images"].resolve()) in msg and str(dirs["other"].resolve()) in msg
    assert f"pid {os.getpid()}" in msg
    assert "once that producer has finished, move" in msg  # not: move a dir someone works in


def test_a_producer_on_another_redis_is_refused_naming_the_holders_redis_without_its_password(dirs, redis_client):
    layout = Layout(dirs["results"])
    secret = "guard-s3cret"
    with embedded_redis(password=secret) as url:
        theirs = redis.Redis.from_url(url)
        with claim(layout, theirs, spec(dirs), command="enqueue") as held:
            with pytest.raises(Busy) as busy, claim(layout, redis_client, spec(dirs), command="enqueue"):
                pass
            with pytest.raises(ResultsBusy) as exc:
                joinable(busy.value, redis_client, spec(dirs))
            lock_text = layout.lock_file.read_text()
        theirs.close()
    msg = str(exc.value)
    port = url.rsplit(":", 1)[1].split("/")[0]
    assert f"redis://***@127.0.0.1:{port}/0" in msg and describe_redis(redis_client) in msg
    assert "another Redis" in msg and f"pid {held.me.pid}" in msg
    for text in (msg, lock_text, layout.run_file.read_text()):
        assert secret not in text


def test_commands_that_cannot_join_are_refused(dirs, redis_client):
    layout = Layout(dirs["results"])
    with claim(layout, redis_client, spec(dirs), command="enqueue"):
        with pytest.raises(ResultsBusy, match="`producer run` cannot share it"), \
                hold(layout, redis_client, spec(dirs), command="run"):
            pass
        with pytest.raises(InputsChanged), hold(layout, redis_client, spec(dirs, "other"), command="run"):
            pass
        with pytest.raises(ResultsBusy, match="retry-failed"), hold(layout, redis_client, None, command="retry-failed"):
            pass


# --------------------------------------------------------------------------- submit under the lock


def test_a_refused_enqueue_touches_nothing_and_a_grown_image_dir_resumes(dirs, redis_client, redis_url):
    from producer.submit import submit
    from worker.app import repoint

    repoint(redis_url)
    layout = Layout(dirs["results"])
    first = submit(spec(dirs), redis_client)
    assert first.enqueue.enqueued == 3
    bound = read_run_file(layout)
    assert bound["inputs"] == inputs_of(spec(dirs)) and bound["steps"] == [0, 1, 2, 3]
    assert bound["seed"]["images"] == 3 and len(bound["seed"]["sha256"]) == 64
    seed_bytes, run_bytes = layout.seed.path.read_bytes(), layout.run_file.read_bytes()
    listing = sorted(p.name for p in layout.root.iterdir())
    assert {"run.json", "run.spec.yaml", "seed_annotations.jsonl"} <= set(listing)

    with pytest.raises(InputsChanged):
        submit(spec(dirs, "other"), redis_client)
    assert layout.seed.path.read_bytes() == seed_bytes and layout.run_file.read_bytes() == run_bytes
    assert sorted(p.name for p in layout.root.iterdir()) == listing, "the refused enqueue left a file behind"

    Image.new("RGB", (8, 6)).save(dirs["images"] / "images_3.png")  # the image dir grows
    again = submit(spec(dirs), redis_client)
    assert again.seed.images == 4 and again.enqueue.enqueued == 1 and again.enqueue.already_queued == 3
    assert any("seed changed" in n and "3 -> 4" in n for n in again.notes)
    assert read_run_file(layout)["seed"]["images"] == 4
    redis_client.delete(*QUEUE_LISTS)


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:pw@host:6379/0", "redis://***@host:6379/0"),
    ("redis://user:pw@host/1", "redis://***@host/1"),
    ("rediss://host:6380/0?password=pw&db=2", "rediss://host:6380/0?password=***&db=2"),
    ("redis://host:6379/0", "redis://host:6379/0"),
    ("unix:///run/redis.sock?db=0", "unix:///run/redis.sock?db=0"),
])
def test_redact(url, shown):
    assert redact(url) == shown


def test_describe_redis_never_holds_the_password():
    client = redis.Redis.from_url("redis://:topsecret@10.0.0.5:6390/3")
    assert describe_redis(client) == "redis://***@10.0.0.5:6390/3"
