"""Box conventions and conversions at the edge (worker/coords.py)."""

from __future__ import annotations

import math

import pytest

from worker.coords import (
    XYXY_1000,
    XYXY_NORM1,
    XYXY_PIXELS,
    XYXY_SMART_RESIZE,
    YXYX_1000,
    Convention,
    Frame,
    convention_for,
    from_canonical,
    prompt_box_in,
    raw_values,
    refine,
    rescue,
    resolve,
    smart_resize,
    to_canonical,
)

KITTI = Frame(1242, 375)
SQUARE = Frame(1000, 1000)


# --------------------------------------------------------------------------- table


@pytest.mark.parametrize(("model", "native", "prompt"), [
    ("gemini-2.5-flash", YXYX_1000, XYXY_1000),
    ("gemini-3.1-flash-lite-preview", YXYX_1000, XYXY_1000),
    ("Qwen/Qwen2.5-VL-72B-Instruct", XYXY_SMART_RESIZE, XYXY_SMART_RESIZE),
    ("qwen2_5_vl", XYXY_SMART_RESIZE, XYXY_SMART_RESIZE),
    ("qwen3-vl-235b-a22b-instruct", XYXY_1000, XYXY_1000),
    ("Qwen3-VL-8B", XYXY_1000, XYXY_1000),
    ("qwen2-vl-7b", XYXY_1000, XYXY_1000),
    ("gpt-4o", XYXY_1000, XYXY_1000),
    ("", XYXY_1000, XYXY_1000),
])
def test_model_table(model, native, prompt):
    conv = convention_for(model)
    assert (conv.native, conv.prompt) == (native, prompt)


def test_box_format_overrides_the_table():
    assert convention_for("gemini-2.5-flash", "xyxy_pixels") == Convention(XYXY_PIXELS, XYXY_PIXELS, "vlm.box_format")
    assert convention_for("m", "yxyx_1000").prompt == XYXY_1000  # prompts stay x-first, as they say
    assert convention_for("m", "xyxy_norm1").prompt == XYXY_NORM1
    with pytest.raises(ValueError, match="box format"):
        convention_for("m", "xywh")


def test_smart_resize_rounds_to_28_and_keeps_pixel_limits():
    assert smart_resize(375, 1242) == (364, 1232)
    assert smart_resize(1080, 1920) == (1092, 1932)
    h, w = smart_resize(8000, 12000)  # above max_pixels: scaled down, still multiples of 28
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 16384 * 28 * 28
    assert smart_resize(10, 10) == (56, 56)  # below min_pixels: scaled up


# --------------------------------------------------------------------------- raw values


@pytest.mark.parametrize(("value", "want", "repair"), [
    ([1, 2, 3, 4], [1, 2, 3, 4], ""),
    ((1, 2, 3, 4), [1, 2, 3, 4], ""),
    (["1", "2", "3", "4.5"], [1, 2, 3, 4.5], "box_as_string"),
    ("[1, 2, 3, 4]", [1, 2, 3, 4], "box_as_string"),
    ("1, 2, 3, 4", [1, 2, 3, 4], "box_as_string"),
    ([[1, 2, 3, 4]], [1, 2, 3, 4], "nested_box"),
    ([[1, 2], [3, 4]], [1, 2, 3, 4], "corner_pairs"),
    ({"x1": 1, "y1": 2, "x2": 3, "y2": 4}, [1, 2, 3, 4], "box_as_dict"),
    ({"xmin": 1, "ymin": 2, "xmax": 3, "ymax": 4}, [1, 2, 3, 4], "box_as_dict"),
])
def test_raw_values_accepts(value, want, repair):
    assert raw_values(value) == ([float(v) for v in want], repair)


@pytest.mark.parametrize("value", [[1, 2, 3], [1, 2, 3, 4, 0.9], [None, 1, 2, 3], [True, 1, 2, 3], "no box", 5,
                                   {"x": 1}, [[1, 2, 3], [4, 5, 6]], []])
def test_raw_values_rejects_wrong_shapes(value):
    assert raw_values(value) == (None, "")


# --------------------------------------------------------------------------- conversion


def test_to_canonical_per_format():
    assert to_canonical([100, 200, 300, 400], XYXY_1000, KITTI) == ([100, 200, 300, 400], [])
    assert to_canonical([200, 100, 400, 300], YXYX_1000, KITTI) == ([100, 200, 300, 400], [])
    assert to_canonical([621, 187.5, 1242, 375], XYXY_PIXELS, KITTI) == ([500, 500, 1000, 1000], [])
    assert to_canonical([616, 182, 1232, 364], XYXY_SMART_RESIZE, KITTI) == ([500, 500, 1000, 1000], [])
    assert to_canonical([0.1, 0.2, 0.3, 0.4], XYXY_NORM1, KITTI) == ([100, 200, 300, 400], [])


