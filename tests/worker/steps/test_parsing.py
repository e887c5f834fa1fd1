"""Parsers for what real models emit (TAO's TestParseRegionsResponse / TestParseGroundingResponse)."""

from __future__ import annotations

import json

import pytest

from worker.steps.parsing import MAX_ANSWER_CHARS, parse_grounding_lines, parse_json_objects, strip_fences

TWO = [
    {"bbox_2d": [1, 2, 3, 4], "type": "car", "color": "red", "description": "d1"},
    {"bbox_2d": [5, 6, 7, 8], "type": "van", "color": "blue", "description": "d2"},
]

# --------------------------------------------------------------------------- fences


def test_strip_json_fence():
    assert strip_fences('```json\n{"a": 1}\n```') == ('{"a": 1}', True)


def test_strip_generic_fence():
    assert strip_fences("```\n[1, 2, 3]\n```") == ("[1, 2, 3]", True)


def test_strip_fence_passthrough():
    assert strip_fences('  {"a": 1}  ') == ('{"a": 1}', False)


def test_strip_unclosed_fence():
    assert strip_fences('```json\n[{"a": 1}]') == ('[{"a": 1}]', True)


def test_strip_fence_with_prose_before():
    body, fenced = strip_fences('Here you go:\n```json\n[{"a": 1}]\n```\nThanks')
    assert fenced
    assert json.loads(body) == [{"a": 1}]


# --------------------------------------------------------------------------- JSON objects


def test_json_array():
    out = parse_json_objects(json.dumps(TWO))
    assert out.items == TWO
    assert out.items[1]["description"] == "d2"
    assert out.repairs == []


def test_ndjson():
    text = "\n".join(json.dumps(o) for o in TWO)
    out = parse_json_objects(text)
    assert out.items == TWO
    assert "ndjson" in out.repairs


def test_truncated_array_keeps_complete_objects():
    # TAO: the second object is cut (no closing brace or bracket)
    text = '[{"bbox_2d": [1, 2, 3, 4], "description": "d1"}, {"bbox_2d": [5, 6, 7, 8], "description": "d2"'
    out = parse_json_objects(text)
    assert out.items == [{"bbox_2d": [1, 2, 3, 4], "description": "d1"}]
    assert "truncated_array" in out.repairs


def test_truncated_inside_fence():
    out = parse_json_objects('```json\n[{"a": 1}, {"b": 2')
    assert out.items == [{"a": 1}]
    assert "code_fence" in out.repairs


def test_fenced_json():
    out = parse_json_objects("```json\n" + json.dumps(TWO[:1]) + "\n```")
    assert out.items == TWO[:1]
    assert "code_fence" in out.repairs


def test_fenced_without_language():
    out = parse_json_objects("```\n" + json.dumps(TWO) + "\n```")
    assert len(out.items) == 2


def test_prose_around_array():
    out = parse_json_objects("Here are the regions:\n" + json.dumps(TWO) + "\nHope this helps!")
    assert out.items == TWO
    assert "prose_around_json" in out.repairs


def test_prose_between_objects():
    out = parse_json_objects('Sure! {"a": 1} and also {"b": 2}.')
    assert out.items == [{"a": 1}, {"b": 2}]


def test_trailing_commas():
    out = parse_json_objects('[{"bbox_2d": [1, 2, 3, 4], "description": "d1",}, ]')
    assert out.items == [{"bbox_2d": [1, 2, 3, 4], "description": "d1"}]
    assert "trailing_comma" in out.repairs


def test_python_literals_single_quotes():
    out = parse_json_objects("[{'bbox_2d': [1, 2, 3, 4], 'description': 'd1'}, {'bbox_2d': (5, 6, 7, 8)}]")
    assert out.items[0] == {"bbox_2d": [1, 2, 3, 4], "description": "d1"}
    assert len(out.items) == 2
    assert "python_literal" in out.repairs


def test_json_literals_true_null():
    # TAO's ast.literal_eval chokes on these; JSON must not.
    out = parse_json_objects('[{"bbox_2d": [1, 2, 3, 4], "occluded": true, "note": null}]')
    assert out.items == [{"bbox_2d": [1, 2, 3, 4], "occluded": True, "note": None}]


def test_wrapped_object():
    out = parse_json_objects(json.dumps({"regions": TWO}))
    assert out.items == TWO
    assert "wrapped_in_object" in out.repairs


def test_single_object_is_one_item():
    out = parse_json_objects(json.dumps(TWO[0]))
    assert out.items == [TWO[0]]


