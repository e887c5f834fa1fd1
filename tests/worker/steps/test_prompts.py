"""The four prompts (TAO's TestPromptTemplates / TestFormatBboxes) and the prompts_file override."""

from __future__ import annotations

import pytest

from worker.errors import ConfigError
from worker.steps.prompts import PLACEHOLDERS, PROMPT_TEMPLATES, check_template, load_prompts, placeholders_of
from worker.steps.region_expr import format_bboxes

KEYS = {"region_expr", "image_caption", "grounding_expr", "double_check"}


def test_all_keys_present():
    assert set(PROMPT_TEMPLATES) == KEYS
    assert set(PLACEHOLDERS) == KEYS


@pytest.mark.parametrize("name", sorted(KEYS))
def test_shipped_templates_pass_their_own_check(name):
    check_template(name, PROMPT_TEMPLATES[name])
    assert placeholders_of(PROMPT_TEMPLATES[name]) == set(PLACEHOLDERS[name])


def test_region_expr_renders():
    out = PROMPT_TEMPLATES["region_expr"].format(bboxes="[Car: [100,200,300,400]]")
    assert "Car: [100,200,300,400]" in out
    assert "bbox_2d" in out
    assert "Output ONLY a JSON array" in out


def test_image_caption_has_no_placeholders():
    assert placeholders_of(PROMPT_TEMPLATES["image_caption"]) == set()
    assert "location-specific" in PROMPT_TEMPLATES["image_caption"]


def test_grounding_expr_renders_with_caption():
    out = PROMPT_TEMPLATES["grounding_expr"].format(bboxes=["car:[1, 2, 3, 4]"], caption_section="caption: A scene.")
    assert "['car:[1, 2, 3, 4]']" in out
    assert "\ncaption: A scene.\n" in out
    assert "<descriptive phrase>: [[x1, y1, x2, y2]" in out


def test_grounding_expr_renders_without_caption():
    out = PROMPT_TEMPLATES["grounding_expr"].format(bboxes=["car:[1, 2, 3, 4]"], caption_section="")
    assert "['car:[1, 2, 3, 4]']\n\n" in out
    assert "caption:" not in out


def test_double_check_renders():
    out = PROMPT_TEMPLATES["double_check"].format(expr="car: [[1, 2, 3, 4]]")
    assert "car: [[1, 2, 3, 4]]" in out
    assert "Do NOT add new bounding boxes" in out


# --------------------------------------------------------------------------- format_bboxes (TAO bytes)


def test_format_bboxes_byte_exact_vs_tao():
    boxes = [[100, 200, 300, 400, "Car"], [1919, 1079, 1920, 1080, "Van"]]
    assert format_bboxes(boxes, 1920, 1080) == "[Car: [52, 185, 156, 370] , Van: [999, 999, 1000, 1000]  ]"


def test_format_bboxes_empty():
    assert format_bboxes([], 1000, 1000) == "[]"


def test_format_bboxes_normalizes_to_0_1000():
    out = format_bboxes([[100, 200, 300, 400, "Car"]], 1000, 1000)
    assert out == "[Car: [100, 200, 300, 400]  ]"


def test_format_bboxes_scaling_width_and_height_differ():
    # TAO: format_bboxes([[500,200,1000,400,"Car"]], h=1000, w=2000) contains "[250, 200, 500, 400]"
    assert "[250, 200, 500, 400]" in format_bboxes([[500, 200, 1000, 400, "Car"]], 2000, 1000)


def test_format_bboxes_truncates_like_int():
    # 2/3*1000 = 666.67 -> 666 (TAO truncates, it does not round)
    assert format_bboxes([[2, 2, 3, 3, "Car"]], 3, 3) == "[Car: [666, 666, 1000, 1000]  ]"


def test_format_bboxes_float_pixel_boxes():
    assert format_bboxes([[100.7, 200.2, 300.0, 400.9, "Pedestrian"]], 1000, 1000) == (
        "[Pedestrian: [100, 200, 300, 400]  ]"
    )


# --------------------------------------------------------------------------- prompts_file


def test_load_prompts_defaults():
    assert load_prompts(None) == PROMPT_TEMPLATES
    assert load_prompts("") == PROMPT_TEMPLATES
    assert load_prompts(None) is not PROMPT_TEMPLATES


def test_prompts_file_override_loads(tmp_path):
    p = tmp_path / "prompts.yaml"
    p.write_text('image_caption: "Describe the scene in one sentence."\n'
                 'double_check: |\n  Check these:\n  {expr}\n')
    templates = load_prompts(p)
    assert templates["image_caption"] == "Describe the scene in one sentence."
    assert templates["double_check"] == "Check these:\n{expr}\n"
    assert templates["region_expr"] == PROMPT_TEMPLATES["region_expr"]
    assert templates["grounding_expr"] == PROMPT_TEMPLATES["grounding_expr"]
    assert PROMPT_TEMPLATES["image_caption"] != templates["image_caption"]  # the module copy is untouched


def test_prompts_file_missing_placeholder(tmp_path):
    p = tmp_path / "prompts.yaml"
    p.write_text('grounding_expr: "Group these: {bboxes}"\n')
    with pytest.raises(ConfigError) as exc:
        load_prompts(p)
    msg = str(exc.value)
    assert "grounding_expr" in msg
    assert str(p) in msg
    assert "caption_section" in msg
    assert "missing" in msg


def test_prompts_file_unknown_placeholder(tmp_path):
    p = tmp_path / "prompts.yaml"
    p.write_text('region_expr: "Boxes {bboxes} in {image}"\n')
    with pytest.raises(ConfigError) as exc:
        load_prompts(p)
    msg = str(exc.value)
    assert "region_expr" in msg
    assert str(p) in msg
    assert "{image}" in msg
    assert "unknown" in msg


def test_prompts_file_placeholder_in_caption(tmp_path):
    p = tmp_path / "prompts.yaml"
    p.write_text('image_caption: "Caption {bboxes}"\n')
    with pytest.raises(ConfigError, match="image_caption"):
        load_prompts(p)


def test_prompts_file_unknown_template_name(tmp_path):
    p = tmp_path / "prompts.yaml"
    p.write_text('region_exp: "{bboxes}"\n')
    with pytest.raises(ConfigError) as exc:
        load_prompts(p)
    assert "region_exp" in str(exc.value)
    assert str(p) in str(exc.value)


def test_prompts_file_malformed_template(tmp_path):
    p = tmp_path / "prompts.yaml"
    p.write_text('double_check: "unclosed {expr"\n')
    with pytest.raises(ConfigError) as exc:
        load_prompts(p)
    assert "double_check" in str(exc.value)


def test_prompts_file_empty_template(tmp_path):
    p = tmp_path / "prompts.yaml"
    p.write_text('image_caption: ""\n')
    with pytest.raises(ConfigError, match="image_caption"):
        load_prompts(p)


def test_prompts_file_not_found(tmp_path):
    with pytest.raises(ConfigError, match="prompts_file"):
        load_prompts(tmp_path / "nope.yaml")


def test_prompts_file_not_a_mapping(tmp_path):
    p = tmp_path / "prompts.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError) as exc:
        load_prompts(p)
    assert str(p) in str(exc.value)


def test_prompts_file_bad_yaml(tmp_path):
    p = tmp_path / "prompts.yaml"
    p.write_text("image_caption: [unclosed\n")
    with pytest.raises(ConfigError) as exc:
        load_prompts(p)
    assert str(p) in str(exc.value)
