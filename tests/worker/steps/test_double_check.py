"""Step 3 through ``run_step`` (TAO's TestStep3DoubleCheck, and more)."""

from __future__ import annotations

import pytest
from PIL import Image

from tests.support.doubles import FakeClient
from worker.errors import ParseError
from worker.steps import input_record, run_step
from worker.steps.prompts import PROMPT_TEMPLATES
from worker.steps.records import SOURCE


def inst(k: int, box2d: list[int], pixels: list[float]) -> dict:
    return {"bbox_id": f"img/box_{k}", "bbox": pixels, "bbox_2d": box2d, "bbox_score": 0.9,
            "region_index": k, "matched": True}


def expr(k: int, text: str, instances: list[dict]) -> dict:
    return {"expression_id": f"img/expr_{k}", "text": text, "instances": instances, "verified": False}


@pytest.fixture
def base(tmp_path):
    p = tmp_path / "img.png"
    Image.new("RGB", (1000, 500)).save(p)
    return {"image_id": "img", "image_path": str(p), "width": 1000, "height": 500, "kitti_bboxes": [],
            "source": SOURCE, "pipeline_steps": ["step0_region_expr", "step1_image_caption", "step2_grounding_expr"]}


def step2(base, expressions):
    return input_record(3, base, {2: {**base, "expressions": expressions}})


def run(record, text):
    client = FakeClient(text)
    return run_step(3, record, client, PROMPT_TEMPLATES), client


def test_tao_drops_rejected_and_marks_verified(base):
    rec = step2(base, [expr(0, "kept", [inst(0, [1, 2, 3, 4], [1.0, 1.0, 3.0, 2.0])]),
                       expr(1, "rejected", [inst(1, [5, 6, 7, 8], [5.0, 3.0, 7.0, 4.0])])])
    out, client = run(rec, "kept: [[1, 2, 3, 4]]\n")
    exprs = out.record["expressions"]
    assert len(exprs) == 1
    assert exprs[0]["text"] == "kept"
    assert exprs[0]["verified"] is True
    assert exprs[0]["expression_id"] == "img/expr_0"
    assert exprs[0]["instances"][0]["bbox_id"] == "img/box_0"
    assert exprs[0]["instances"][0] == inst(0, [1, 2, 3, 4], [1.0, 1.0, 3.0, 2.0])  # unchanged
    assert "step3_double_check" in out.record["pipeline_steps"]
    assert out.record["meta"]["step3_double_check"]["dropped_expressions"] == 1
    assert len(client.requests) == 1


def test_tao_updated_box_keeps_id_and_gets_new_coords(base):
    rec = step2(base, [expr(0, "the car", [inst(0, [10, 20, 30, 40], [10.0, 10.0, 30.0, 20.0])])])
    out, _ = run(rec, "the car: [[12, 22, 32, 42]]\n")
    i = out.record["expressions"][0]["instances"][0]
    assert i["bbox_id"] == "img/box_0"
    assert i["bbox_2d"] == [12, 22, 32, 42]
    assert i["bbox"] == [12.0, 11.0, 32.0, 21.0]  # new coords, in pixels of the 1000x500 image
    assert i["updated"] is True
    assert out.record["meta"]["step3_double_check"]["updated"] == 1


def test_updated_box_replaces_the_box_it_overlaps(base):
    a = inst(0, [0, 0, 100, 100], [0.0, 0.0, 100.0, 50.0])
    b = inst(1, [500, 500, 600, 600], [500.0, 250.0, 600.0, 300.0])
    rec = step2(base, [expr(0, "cars", [a, b])])
    out, _ = run(rec, "cars: [[505, 505, 605, 605], [0, 0, 100, 100]]")  # b moved, listed first
    insts = out.record["expressions"][0]["instances"]
    assert [i["bbox_id"] for i in insts] == ["img/box_1", "img/box_0"]
    assert insts[0]["bbox_2d"] == [505, 505, 605, 605]
    assert insts[1] == a


def test_removed_box_dropped_from_group(base):
    a = inst(0, [0, 0, 100, 100], [0.0, 0.0, 100.0, 50.0])
    b = inst(1, [500, 500, 600, 600], [500.0, 250.0, 600.0, 300.0])
    rec = step2(base, [expr(0, "cars", [a, b])])
    out, _ = run(rec, "cars: [[500, 500, 600, 600]]")
    assert out.record["expressions"][0]["instances"] == [b]
    assert out.record["meta"]["step3_double_check"]["removed"] == 1


def test_invented_box_dropped(base):
    a = inst(0, [0, 0, 100, 100], [0.0, 0.0, 100.0, 50.0])
    rec = step2(base, [expr(0, "cars", [a])])
    out, _ = run(rec, "cars: [[0, 0, 100, 100], [800, 800, 900, 900]]")
    assert out.record["expressions"][0]["instances"] == [a]
    assert out.record["meta"]["step3_double_check"]["added_dropped"] == 1


def test_invented_phrase_ignored(base):
    a = inst(0, [0, 0, 100, 100], [0.0, 0.0, 100.0, 50.0])
    rec = step2(base, [expr(0, "cars", [a])])
    out, _ = run(rec, "cars: [[0, 0, 100, 100]]\nnew group: [[0, 0, 100, 100]]")
    assert [e["text"] for e in out.record["expressions"]] == ["cars"]