def test_strings_with_braces_and_escapes():
    obj = {"description": 'a "quoted" } brace {', "bbox_2d": [1, 2, 3, 4]}
    text = json.dumps([obj])[:-1]  # drop the closing bracket: object scanning must cope
    out = parse_json_objects(text)
    assert out.items == [obj]


def test_non_objects_dropped():
    out = parse_json_objects('[{"a": 1}, 2, "x"]')
    assert out.items == [{"a": 1}]
    assert "non_object_items_dropped" in out.repairs


@pytest.mark.parametrize("text", ["", "   \n ", "no json here at all", "[1, 2, 3]", "[]", "{", "```json\n```"])
def test_nothing_usable_gives_no_items(text):
    assert parse_json_objects(text).items == []


def test_oversized_answer_is_cut():
    text = json.dumps(TWO[:1]) + " " * (MAX_ANSWER_CHARS + 10) + json.dumps(TWO[1:])
    out = parse_json_objects(text)
    assert "oversized_answer_cut" in out.repairs
    assert out.items == TWO[:1]


# --------------------------------------------------------------------------- grounding lines


def test_grounding_phrase_bbox_lines():
    out = parse_grounding_lines("The red car: [[1, 2, 3, 4], [5, 6, 7, 8]]\nThe blue van: [[10, 20, 30, 40]]\n")
    assert out.items == [
        ("The red car", [[1, 2, 3, 4], [5, 6, 7, 8]]),
        ("The blue van", [[10, 20, 30, 40]]),
    ]


def test_grounding_malformed_lines_skipped():
    out = parse_grounding_lines("good: [[1, 2, 3, 4]]\nno colon here\nbad: not-a-list\n")
    assert out.items == [("good", [[1, 2, 3, 4]])]
    assert "skipped_lines:2" in out.repairs


def test_grounding_empty_list_is_a_phrase_with_no_boxes():
    # TAO drops "nothing: []"; here the parser keeps the phrase with zero boxes and the step drops it.
    out = parse_grounding_lines("nothing: []\n")
    assert out.items == [("nothing", [])]


@pytest.mark.parametrize(
    "line",
    ["- cars: [[1, 2, 3, 4]]", "* cars: [[1, 2, 3, 4]]", "• cars: [[1, 2, 3, 4]]", "1. cars: [[1, 2, 3, 4]]",
     "12) cars: [[1, 2, 3, 4]]", "**cars**: [[1, 2, 3, 4]]", '"cars": [[1, 2, 3, 4]]', "`cars` : [[1, 2, 3, 4]]",
     "  cars  :  [[1, 2, 3, 4]]  "],
)
def test_grounding_decorations_stripped(line):
    assert parse_grounding_lines(line).items == [("cars", [[1, 2, 3, 4]])]


def test_grounding_flat_single_box():
    out = parse_grounding_lines("the bus: [100, 200, 300, 400]")
    assert out.items == [("the bus", [[100, 200, 300, 400]])]
    assert "flat_box" in out.repairs


def test_grounding_fenced():
    out = parse_grounding_lines("```\ncars: [[1, 2, 3, 4]]\nvans: [[5, 6, 7, 8]]\n```")
    assert [p for p, _ in out.items] == ["cars", "vans"]
    assert "code_fence" in out.repairs


def test_grounding_phrase_with_colon_keeps_the_whole_phrase():
    out = parse_grounding_lines("note: the red car: [[1, 2, 3, 4]]")
    assert out.items == [("note: the red car", [[1, 2, 3, 4]])]


def test_grounding_trailing_comma_and_python_tuples():
    assert parse_grounding_lines("a: [[1, 2, 3, 4],]").items == [("a", [[1, 2, 3, 4]])]


def test_grounding_empty_phrase_skipped():
    out = parse_grounding_lines(": [[1, 2, 3, 4]]\n** : [[1, 2, 3, 4]]")
    assert out.items == []


def test_grounding_prose_lines_skipped():
    text = "Here are the groups:\n\ncars on the left: [[1, 2, 3, 4]]\nThat's all."
    out = parse_grounding_lines(text)
    assert out.items == [("cars on the left", [[1, 2, 3, 4]])]
    assert "skipped_lines:2" in out.repairs


def test_grounding_non_list_boxes_filtered():
    out = parse_grounding_lines('a: [[1, 2, 3, 4], "x", 5]')
    assert out.items == [("a", [[1, 2, 3, 4]])]


@pytest.mark.parametrize("text", ["", "\n\n", "no grounding here", "bad: not-a-list"])
def test_grounding_nothing(text):
    assert parse_grounding_lines(text).items == []
