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