def test_group_with_all_boxes_removed_is_dropped(base):
    rec = step2(base, [expr(0, "cars", [inst(0, [0, 0, 100, 100], [0.0, 0.0, 100.0, 50.0])]),
                       expr(1, "vans", [inst(1, [500, 500, 600, 600], [500.0, 250.0, 600.0, 300.0])])])
    out, _ = run(rec, "cars: []\nvans: [[500, 500, 600, 600]]")
    assert [e["expression_id"] for e in out.record["expressions"]] == ["img/expr_1"]


def test_survivors_keep_order_ids_and_are_verified(base):
    exprs = [expr(k, f"group {k}", [inst(k, [k * 100, 0, k * 100 + 50, 50], [k * 100.0, 0.0, k * 100 + 50.0, 25.0])])
             for k in range(3)]
    out, _ = run(step2(base, exprs), "group 2: [[200, 0, 250, 50]]\ngroup 0: [[0, 0, 50, 50]]")
    got = out.record["expressions"]
    assert [e["expression_id"] for e in got] == ["img/expr_0", "img/expr_2"]
    assert all(e["verified"] is True for e in got)


def test_phrase_matching_ignores_surrounding_space_and_decoration(base):
    rec = step2(base, [expr(0, "the car", [inst(0, [0, 0, 100, 100], [0.0, 0.0, 100.0, 50.0])])])
    out, _ = run(rec, "- the car : [[0, 0, 100, 100]]")
    assert len(out.record["expressions"]) == 1


def test_prompt_lists_expressions_in_tao_format(base):
    a = inst(0, [1, 2, 3, 4], [1.0, 1.0, 3.0, 2.0])
    b = inst(1, [5, 6, 7, 8], [5.0, 3.0, 7.0, 4.0])
    rec = step2(base, [expr(0, "red car", [a, b]), expr(1, "empty", []), expr(2, "  ", [a])])
    _, client = run(rec, "red car: [[1, 2, 3, 4]]")
    req = client.requests[0]
    assert req.prompt == PROMPT_TEMPLATES["double_check"].format(
        expr="red car: [[1, 2, 3, 4], [5, 6, 7, 8]]\nobject: [[1, 2, 3, 4]]")
    assert req.step == "double_check"


def test_empty_expressions_no_call(base):
    out, client = run(step2(base, []), "should not be asked")
    assert client.requests == []
    assert out.record["expressions"] == []
    assert out.response is None
    assert out.legacy == ""
    assert out.record["pipeline_steps"][-1] == "step3_double_check"


def test_expressions_without_boxes_no_call(base):
    out, client = run(step2(base, [expr(0, "nothing", [])]), "x")
    assert client.requests == []
    assert out.record["expressions"] == []


@pytest.mark.parametrize("text", ["Everything looks right.", "bad: not-a-list"])
def test_nothing_parseable_is_a_parse_error(base, text):
    rec = step2(base, [expr(0, "cars", [inst(0, [0, 0, 100, 100], [0.0, 0.0, 100.0, 50.0])])])
    with pytest.raises(ParseError) as exc:
        run(rec, text)
    assert exc.value.raw == text


def test_input_record_is_not_mutated(base):
    exprs = [expr(0, "the car", [inst(0, [10, 20, 30, 40], [10.0, 10.0, 30.0, 20.0])])]
    rec = step2(base, exprs)
    run(rec, "the car: [[12, 22, 32, 42]]")
    assert rec["expressions"][0]["instances"][0]["bbox_2d"] == [10, 20, 30, 40]
    assert rec["expressions"][0]["verified"] is False


def test_legacy_bytes_match_tao(base):
    a = inst(0, [1, 2, 3, 4], [1.0, 1.0, 3.0, 2.0])
    b = inst(1, [5, 6, 7, 8], [5.0, 3.0, 7.0, 4.0])
    c = inst(2, [100, 100, 200, 200], [100.0, 50.0, 200.0, 100.0])
    rec = step2(base, [expr(0, "red cars", [a, b]), expr(1, "a van", [c])])
    out, _ = run(rec, "red cars: [[1, 2, 3, 4], [5, 6, 7, 8]]\na van: [[100, 100, 200, 200]]\n")
    assert out.legacy == "red cars: [[1, 2, 3, 4], [5, 6, 7, 8]]\na van: [[100, 100, 200, 200]]\n"


def test_legacy_empty_when_everything_rejected(base):
    rec = step2(base, [expr(0, "cars", [inst(0, [0, 0, 100, 100], [0.0, 0.0, 100.0, 50.0])])])
    out, _ = run(rec, "other: [[0, 0, 100, 100]]")
    assert out.record["expressions"] == []
    assert out.legacy == ""


def test_answer_past_its_size_is_cut_and_counted(base):
    rec = step2(base, [expr(0, "kept", [inst(0, [1, 2, 3, 4], [1.0, 1.0, 3.0, 2.0])])])
    tail = "".join(f"note {i} of {i * 7919 % 10007}\n" for i in range(200_000))
    out, _ = run(rec, "kept: [[1, 2, 3, 4]]\n" + tail)
    assert [e["text"] for e in out.record["expressions"]] == ["kept"]
    q = out.record["meta"]["step3_double_check"]["quality"]
    assert q["answers_cut"] == 1 and q["repairs"]["oversized_answer_cut"] == 1
