"""finalize: one record per image from the sinks, sorted, last wins, failures listed not emitted."""

from __future__ import annotations

import json

from producer.finalize import finalize
from worker.layout import Layout
from worker.sinks import dumps


def seed(layout: Layout, ids: list[str]) -> None:
    layout.root.mkdir(parents=True, exist_ok=True)
    with open(layout.seed.path, "w", encoding="utf-8") as f:
        for i in ids:
            f.write(dumps({"image_id": i, "image_path": f"/img/{i}.png", "width": 10, "height": 10,
                           "kitti_bboxes": [], "source": "image_referring_expression",
                           "pipeline_steps": []}) + "\n")


def rec(image_id: str, step: int, **fields) -> dict:
    names = {0: "step0_region_expr", 1: "step1_image_caption", 2: "step2_grounding_expr", 3: "step3_double_check"}
    return {"image_id": image_id, "image_path": f"/img/{image_id}.png", "width": 10, "height": 10,
            "kitti_bboxes": [], **fields, "source": "image_referring_expression", "pipeline_steps": [names[step]]}


def read_final(layout: Layout) -> list[dict]:
    return [json.loads(line) for line in layout.final.read_text(encoding="utf-8").splitlines()]


def test_one_record_per_image_sorted(tmp_path):
    layout = Layout(tmp_path)
    seed(layout, ["c", "a", "b"])
    for i in ("b", "c", "a"):
        layout.sink(3).append(rec(i, 3, expressions=[{"text": f"x-{i}"}]))
    report = finalize(layout, [0, 1, 2, 3])
    out = read_final(layout)
    assert [r["image_id"] for r in out] == ["a", "b", "c"]
    assert [r["expressions"][0]["text"] for r in out] == ["x-a", "x-b", "x-c"]
    assert report.written == 3
    assert report.failed == [] and report.missing == []
    assert report.path == layout.final


def test_last_record_wins(tmp_path):
    layout = Layout(tmp_path)
    seed(layout, ["a", "b"])
    sink = layout.sink(3)
    sink.append(rec("a", 3, expressions=[{"text": "old"}]))
    sink.append(rec("b", 3, expressions=[]))
    sink.append(rec("a", 3, expressions=[{"text": "new"}]))
    with open(sink.path, "ab") as f:
        f.write(b'{"image_id": "a", "expressions": [{"text": "torn"')
    report = finalize(layout, [0, 1, 2, 3])
    out = read_final(layout)
    assert [r["image_id"] for r in out] == ["a", "b"]
    assert out[0]["expressions"] == [{"text": "new"}]
    assert report.written == 2
    assert report.bad_lines == 1


def test_failed_images_listed_not_emitted(tmp_path):
    layout = Layout(tmp_path)
    seed(layout, ["a", "b", "c", "d"])
    layout.sink(2).append(rec("a", 2, expressions=[]))
    layout.sink(2).append(rec("c", 2, expressions=[]))
    layout.record_failure(image_id="b", step=0, error="boom", attempts=3)
    # c failed once but was retried successfully: it is emitted, not listed
    layout.record_failure(image_id="c", step=2, error="flaky", attempts=1)
    report = finalize(layout, [0, 2])
    assert [r["image_id"] for r in read_final(layout)] == ["a", "c"]
    assert report.failed == ["b"]
    assert report.missing == ["d"]
    assert report.written == 2


def test_steps_0_and_1_are_merged(tmp_path):
    layout = Layout(tmp_path)
    seed(layout, ["a", "b"])
    layout.sink(0).append(rec("a", 0, regions=[{"description": "red car"}]))
    layout.sink(1).append(rec("a", 1, caption="A street."))
    layout.sink(0).append(rec("b", 0, regions=[]))  # b has no caption yet
    report = finalize(layout, [0, 1])
    out = read_final(layout)
    assert [r["image_id"] for r in out] == ["a"]
    a = out[0]
    assert a["regions"] == [{"description": "red car"}]
    assert a["caption"] == "A street."
    assert a["pipeline_steps"] == ["step0_region_expr", "step1_image_caption"]
    assert report.written == 1
    assert report.missing == ["b"]


def test_step_1_only_uses_step_1_records(tmp_path):
    layout = Layout(tmp_path)
    seed(layout, ["a"])
    layout.sink(0).append(rec("a", 0, regions=[{"description": "stale"}]))
    layout.sink(1).append(rec("a", 1, caption="Only the caption."))
    finalize(layout, [1])
    out = read_final(layout)
    assert len(out) == 1
    assert out[0]["caption"] == "Only the caption."
    assert "regions" not in out[0]
    assert out[0]["pipeline_steps"] == ["step1_image_caption"]


def test_last_step_of_a_partial_run_is_used(tmp_path):
    layout = Layout(tmp_path)
    seed(layout, ["a"])
    layout.sink(2).append(rec("a", 2, expressions=[{"text": "step2"}]))
    layout.sink(3).append(rec("a", 3, expressions=[{"text": "step3"}]))
    finalize(layout, [0, 1, 2])
    assert read_final(layout)[0]["expressions"] == [{"text": "step2"}]


def test_rerun_replaces_the_final_file(tmp_path):
    layout = Layout(tmp_path)
    seed(layout, ["a"])
    layout.final.write_text("junk\n")
    layout.sink(3).append(rec("a", 3, expressions=[]))
    finalize(layout, [0, 1, 2, 3])
    assert [r["image_id"] for r in read_final(layout)] == ["a"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_nothing_done_writes_an_empty_file(tmp_path):
    layout = Layout(tmp_path)
    seed(layout, ["a"])
    report = finalize(layout, [0, 1, 2, 3])
    assert layout.final.read_text() == ""
    assert report.written == 0 and report.missing == ["a"]
