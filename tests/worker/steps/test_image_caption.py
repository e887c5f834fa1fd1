"""Step 1 through ``run_step`` (TAO's TestStep1ImageCaption)."""

from __future__ import annotations

import pytest
from PIL import Image

from tests.support.doubles import FakeClient
from worker.errors import EmptyAnswer, ParseError
from worker.steps import image_caption, run_step
from worker.steps.prompts import PROMPT_TEMPLATES
from worker.steps.records import SOURCE


@pytest.fixture
def seed(tmp_path):
    p = tmp_path / "000001.png"
    Image.new("RGB", (64, 48)).save(p)
    return {"image_id": "000001", "image_path": str(p), "width": 64, "height": 48,
            "kitti_bboxes": [[1, 2, 30, 40, "Car"]], "source": SOURCE, "pipeline_steps": []}


def run(seed, text, templates=PROMPT_TEMPLATES):
    client = FakeClient(text)
    return run_step(1, seed, client, templates), client


def test_caption_written(seed):
    out, client = run(seed, "A busy street with cars.")
    assert out.record["caption"] == "A busy street with cars."
    assert "step1_image_caption" in out.record["pipeline_steps"]
    assert len(client.requests) == 1


def test_caption_stripped_and_legacy_has_no_newline(seed):
    # TAO: the model returns "  Caption text.  " -> .txt.step1 strips to "Caption text."
    out, _ = run(seed, "  Caption text.  \n")
    assert out.record["caption"] == "Caption text."
    assert out.legacy == "Caption text."


def test_multiline_caption_kept_inside(seed):
    out, _ = run(seed, "\nLine one.\nLine two.\n\n")
    assert out.record["caption"] == "Line one.\nLine two."
    assert out.legacy == "Line one.\nLine two."


def test_reasoning_tags_removed(seed):
    out, _ = run(seed, "<think>let me look\nat it</think>\n A quiet road. ")
    assert out.record["caption"] == "A quiet road."


def test_only_reasoning_is_a_parse_error(seed):
    with pytest.raises(ParseError) as exc:
        run(seed, "<think>hmm</think>   ")
    assert "<think>" in exc.value.raw


def test_blank_answer_raises_a_retryable_error(seed):
    with pytest.raises(EmptyAnswer):
        run(seed, "   ")


def test_parse_of_empty_text_is_a_parse_error(seed):
    with pytest.raises(ParseError):
        image_caption.parse("", seed)
    with pytest.raises(ParseError):
        image_caption.parse(" \n\t ", seed)


def test_prompt_is_the_stripped_template(seed):
    _, client = run(seed, "x")
    req = client.requests[0]
    assert req.prompt == PROMPT_TEMPLATES["image_caption"].strip()
    assert req.step == "image_caption"
    assert req.hint == {"kitti_bboxes": seed["kitti_bboxes"]}


def test_custom_template_used(seed):
    templates = {**PROMPT_TEMPLATES, "image_caption": "  Describe it.  "}
    _, client = run(seed, "x", templates)
    assert client.requests[0].prompt == "Describe it."


def test_called_even_without_boxes(seed):
    out, client = run({**seed, "kitti_bboxes": []}, "An empty road.")
    assert len(client.requests) == 1
    assert out.record["caption"] == "An empty road."


def test_record_keeps_seed_fields(seed):
    out, _ = run(seed, "x")
    assert out.record["kitti_bboxes"] == seed["kitti_bboxes"]
    assert out.record["source"] == SOURCE
    assert "regions" not in out.record
    assert "caption" not in seed


# --------------------------------------------------------------------------- sizes and shapes (issue 13)


def test_huge_non_repeating_caption_is_cut_at_a_sentence_and_counted(seed):
    sentences = [f"Sentence {i} tells of object {i * 7919 % 10007} near marker {i}." for i in range(120_000)]
    text = " ".join(sentences)  # ~5 MB, nothing repeats
    assert len(text) > 5_000_000
    out, _ = run(seed, text)
    caption = out.record["caption"]
    assert len(caption) <= image_caption.MAX_CAPTION_CHARS and caption.endswith(".")
    assert caption.startswith("Sentence 0 tells")
    q = out.record["meta"]["step1_image_caption"]["quality"]
    assert q["answers_cut"] == 1 and q["repairs"]["oversized_answer_cut"] == 1


def test_a_caption_of_a_few_kb_is_kept_whole(seed):
    text = " ".join(f"Car number {i} is parked at the {i}th house." for i in range(100))  # 4.4 KB
    out, _ = run(seed, text)
    assert out.record["caption"] == text
    assert out.record["meta"]["step1_image_caption"]["quality"]["answers_cut"] == 0


@pytest.mark.parametrize("answer, keys", [
    ('{"regions": [{"bbox_2d": [1, 2, 3, 4], "type": "Car", "color": "red", "description": "red car"}]}',
     "regions"),
    ('```json\n[{"bbox_2d": [1, 2, 3, 4], "type": "Car", "color": "red", "description": "red car"}]\n```',
     "bbox_2d, type, color, description"),
    ('{"groups": [{"phrase": "the cars", "box_ids": [0, 1]}]}', "groups"),
    ('{"objects": [{"id": 0, "type": "Car", "color": "red", "description": "a red ca', None),
], ids=["regions", "step0-array", "groups", "cut-objects"])
def test_json_for_another_step_is_rejected_for_a_retry(seed, answer, keys):
    with pytest.raises(ParseError) as exc:
        run(seed, answer)
    what = f"JSON with the keys {keys}" if keys else "JSON-like data (cut, or too deeply nested to read)"
    assert f"step 1: the answer is {what}, not a caption" in str(exc.value)
    assert exc.value.raw == answer


def test_prose_wrapping_another_steps_json_is_rejected(seed):
    answer = 'Here are the regions:\n{"regions": [{"bbox_2d": [1, 2, 3, 4], "description": "red car"}]}'
    with pytest.raises(ParseError, match="holds JSON with the keys regions"):
        run(seed, answer)


def test_caption_wrapped_in_json_is_unwrapped(seed):
    out, _ = run(seed, '```json\n{"caption": "A quiet road at dusk."}\n```')
    assert out.record["caption"] == "A quiet road at dusk."
    assert out.record["meta"]["step1_image_caption"]["quality"]["repairs"]["caption_from_json"] == 1


def test_braces_in_prose_are_a_caption(seed):
    out, _ = run(seed, "A sign reads {closed} over the road.")
    assert out.record["caption"] == "A sign reads {closed} over the road."
