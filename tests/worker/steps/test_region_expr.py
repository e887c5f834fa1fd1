"""Step 0 through ``run_step`` with a test-double client (TAO's TestStep0RegionExpr, and more)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tests.support.doubles import FakeClient
from worker.errors import EmptyAnswer, InputError, ParseError
from worker.steps import run_step
from worker.steps.prompts import PROMPT_TEMPLATES
from worker.steps.records import SOURCE


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "000001.png"
    Image.new("RGB", (1000, 500), (90, 90, 90)).save(p)
    return p


@pytest.fixture
def seed(image):
    return {
        "image_id": "000001",
        "image_path": str(image),
        "width": 1000,
        "height": 500,
        "kitti_bboxes": [[100, 100, 300, 200, "Car"], [500, 250, 700, 400, "Van"], [800, 0, 900, 100, "Pedestrian"]],
        "source": SOURCE,
        "pipeline_steps": [],
    }


# In the model's 0-1000 space the KITTI boxes above are [100,200,300,400], [500,500,700,800], [800,0,900,200].
CAR = {"bbox_2d": [100, 200, 300, 400], "type": "sedan", "color": "white", "description": "white sedan in center lane"}
VAN = {"bbox_2d": [500, 500, 700, 800], "type": "van", "color": "red", "description": "red van behind the sedan"}
PED = {"bbox_2d": [800, 0, 900, 200], "type": "pedestrian", "color": "black", "description": "person in black"}


def run(seed, text):
    client = FakeClient(text)
    return run_step(0, seed, client, PROMPT_TEMPLATES), client


def test_tao_single_box(tmp_path):
    # TAO: 1000x1000 image, kitti [[100,200,300,400,"Car"]], the model returns a JSON array.
    p = tmp_path / "000001.jpg"
    Image.new("RGB", (1000, 1000)).save(p, format="JPEG")
    seed = {"image_id": "000001", "image_path": str(p), "width": 1000, "height": 1000,
            "kitti_bboxes": [[100, 200, 300, 400, "Car"]], "source": SOURCE, "pipeline_steps": []}
    answer = json.dumps([{"bbox_2d": [100, 200, 300, 400], "type": "sedan", "color": "white",
                          "description": "white sedan in center lane"}])
    out, client = run(seed, answer)
    regions = out.record["regions"]
    assert len(regions) == 1
    assert regions[0]["bbox"] == [100, 200, 300, 400]
    assert regions[0]["description"] == "white sedan in center lane"
    assert "step0_region_expr" in out.record["pipeline_steps"]
    assert len(client.requests) == 1


def test_regions_map_back_to_kitti_pixel_boxes(seed):
    out, _ = run(seed, json.dumps([VAN, CAR, PED]))  # order of the answer does not matter
    regions = out.record["regions"]
    assert [r["kitti_index"] for r in regions] == [0, 1, 2]  # KITTI order
    assert [r["bbox"] for r in regions] == [[100, 100, 300, 200], [500, 250, 700, 400], [800, 0, 900, 100]]
    assert [r["bbox_2d"] for r in regions] == [CAR["bbox_2d"], VAN["bbox_2d"], PED["bbox_2d"]]
    assert regions[0] == {**CAR, "bbox": [100.0, 100.0, 300.0, 200.0], "kitti_index": 0}
    assert out.record["meta"]["step0_region_expr"]["invented"] == 0
    assert out.record["meta"]["step0_region_expr"]["missed_kitti"] == []


def test_bbox_2d_kept_as_returned_when_slightly_off(seed):
    off = {**CAR, "bbox_2d": [105, 205, 300, 400]}
    out, _ = run(seed, json.dumps([off]))
    region = out.record["regions"][0]
    assert region["bbox_2d"] == [105, 205, 300, 400]
    assert region["bbox"] == [100, 100, 300, 200]  # the KITTI box, in pixels


def test_prompt_lists_boxes_in_0_1000_space(seed):
    out, client = run(seed, json.dumps([CAR]))
    req = client.requests[0]
    assert "[Car: [100, 200, 300, 400] , Van: [500, 500, 700, 800] , Pedestrian: [800, 0, 900, 200]  ]" in req.prompt
    assert req.prompt == PROMPT_TEMPLATES["region_expr"].format(
        bboxes="[Car: [100, 200, 300, 400] , Van: [500, 500, 700, 800] , Pedestrian: [800, 0, 900, 200]  ]")
    assert req.step == "region_expr"
    assert req.image.path == seed["image_path"]
    assert (req.image.width, req.image.height) == (1000, 500)
    assert [b["bbox_2d"] for b in req.hint["boxes"]] == [CAR["bbox_2d"], VAN["bbox_2d"], PED["bbox_2d"]]
    assert out.response is not None and out.response.text == json.dumps([CAR])


def test_invented_region_dropped_and_counted(seed):
    ghost = {"bbox_2d": [0, 900, 50, 1000], "type": "ghost", "color": "x", "description": "invented"}
    out, _ = run(seed, json.dumps([CAR, ghost, VAN, PED]))
    assert [r["description"] for r in out.record["regions"]] == [CAR["description"], VAN["description"],
                                                                  PED["description"]]
    assert out.record["meta"]["step0_region_expr"]["invented"] == 1


def test_skipped_kitti_boxes_reported(seed):
    out, _ = run(seed, json.dumps([VAN]))
    assert [r["kitti_index"] for r in out.record["regions"]] == [1]
    assert out.record["meta"]["step0_region_expr"]["missed_kitti"] == [0, 2]


def test_duplicate_regions_match_one_to_one(seed):
    out, _ = run(seed, json.dumps([CAR, {**CAR, "description": "again"}]))
    assert len(out.record["regions"]) == 1
    assert out.record["meta"]["step0_region_expr"]["invented"] == 1


def test_region_without_usable_box_counted(seed):
    out, _ = run(seed, json.dumps([CAR, {"type": "x", "description": "no box"}, {**VAN, "bbox_2d": [1, 2]}]))
    assert len(out.record["regions"]) == 1
    assert out.record["meta"]["step0_region_expr"]["invalid_boxes"] == 2


def test_missing_fields_filled(seed):
    out, _ = run(seed, json.dumps([{"bbox_2d": [100, 200, 300, 400], "description": "  a car  "}]))
    region = out.record["regions"][0]
    assert region["type"] == "Car"  # falls back to the KITTI type
    assert region["color"] == "unknown"
    assert region["description"] == "a car"


@pytest.mark.parametrize(
    "fmt",
    [
        lambda objs: "```json\n" + json.dumps(objs) + "\n```",
        lambda objs: "\n".join(json.dumps(o) for o in objs),
        lambda objs: json.dumps(objs)[:-3],  # truncated in the last object
        lambda objs: "Here you go:\n" + json.dumps(objs) + "\nDone.",
        lambda objs: json.dumps({"regions": objs}),
    ],
    ids=["fenced", "ndjson", "truncated", "prose", "wrapped"],
)
def test_answer_shapes(seed, fmt):
    out, _ = run(seed, fmt([CAR, VAN, PED]))
    assert len(out.record["regions"]) >= 2
    assert out.record["regions"][0]["bbox"] == [100, 100, 300, 200]


def test_no_matching_region_is_a_parse_error(seed):
    far = {"bbox_2d": [0, 900, 50, 1000], "type": "x", "color": "y", "description": "nowhere"}
    with pytest.raises(ParseError) as exc:
        run(seed, json.dumps([far]))
    assert exc.value.raw == json.dumps([far])


@pytest.mark.parametrize("text", ["I cannot help with that.", "[]", "```json\n```"])
def test_unparseable_answer_is_a_parse_error(seed, text):
    with pytest.raises(ParseError):
        run(seed, text)


def test_blank_answer_is_empty_answer(seed):
    with pytest.raises(EmptyAnswer):
        run(seed, "   \n")


def test_no_boxes_no_call_and_empty_regions(seed):
    seed = {**seed, "kitti_bboxes": []}
    out, client = run(seed, "should not be asked")
    assert client.requests == []
    assert out.record["regions"] == []
    assert out.response is None
    assert out.record["pipeline_steps"] == ["step0_region_expr"]
    assert out.legacy == "[]"


def test_no_boxes_needs_no_readable_image(seed, tmp_path):
    out, client = run({**seed, "kitti_bboxes": [], "image_path": str(tmp_path / "missing.png")}, "x")
    assert client.requests == [] and out.record["regions"] == []


def test_unreadable_image_is_an_input_error(seed, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(InputError) as exc:
        run({**seed, "image_path": str(bad)}, json.dumps([CAR]))
    assert str(bad) in str(exc.value)


def test_record_keeps_seed_fields_and_schema_order(seed):
    out, _ = run(seed, json.dumps([CAR]))
    rec = out.record
    assert rec["image_id"] == "000001"
    assert rec["kitti_bboxes"] == seed["kitti_bboxes"]
    assert rec["source"] == SOURCE
    keys = list(rec)
    assert keys[:6] == ["image_id", "image_path", "width", "height", "kitti_bboxes", "regions"]
    assert seed["pipeline_steps"] == []  # the input record is not mutated
    assert "regions" not in seed


def test_legacy_bytes_match_tao(seed):
    out, _ = run(seed, json.dumps([CAR, VAN]))
    expected = json.dumps(
        [{"bbox_2d": CAR["bbox_2d"], "type": "sedan", "color": "white", "description": CAR["description"]},
         {"bbox_2d": VAN["bbox_2d"], "type": "van", "color": "red", "description": VAN["description"]}],
        ensure_ascii=False, indent=2,
    )
    assert out.legacy == expected
    assert out.legacy.startswith('[\n  {\n    "bbox_2d": [\n      100,\n      200,')
    assert not out.legacy.endswith("\n")


def test_legacy_non_ascii_kept(seed):
    out, _ = run(seed, json.dumps([{**CAR, "description": "weißer Wagen"}]))
    assert "weißer Wagen" in out.legacy


# --------------------------------------------------------------------------- answer size (issue 13)


def rambling(n_chars: int) -> str:
    """Prose that never repeats itself (repetition loops are collapsed elsewhere)."""
    out, i, size = [], 0, 0
    while size < n_chars:
        out.append(f"Also, item {i} relates to {i * 7919 % 10007} in way {i * 31 % 97}.\n")
        size += len(out[-1])
        i += 1
    return "".join(out)


def test_answer_past_its_size_is_cut_and_counted(seed):
    answer = json.dumps([CAR, VAN, PED]) + "\n" + rambling(3_000_000)
    out, _ = run(seed, answer)
    assert [r["kitti_index"] for r in out.record["regions"]] == [0, 1, 2]
    q = out.record["meta"]["step0_region_expr"]["quality"]
    assert q["answers_cut"] == 1 and q["repairs"]["oversized_answer_cut"] == 1


def test_answer_limit_grows_with_the_boxes(seed):
    from worker.steps.parsing import answer_limit, cap_answer

    assert answer_limit(3) < answer_limit(30) == answer_limit(0) + 30 * (answer_limit(1) - answer_limit(0))
    text = "line one\n" + "x" * 20 + "\nline three"
    assert cap_answer(text, 100) == (text, 0)
    assert cap_answer(text, 35) == ("line one\n" + "x" * 20, len("\nline three"))
    assert cap_answer("<think>" + "y" * 500 + "</think>[1]", 100) == ("[1]", 0)  # reasoning goes first


def test_one_huge_description_is_not_stored(seed):
    huge = dict(CAR, description=rambling(200_000))
    with pytest.raises(ParseError):  # the only object is cut: nothing to keep, and a retry is asked for
        run({**seed, "kitti_bboxes": seed["kitti_bboxes"][:1]}, json.dumps([huge]))
    out, _ = run(seed, json.dumps([CAR, VAN, huge]))
    assert [r["kitti_index"] for r in out.record["regions"]] == [0, 1]
    assert len(json.dumps(out.record)) < 20_000
