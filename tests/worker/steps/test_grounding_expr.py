"""Step 2 through ``run_step`` (TAO's TestStep2GroundingExpr, and more)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tests.support.doubles import FakeClient
from worker.errors import ParseError
from worker.steps import input_record, run_step
from worker.steps.prompts import PROMPT_TEMPLATES
from worker.steps.records import SOURCE, deterministic

SEDAN = "white sedan in the left lane"


@pytest.fixture
def seed(tmp_path):
    p = tmp_path / "000001.png"
    Image.new("RGB", (1000, 500)).save(p)
    return {"image_id": "000001", "image_path": str(p), "width": 1000, "height": 500,
            "kitti_bboxes": [[100, 100, 300, 200, "Car"], [500, 250, 700, 400, "Van"]],
            "source": SOURCE, "pipeline_steps": []}


@pytest.fixture
def step0(seed):
    regions = [
        {"bbox": [100.0, 100.0, 300.0, 200.0], "bbox_2d": [100, 200, 300, 400], "type": "sedan",
         "color": "white", "description": SEDAN, "kitti_index": 0},
        {"bbox": [500.0, 250.0, 700.0, 400.0], "bbox_2d": [500, 500, 700, 800], "type": "van",
         "color": "red", "description": "", "kitti_index": 1},
    ]
    return {**seed, "regions": regions, "pipeline_steps": ["step0_region_expr"]}


@pytest.fixture
def step1(seed):
    return {**seed, "caption": "A busy street.", "pipeline_steps": ["step1_image_caption"]}


def run(record, text):
    client = FakeClient(text)
    return run_step(2, record, client, PROMPT_TEMPLATES), client


ANSWER = f"{SEDAN}: [[100, 200, 300, 400]]\nvehicles on the road: [[100, 200, 300, 400], [500, 500, 700, 800]]\n"


def test_with_regions_and_caption(seed, step0, step1):
    rec = input_record(2, seed, {0: step0, 1: step1})
    out, client = run(rec, ANSWER)
    r = out.record
    assert r["caption"] == "A busy street."
    assert len(r["regions"]) == 2
    exprs = r["expressions"]
    assert len(exprs) == 2
    assert exprs[0]["text"] == SEDAN
    assert exprs[0]["instances"][0]["bbox_2d"] == [100, 200, 300, 400]
    assert exprs[0]["instances"][0]["bbox"] == [100, 100, 300, 200]  # pixels of the region's KITTI box
    assert all("expression_id" in e and all("bbox_id" in i for i in e["instances"]) for e in exprs)
    assert r["pipeline_steps"] == ["step0_region_expr", "step1_image_caption", "step2_grounding_expr"]
    assert len(client.requests) == 1


def test_prompt_with_caption_line(seed, step0, step1):
    rec = input_record(2, seed, {0: step0, 1: step1})
    _, client = run(rec, ANSWER)
    req = client.requests[0]
    chunks = [f"{SEDAN}:[100, 200, 300, 400]", "red van:[500, 500, 700, 800]"]
    assert f"{chunks!r}\ncaption: A busy street.\n" in req.prompt
    assert req.prompt == PROMPT_TEMPLATES["grounding_expr"].format(bboxes=chunks,
                                                                     caption_section="caption: A busy street.")
    assert req.step == "grounding_expr"
    assert req.hint["caption"] == "A busy street."
    assert [h["bbox_2d"] for h in req.hint["regions"]] == [[100, 200, 300, 400], [500, 500, 700, 800]]


def test_without_step1(seed, step0):
    rec = input_record(2, seed, {0: step0})
    out, client = run(rec, f"{SEDAN}: [[100, 200, 300, 400]]\n")
    prompt = client.requests[0].prompt
    assert "caption:" not in prompt
    chunks = [f"{SEDAN}:[100, 200, 300, 400]", "red van:[500, 500, 700, 800]"]
    assert f"{chunks!r}\n\nYour task" in prompt
    assert len(out.record["expressions"]) == 1
    assert "caption" not in out.record
    assert out.record["pipeline_steps"] == ["step0_region_expr", "step2_grounding_expr"]


def test_chunk_falls_back_to_bare_box(seed, step0):
    step0["regions"][1]["color"] = ""
    rec = input_record(2, seed, {0: step0})
    _, client = run(rec, ANSWER)
    assert f"{[f'{SEDAN}:[100, 200, 300, 400]', '[500, 500, 700, 800]']!r}" in client.requests[0].prompt


def test_deterministic_ids(seed, step0):
    rec = input_record(2, seed, {0: step0})
    out1, _ = run(rec, ANSWER)
    out2, _ = run(rec, ANSWER)
    exprs = out1.record["expressions"]
    assert [e["expression_id"] for e in exprs] == ["000001/expr_0", "000001/expr_1"]
    assert [i["bbox_id"] for e in exprs for i in e["instances"]] == ["000001/box_0", "000001/box_1", "000001/box_2"]
    assert deterministic(out1.record) == deterministic(out2.record)


def test_instances_matched_to_regions(seed, step0):
    rec = input_record(2, seed, {0: step0})
    out, _ = run(rec, "vehicles: [[102, 198, 301, 402], [500, 500, 700, 800]]")
    insts = out.record["expressions"][0]["instances"]
    assert [i["region_index"] for i in insts] == [0, 1]
    assert all(i["matched"] is True for i in insts)
    assert insts[0]["bbox"] == [100, 100, 300, 200]
    assert insts[0]["bbox_2d"] == [102, 198, 301, 402]
    assert insts[1]["bbox"] == [500, 250, 700, 400]
    assert all(i["bbox_score"] == 0.9 for i in insts)


def test_unmatched_box_flagged_with_pixel_bbox(seed, step0):
    rec = input_record(2, seed, {0: step0})
    out, _ = run(rec, "something else: [[0, 0, 50, 50]]")
    inst = out.record["expressions"][0]["instances"][0]
    assert inst["matched"] is False
    assert inst["region_index"] is None
    assert inst["bbox_2d"] == [0, 0, 50, 50]
    assert inst["bbox"] == [0.0, 0.0, 50.0, 25.0]  # converted to pixels of the 1000x500 image
    assert out.record["meta"]["step2_grounding_expr"]["unmatched_boxes"] == 1


def test_expressions_unverified_until_step3(seed, step0):
    out, _ = run(input_record(2, seed, {0: step0}), ANSWER)
    assert all(e["verified"] is False for e in out.record["expressions"])


def test_tao_malformed_lines_and_empty_box_lists_dropped(seed, step0):
    text = f"{SEDAN}: [[100, 200, 300, 400]]\nno colon here\nbad: not-a-list\nnothing: []\n"
    out, _ = run(input_record(2, seed, {0: step0}), text)
    exprs = out.record["expressions"]
    assert [e["text"] for e in exprs] == [SEDAN]
    assert exprs[0]["expression_id"] == "000001/expr_0"


def test_invalid_boxes_dropped_and_counted(seed, step0):
    text = "a: [[100, 200, 300, 400], [1, 2, 3], [5, 5, 5, 5]]\nb: [[1, 2]]\n"
    out, _ = run(input_record(2, seed, {0: step0}), text)
    exprs = out.record["expressions"]
    assert [e["text"] for e in exprs] == ["a"]
    assert len(exprs[0]["instances"]) == 1
    assert out.record["meta"]["step2_grounding_expr"]["invalid_boxes"] == 3


def test_flat_box_and_bullets(seed, step0):
    out, _ = run(input_record(2, seed, {0: step0}), f"- {SEDAN}: [100, 200, 300, 400]")
    exprs = out.record["expressions"]
    assert exprs[0]["text"] == SEDAN
    assert exprs[0]["instances"][0]["region_index"] == 0


def test_no_regions_no_call_and_empty_expressions(seed):
    rec = input_record(2, seed, {0: {**seed, "regions": [], "pipeline_steps": ["step0_region_expr"]}})
    out, client = run(rec, "should not be asked")
    assert client.requests == []
    assert out.record["expressions"] == []
    assert out.response is None
    assert out.legacy == ""
    assert out.record["pipeline_steps"][-1] == "step2_grounding_expr"


@pytest.mark.parametrize("text", ["I see two cars.", "nothing: []", "bad: not-a-list", "a: [[1, 2, 3]]"])
def test_nothing_parseable_is_a_parse_error(seed, step0, text):
    with pytest.raises(ParseError) as exc:
        run(input_record(2, seed, {0: step0}), text)
    assert exc.value.raw == text


def test_legacy_bytes_match_tao(seed, step0):
    out, _ = run(input_record(2, seed, {0: step0}), ANSWER)
    assert out.legacy == (f"{SEDAN}: [[100, 200, 300, 400]]\n"
                          "vehicles on the road: [[100, 200, 300, 400], [500, 500, 700, 800]]\n")
    # each line is TAO's f"{text}: {json.dumps(bboxes)}"
    first = out.record["expressions"][0]
    assert out.legacy.splitlines()[0] == f"{first['text']}: {json.dumps([first['instances'][0]['bbox_2d']])}"


def test_rambling_past_the_answer_size_is_cut_and_counted(seed, step0):
    tail = "".join(f"and group {i} of {i * 7919 % 10007}: [[{i}, 0, 10, 10]\n" for i in range(40_000))
    out, _ = run(step0, ANSWER + tail)
    q = out.record["meta"]["step2_grounding_expr"]["quality"]
    assert q["answers_cut"] == 1 and q["repairs"]["oversized_answer_cut"] == 1
    assert [e["text"] for e in out.record["expressions"]][:2] == [SEDAN, "vehicles on the road"]
    assert len(json.dumps(out.record)) < 200_000
