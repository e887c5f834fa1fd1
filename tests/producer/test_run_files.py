"""What a run keeps in its results dir besides the sinks, so it survives losing Redis: the stored
spec, the steps finalize reads from the files, what ``status`` reports when Redis forgot the run,
and the temp files a killed finalize leaves behind."""

from __future__ import annotations

import json

import fakeredis
import pytest

from producer.finalize import finalize, remove_stale_temps
from producer.outage import Outage, RedisGaveUp
from producer.runs import open_run, spec_file, steps_on_disk, stored_spec, write_spec_file
from producer.status import format_gone, gone_report
from worker.layout import Layout
from worker.sinks import dumps
from worker.spec import load_spec


@pytest.fixture
def run(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    spec = load_spec(None, [
        f"results_dir={tmp_path / 'results'}",
        f"image_referring_expression.data.image_dir={images}",
        "image_referring_expression.vlm.backend=openai",
        "image_referring_expression.vlm.openai.model_name=some-vl",
        "image_referring_expression.vlm.openai.api_key=sk-very-secret-123",
        "image_referring_expression.vlm.prices.input_per_million=0.5",
        "image_referring_expression.workflow.steps=[0,1,2]",
    ])
    return open_run(spec, fakeredis.FakeRedis())


def seed(layout: Layout, ids: list[str]) -> None:
    with open(layout.seed.path, "w", encoding="utf-8") as f:
        for i in ids:
            f.write(dumps({"image_id": i, "image_path": f"/img/{i}.png", "width": 10, "height": 10,
                           "kitti_bboxes": [], "source": "image_referring_expression", "pipeline_steps": []}) + "\n")


def rec(image_id: str, step: int) -> dict:
    names = {0: "step0_region_expr", 1: "step1_image_caption", 2: "step2_grounding_expr", 3: "step3_double_check"}
    return {"image_id": image_id, "image_path": f"/img/{image_id}.png", "width": 10, "height": 10,
            "kitti_bboxes": [], "expressions": [], "source": "image_referring_expression",
            "pipeline_steps": [names[step]]}


# --------------------------------------------------------------------------- the stored spec

def test_the_stored_spec_loads_back_as_the_same_spec_without_its_secret(run):
    path = write_spec_file(run)
    assert path == spec_file(run.layout) and path.parent == run.layout.root
    text = path.read_text()
    assert "sk-very-secret-123" not in text
    assert text.startswith("# refexp run ") and "producer enqueue -c" in text
    back = load_spec(path)  # what `producer enqueue -c <it>` does first
    assert back.public_dict() == run.spec.public_dict()
    assert back.ire.vlm.openai.api_key == ""
    assert stored_spec(run.layout) == back


def test_no_stored_spec_is_none(tmp_path):
    assert stored_spec(Layout(tmp_path)) is None


# --------------------------------------------------------------------------- steps from the files

def test_steps_come_from_run_json_first(run):
    write_spec_file(run)
    run.layout.run_file.write_text(json.dumps({"run_id": run.run_id, "steps": [3, 2]}))
    assert steps_on_disk(run.layout) == [2, 3]


def test_an_old_run_json_falls_back_to_the_stored_spec(run):
    assert set(json.loads(run.layout.run_file.read_text())) == {"run_id"}
    write_spec_file(run)
    assert steps_on_disk(run.layout) == [0, 1, 2]


def test_without_a_stored_spec_the_step_directories_that_exist_say(run):
    run.layout.sink(0).append(rec("a", 0))
    run.layout.sink(2).append(rec("a", 2))
    assert steps_on_disk(run.layout) == [0, 2]


# --------------------------------------------------------------------------- Redis forgot the run

def test_gone_report_counts_what_the_files_hold_and_names_the_resume_command(run):
    layout = run.layout
    write_spec_file(run)
    seed(layout, ["a", "b", "c"])
    for image_id in ("a", "b"):
        layout.sink(0).append(rec(image_id, 0))
    layout.sink(1).append(rec("a", 1))
    with open(layout.sink(1).path, "ab") as f:
        f.write(b'{"image_id": "b", "capt')  # a torn last line is not a record
    layout.record_failure(image_id="c", step=0, error="ParseError: nothing", attempts=3)
    rep = gone_report(layout, run.run_id, "redis://:hunter2@redis.example:6379/0")
    assert rep["in_redis"] is False and rep["seeded"] == 3 and rep["failure_lines"] == 1
    assert rep["steps"] == {"0": {"records": 2}, "1": {"records": 1}, "2": {"records": 0}}
    assert rep["resume"] == f"producer enqueue -c {spec_file(layout)}"
    text = format_gone(rep)
    assert "hunter2" not in text and "redis://***@redis.example:6379/0" in text
    assert rep["resume"] in text and rep["resume_local"] in text
    assert f"producer finalize --results-dir {layout.root}" in text
    assert "step 0: 2 records; step 1: 1 records; step 2: 0 records" in text


def test_gone_report_of_a_run_without_a_stored_spec_says_to_run_its_first_command_again(run):
    rep = gone_report(run.layout, run.run_id, "redis://localhost:6379/0")
    assert rep["resume"] is None
    assert "command that started it again" in format_gone(rep)


def test_status_tells_a_run_redis_forgot_from_one_still_seeding():
    from producer.status import RunNotInRedis, format_status, status
    from worker.runstate import RunState

    state = RunState(fakeredis.FakeRedis(), "r1")
    with pytest.raises(RunNotInRedis, match="r1"):
        status(state)  # never enqueued on this Redis, or it restarted empty
    state.set_meta(seeding=True)  # an enqueue is reading the images; the run is not stored yet
    st = status(state)
    assert st["seeding"] is True and st["finished"] is False and st["images"] == 0
    assert "(an enqueue is reading the images)" in format_status(st)
    state.r.flushall()
    state.set_meta(enqueue_complete=True)  # a producer's last write, landing in a Redis that restarted empty
    with pytest.raises(RunNotInRedis):
        status(state)


# --------------------------------------------------------------------------- finalize leftovers

def test_finalize_removes_the_temp_files_killed_finalizes_left_and_nothing_else(tmp_path):
    layout = Layout(tmp_path)
    seed(layout, ["a", "b"])
    for image_id in ("a", "b"):
        layout.sink(3).append(rec(image_id, 3))
    stale = {
        ".annotations.jsonl.finalize-otherhost-4242.tmp": b"x" * 5000,  # another host's, killed
        ".annotations.jsonl.31337.tmp": b"y" * 100,  # the name finalize used before
    }
    keep = [".annotations.jsonl.swp", ".seed_annotations.jsonl.12.34.tmp", "annotations.jsonl.bak",
            ".annotations.jsonl.finalize-x.tmp.keep"]
    for name, data in stale.items():
        (tmp_path / name).write_bytes(data)
    for name in keep:
        (tmp_path / name).write_text("mine")
    report = finalize(layout, [0, 1, 2, 3])
    assert sorted(report.stale_removed) == sorted((n, len(d)) for n, d in stale.items())
    left = {p.name for p in tmp_path.iterdir()}
    assert not left & set(stale)
    assert set(keep) <= left
    assert not [n for n in left if n.endswith(".tmp") and "finalize" in n]  # its own temp was renamed
    assert [json.loads(line)["image_id"] for line in layout.final.read_text().splitlines()] == ["a", "b"]
    assert remove_stale_temps(layout) == []


# --------------------------------------------------------------------------- outage notes

def test_an_outage_is_noted_once_when_it_starts_and_once_when_it_ends():
    notes: list[str] = []
    outage = Outage("redis://:pw@host:6379/0", note=notes.append, patience_s=60)
    outage.up()
    assert notes == []
    for _ in range(3):
        outage.down(TimeoutError("Timeout reading from socket"))
    outage.check(TimeoutError("still"))  # within the patience: no error
    assert len(notes) == 1 and "not answering" in notes[0] and "pw" not in notes[0]
    outage.up()
    outage.up()
    assert len(notes) == 2 and "answers again" in notes[1]


def test_an_outage_longer_than_the_patience_gives_up_with_the_reason():
    outage = Outage("redis://host:6379/0", note=lambda _: None, patience_s=0.0)
    outage.down(ConnectionError("Connection refused"))
    with pytest.raises(RedisGaveUp, match=r"has not answered for \d+ s \(ConnectionError: Connection refused\)"):
        outage.check(ConnectionError("Connection refused"))


def test_a_killed_reindex_spill_folder_is_removed_by_the_next_finalize(tmp_path, redis_client):
    """``submit.reindex`` spills under the finalize lock, so its folder is stale once the lock
    is free; temp names on the shared volume carry the host (two hosts can share a pid)."""
    import socket

    from producer.submit import reindex
    from worker.runstate import RunState
    from worker.sinks import temp_path

    layout = Layout(tmp_path)
    seed(layout, ["a"])
    layout.sink(3).append(rec("a", 3))
    killed = tmp_path / ".reindex-abc123"
    (killed / "runs").mkdir(parents=True)
    (killed / "runs" / "0.run").write_bytes(b"z" * 300)
    assert reindex(RunState(redis_client, "run-killed-reindex"), layout) == {3: 1}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".reindex-")) == [killed.name]
    report = finalize(layout, [0, 1, 2, 3])
    assert report.stale_removed == [(killed.name, 300)] and not killed.exists()
    assert socket.gethostname() in temp_path(tmp_path / "x.json").name