def test_all_values_at_most_one_are_rescaled_in_any_format():
    assert to_canonical([0.1, 0.2, 0.3, 0.4], XYXY_1000, KITTI) == ([100, 200, 300, 400], ["norm1_rescaled"])
    assert to_canonical([0.2, 0.1, 0.4, 0.3], YXYX_1000, KITTI)[0] == [100, 200, 300, 400]


def test_clamped_reordered_and_rejected():
    assert to_canonical([300, 400, 100, 200], XYXY_1000, KITTI) == ([100, 200, 300, 400], ["reordered"])
    assert to_canonical([-5, 990, 100, 1012], XYXY_1000, KITTI) == ([0, 990, 100, 1000], ["clamped"])
    assert to_canonical([0, 0, 100, 1500], XYXY_1000, KITTI)[0] is None  # far out of range: not this format
    assert to_canonical([math.nan, 0, 100, 100], XYXY_1000, KITTI)[0] is None
    assert to_canonical([math.inf, 0, 100, 100], XYXY_1000, KITTI)[0] is None
    assert to_canonical([100, 100, 100, 200], XYXY_1000, KITTI)[0] is None  # no area
    assert to_canonical([1, 2, 3], XYXY_1000, KITTI)[0] is None


def test_prompt_boxes_in_each_format():
    box = [387.6, 181.5, 423.8, 203.1]
    assert prompt_box_in(box, XYXY_1000, KITTI) == [312, 484, 341, 541]  # TAO's int() truncation
    assert prompt_box_in(box, XYXY_PIXELS, KITTI) == [388, 182, 424, 203]
    assert prompt_box_in(box, XYXY_SMART_RESIZE, KITTI) == [384, 176, 420, 197]
    assert prompt_box_in(box, XYXY_NORM1, KITTI) == [0.312, 0.484, 0.341, 0.542]
    assert from_canonical([100, 200, 300, 400], YXYX_1000, KITTI) == [200, 100, 400, 300]


# --------------------------------------------------------------------------- per answer


TARGETS = [[100, 200, 300, 400], [500, 500, 700, 800], [800, 0, 900, 200]]


def test_resolve_keeps_the_prompt_format_when_it_explains_the_answer():
    r = resolve([[100, 200, 300, 400], [500, 500, 700, 800]], TARGETS, convention_for("gemini-2.5-flash"), SQUARE)
    assert r.fmt == XYXY_1000 and r.matches == 2 and not r.ties


def test_resolve_detects_gemini_y_first():
    raw = [[200, 100, 400, 300], [500, 500, 800, 700], [0, 800, 200, 900]]
    r = resolve(raw, TARGETS, convention_for("gemini-2.5-flash"), SQUARE)
    assert r.fmt == YXYX_1000 and r.boxes == TARGETS


def test_resolve_detects_pixels():
    frame = Frame(1920, 1080)
    targets = [[62, 518, 218, 703], [244, 546, 317, 648]]
    raw = [[120, 560, 420, 760], [470, 590, 610, 700]]
    r = resolve(raw, targets, convention_for("gpt-4o"), frame)
    assert r.fmt == XYXY_PIXELS and r.matches == 2


def test_resolve_reports_ties_it_cannot_break():
    # two targets that are each other's transpose: x-first and y-first explain the answer alike
    targets = [[100, 300, 200, 400], [300, 100, 400, 200]]
    r = resolve([[300, 100, 400, 200], [100, 300, 200, 400]], targets, convention_for("gpt-4o"), SQUARE)
    assert r.fmt == XYXY_1000
    assert [t.fmt for t in r.ties] == [YXYX_1000]
    assert r.ambiguous(r.ties[0]) == {0, 1}


def test_resolve_does_not_switch_for_a_minority():
    # one box of three explained by a swap is not enough to re-read the answer
    raw = [[1, 1, 50, 50], [900, 900, 990, 990], [200, 100, 400, 300]]
    r = resolve(raw, TARGETS, convention_for("gpt-4o"), SQUARE)
    assert r.fmt == XYXY_1000 and r.matches == 0


def test_rescue_and_refine_take_only_near_exact_unique_readings():
    conv = convention_for("gemini-2.5-flash")
    assert rescue([200, 100, 400, 300], TARGETS, conv, SQUARE, skip=XYXY_1000)[1:] == ([100, 200, 300, 400], 0)
    assert rescue([10, 10, 20, 20], TARGETS, conv, SQUARE, skip=XYXY_1000) is None
    target = [494, 475, 585, 609]
    assert refine([475, 494, 609, 585], [475, 494, 609, 585], target, conv, KITTI, skip=XYXY_1000) == (
        YXYX_1000, target)
    assert refine(target, target, target, conv, KITTI, skip=XYXY_1000) is None  # already exact
