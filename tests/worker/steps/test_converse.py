"""The step conversation (worker/steps/converse.py) with test-double clients: structured mode
and its fallback, truncation retries and re-asks, budgets, and the quality report."""

from __future__ import annotations

import json
import logging

import pytest
from PIL import Image, ImageDraw

from worker.clients.base import (
    EmptyText,
    StructuredOutputRejected,
    TruncatedAnswer,
    VLMRequest,
    VLMResponse,
)
from worker.clients.offline import OfflineClient
from worker.errors import InputError, PermanentClientError
from worker.steps import input_record, run_step
from worker.steps.converse import budget, forget_rejections
from worker.steps.options import StepOptions
from worker.steps.prompts import PROMPT_TEMPLATES
from worker.steps.quality import KEYS
from worker.steps.records import SOURCE


@pytest.fixture(autouse=True)
def _fresh():
    forget_rejections()
    yield
    forget_rejections()


class Scripted:
    """Answers with the next scripted item (text, (text, finish), or an exception to raise)."""

    name = "scripted"

    def __init__(self, *answers, structured: bool = True):
        self.answers = list(answers)
        self.requests: list[VLMRequest] = []
        self.structured_output = structured

    def generate(self, request: VLMRequest) -> VLMResponse:
        self.requests.append(request)
        item = self.answers.pop(0)
        if isinstance(item, Exception):
            raise item
        text, finish = item if isinstance(item, tuple) else (item, "stop")
        return VLMResponse(text=text, finish_reason=finish, truncated=finish in ("length", "MAX_TOKENS"),
                           usage={"input_tokens": 10, "output_tokens": 5})


@pytest.fixture
def seed(tmp_path):
    p = tmp_path / "000001.png"
    im = Image.new("RGB", (1000, 500), (90, 90, 90))
    draw = ImageDraw.Draw(im)
    for box, color in (((100, 100, 300, 200), (220, 220, 220)), ((500, 250, 700, 400), (200, 30, 30)),
                       ((800, 0, 900, 100), (20, 20, 20))):
        draw.rectangle(box, fill=color, outline=(255, 255, 0), width=6)  # not uniform: the teacher keeps it
    im.save(p)
    return {"image_id": "000001", "image_path": str(p), "width": 1000, "height": 500,
            "kitti_bboxes": [[100, 100, 300, 200, "Car"], [500, 250, 700, 400, "Van"],
                             [800, 0, 900, 100, "Pedestrian"]],
            "source": SOURCE, "pipeline_steps": []}


AUTO = StepOptions(structured_output="auto", model="gpt-4o", max_tokens=1000, token_ceiling=4000,
                   endpoint="openai|x|gpt-4o")
OFF = StepOptions(structured_output="off", model="gpt-4o", max_tokens=1000, token_ceiling=4000)
OBJECTS = {"objects": [{"id": 0, "type": "sedan", "color": "white", "description": "white sedan"},
                       {"id": 1, "type": "van", "color": "red", "description": "red van"},
                       {"id": 2, "type": "pedestrian", "color": "black", "description": "person in black"}]}
TAO = [{"bbox_2d": [100, 200, 300, 400], "type": "sedan", "color": "white", "description": "white sedan"},
       {"bbox_2d": [500, 500, 700, 800], "type": "van", "color": "red", "description": "red van"},
       {"bbox_2d": [800, 0, 900, 200], "type": "pedestrian", "color": "black", "description": "person in black"}]


def quality(out, step_name="step0_region_expr") -> dict:
    return out.record["meta"][step_name]["quality"]


# --------------------------------------------------------------------------- structured mode


def test_structured_step0_sends_ids_and_a_schema_and_joins_by_id(seed):
    client = Scripted(json.dumps(OBJECTS))
    out = run_step(0, seed, client, PROMPT_TEMPLATES, options=AUTO)
    req = client.requests[0]
    assert req.response_schema["properties"]["objects"]["items"]["required"] == ["id", "type", "color", "description"]
    assert "0: Car [100, 200, 300, 400]\n1: Van [500, 500, 700, 800]\n2: Pedestrian [800, 0, 900, 200]" in req.prompt
    assert '"bbox_2d"' not in req.prompt
    assert [r["kitti_index"] for r in out.record["regions"]] == [0, 1, 2]
    assert out.record["regions"][1]["bbox_2d"] == [500, 500, 700, 800]  # the joined box, not an echo
    # the legacy file is TAO's format, built from the joined boxes
    assert json.loads(out.legacy) == TAO
    q = quality(out)
    assert q["mode"] == "structured" and q["boxes_matched"] == 3 and q["box_format"] == ""


def test_structured_mode_needs_a_client_that_can_send_schemas(seed):
    client = Scripted(json.dumps(TAO), structured=False)
    out = run_step(0, seed, client, PROMPT_TEMPLATES, options=AUTO)
    assert client.requests[0].response_schema is None
    assert "Objects in the image at [x1, y1, x2, y2]" in client.requests[0].prompt
    assert quality(out)["mode"] == "text"


def test_structured_steps_2_and_3_use_groups_of_ids(seed):
    client = Scripted(json.dumps(OBJECTS), "A street.",
                      json.dumps({"groups": [{"phrase": "the vehicles", "box_ids": [0, 1]},
                                             {"phrase": "the person", "box_ids": [2]}]}),
                      json.dumps({"groups": [{"phrase": "the vehicles", "box_ids": [0]},
                                             {"phrase": "the person", "box_ids": [2]}]}))
    recs, outs = {}, {}
    for step in (0, 1, 2, 3):
        outs[step] = run_step(step, input_record(step, seed, recs), client, PROMPT_TEMPLATES, options=AUTO)
        recs[step] = outs[step].record
    assert "0: white sedan [100, 200, 300, 400]" in client.requests[2].prompt
    assert '"the vehicles": {0: [100, 200, 300, 400], 1: [500, 500, 700, 800]}' in client.requests[3].prompt
    assert client.requests[1].response_schema is None  # captions stay free text
    final = recs[3]["expressions"]
    assert [(e["text"], [i["region_index"] for i in e["instances"]]) for e in final] == [
        ("the vehicles", [0]), ("the person", [2])]
    assert outs[3].legacy == "the vehicles: [[100, 200, 300, 400]]\nthe person: [[800, 0, 900, 200]]\n"


def test_rejected_schema_falls_back_to_text_once_per_endpoint(seed, caplog):
    client = Scripted(StructuredOutputRejected("HTTP 400 json_schema", status=400), json.dumps(TAO), json.dumps(TAO))
    with caplog.at_level(logging.WARNING, logger="refexp.steps"):
        first = run_step(0, seed, client, PROMPT_TEMPLATES, options=AUTO)
        second = run_step(0, seed, client, PROMPT_TEMPLATES, options=AUTO)
    assert [r.response_schema is not None for r in client.requests] == [True, False, False]
    assert quality(first)["fallback"] == "structured_rejected" and quality(first)["mode"] == "text"
    assert quality(second)["fallback"] == "" and len(first.record["regions"]) == 3
    assert len([r for r in caplog.records if "refused a response schema" in r.message]) == 1


def test_fallback_that_fails_too_forgets_the_endpoint(seed):
    client = Scripted(StructuredOutputRejected("400", status=400), PermanentClientError("400 bad image", status=400),
                      json.dumps(OBJECTS))
    with pytest.raises(PermanentClientError, match="bad image"):
        run_step(0, seed, client, PROMPT_TEMPLATES, options=AUTO)
    out = run_step(0, seed, client, PROMPT_TEMPLATES, options=AUTO)  # structured again: it was not the schema
    assert client.requests[-1].response_schema is not None and quality(out)["mode"] == "structured"


# --------------------------------------------------------------------------- truncation


def test_truncated_step0_reasks_only_the_missing_ids_with_a_bigger_budget(seed):
    cut = json.dumps(OBJECTS)[: json.dumps(OBJECTS).index('{"id": 2') + 10]
    client = Scripted((cut, "length"), json.dumps({"objects": [OBJECTS["objects"][2]]}))
    out = run_step(0, seed, client, PROMPT_TEMPLATES, options=AUTO)
    first, again = client.requests
    assert "2: Pedestrian" in again.prompt and "0: Car" not in again.prompt and "1: Van" not in again.prompt
    assert again.max_tokens == 2 * first.max_tokens
    assert [r["kitti_index"] for r in out.record["regions"]] == [0, 1, 2]
    q = quality(out)
    assert (q["calls"], q["reasks"], q["truncated"], q["kitti_skipped"], q["boxes_expected"]) == (2, 1, False, 0, 3)
    assert out.response.usage == {"input_tokens": 20, "output_tokens": 10}  # both calls


def test_truncated_text_step0_reasks_with_the_tao_prompt_for_the_missing_boxes(seed):
    cut = json.dumps(TAO)[:-40]
    client = Scripted((cut, "MAX_TOKENS"), json.dumps(TAO[2:]))
    out = run_step(0, seed, client, PROMPT_TEMPLATES, options=OFF)
    assert "[Pedestrian: [800, 0, 900, 200]  ]" in client.requests[1].prompt
    assert len(out.record["regions"]) == 3 and quality(out)["reasks"] == 1


def test_a_failed_reask_keeps_the_cut_answer_flagged(seed):
    cut = json.dumps(OBJECTS)[: json.dumps(OBJECTS).index('{"id": 2') + 10]
    client = Scripted((cut, "length"), PermanentClientError("400 max_tokens too large", status=400))
    out = run_step(0, seed, client, PROMPT_TEMPLATES, options=AUTO)
    assert [r["kitti_index"] for r in out.record["regions"]] == [0, 1]
    q = quality(out)
    assert q["truncated"] is True and q["kitti_skipped"] == 1


def test_answer_cut_before_any_text_is_asked_again_whole(seed):
    client = Scripted(TruncatedAnswer("thinking used the budget"), json.dumps(OBJECTS))
    out = run_step(0, seed, client, PROMPT_TEMPLATES, options=AUTO)
    assert client.requests[1].max_tokens == 2 * client.requests[0].max_tokens
    assert len(out.record["regions"]) == 3 and quality(out)["calls"] == 2


def _step2_record(seed):
    regions = [{"bbox": [100.0, 100.0, 300.0, 200.0], "bbox_2d": [100, 200, 300, 400], "type": "sedan",
                "color": "white", "description": "white sedan", "kitti_index": 0},
               {"bbox": [500.0, 250.0, 700.0, 400.0], "bbox_2d": [500, 500, 700, 800], "type": "van",
                "color": "red", "description": "red van", "kitti_index": 1}]
    return input_record(2, seed, {0: {**seed, "regions": regions}})


def test_truncated_step2_is_asked_again_whole(seed):
    client = Scripted(("white sedan: [[100, 200, 300, 400]]\nvehicles: [[100, 200", "length"),
                      "white sedan: [[100, 200, 300, 400]]\nvehicles: [[100, 200, 300, 400], [500, 500, 700, 800]]")
    out = run_step(2, _step2_record(seed), client, PROMPT_TEMPLATES, options=OFF)
    assert client.requests[0].prompt == client.requests[1].prompt
    assert [e["text"] for e in out.record["expressions"]] == ["white sedan", "vehicles"]
    assert quality(out, "step2_grounding_expr")["reasks"] == 0


def test_truncated_step3_reasks_only_the_groups_it_never_reached(seed):
    step2 = run_step(2, _step2_record(seed), Scripted(
        "white sedan: [[100, 200, 300, 400]]\nvehicles: [[100, 200, 300, 400], [500, 500, 700, 800]]"),
        PROMPT_TEMPLATES, options=OFF).record
    client = Scripted(("white sedan: [[100, 200, 300, 400]]\nvehicles: [[100, 2", "length"),
                      "vehicles: [[500, 500, 700, 800]]")
    out = run_step(3, input_record(3, {}, {2: step2}), client, PROMPT_TEMPLATES, options=OFF)
    again = client.requests[1].prompt
    assert "white sedan: [[" not in again and "vehicles: [[100, 200, 300, 400], [500, 500, 700, 800]]" in again
    assert [(e["text"], len(e["instances"])) for e in out.record["expressions"]] == [("white sedan", 1),
                                                                                     ("vehicles", 1)]
    q = quality(out, "step3_double_check")
    assert q["reasks"] == 1 and q["kitti_skipped"] == 0


def test_step3_clean_empty_answer_from_a_real_client_means_all_removed(seed):
    step2 = run_step(2, _step2_record(seed), Scripted("white sedan: [[100, 200, 300, 400]]"), PROMPT_TEMPLATES,
                     options=OFF).record
    client = Scripted(EmptyText("empty answer", finish_reason="stop"))
    out = run_step(3, input_record(3, {}, {2: step2}), client, PROMPT_TEMPLATES, options=OFF)
    assert out.record["expressions"] == [] and out.legacy == ""


# --------------------------------------------------------------------------- budgets, report


def test_budget_is_sized_from_the_boxes():
    from worker.steps import region_expr

    gem = StepOptions(model="gemini-2.5-flash", max_tokens=8192, token_ceiling=65536, grow_first_call=True)
    assert budget(region_expr.DEF, 10, "text", gem) == 8192          # never below the configured budget
    assert budget(region_expr.DEF, 200, "text", gem) == 512 + 70 * 200  # many boxes: more room
    assert budget(region_expr.DEF, 2000, "text", gem) == 65536        # capped at the model's limit
    thinking = StepOptions(max_tokens=1000, token_ceiling=65536, grow_first_call=True, thinking_budget=2048)
    assert budget(region_expr.DEF, 10, "structured", thinking) == 512 + 45 * 10 + 2048
    oai = StepOptions(max_tokens=4096, token_ceiling=8192)
    assert budget(region_expr.DEF, 500, "text", oai) == 4096          # only the retry grows on OpenAI-compatible
    assert budget(region_expr.DEF, 5, "text", StepOptions()) is None   # nothing configured: the client decides


def test_options_from_the_spec():
    from worker.spec import VLMSpec

    vlm = VLMSpec.model_validate({"backend": "gemini", "structured_output": "auto",
                                  "gemini": {"model": "gemini-2.5-flash", "thinking_budget": 0}})
    opts = StepOptions.from_vlm(vlm)
    assert (opts.structured_output, opts.max_tokens, opts.token_ceiling, opts.grow_first_call) == (
        "auto", 8192, 65536, True)
    assert opts.convention.native == "yxyx_1000" and opts.thinking_budget == 0
    opts = StepOptions.from_vlm(VLMSpec.model_validate({"backend": "openai", "box_format": "xyxy_pixels",
                                                        "openai": {"model_name": "m", "max_tokens": 1000}}))
    assert (opts.token_ceiling, opts.grow_first_call, opts.convention.prompt) == (2000, False, "xyxy_pixels")


@pytest.mark.parametrize("options", [OFF, AUTO], ids=["off", "auto"])
def test_quality_report_has_one_shape_for_every_step(seed, options):
    recs = {}
    client = OfflineClient()
    for step in (0, 1, 2, 3):
        recs[step] = run_step(step, input_record(step, seed, recs), client, PROMPT_TEMPLATES, options=options).record
    for step, name in enumerate(("step0_region_expr", "step1_image_caption", "step2_grounding_expr",
                                 "step3_double_check")):
        q = recs[step]["meta"][name]["quality"]
        assert tuple(q) == KEYS
        assert q["mode"] == "text"  # the offline teacher sends no schema: text prompts in both modes
        assert q["calls"] == 1
    assert recs[0]["meta"]["step0_region_expr"]["quality"]["boxes_matched"] == 3


def test_offline_teacher_answers_parse_in_structured_mode_too(seed):
    """Forced into structured mode, the teacher still answers TAO text: parsed by its boxes."""

    class Forced(OfflineClient):
        structured_output = True

    recs = {}
    for step in (0, 1, 2, 3):
        recs[step] = run_step(step, input_record(step, seed, recs), Forced(), PROMPT_TEMPLATES, options=AUTO).record
    q0 = recs[0]["meta"]["step0_region_expr"]["quality"]
    assert q0["mode"] == "structured" and q0["boxes_matched"] == 3
    assert q0["repairs"].get("structured_answer_without_ids") == 1
    assert recs[3]["expressions"]


# --------------------------------------------------------------------------- answers cut without saying so (issue 13)


def test_text_step0_cut_off_with_a_clean_stop_reasks_the_skipped_boxes(seed):
    text = json.dumps(TAO)
    cut = text[: text.index('"description": "red van"') + 14]  # mid-object, finish "stop"
    client = Scripted((cut, "stop"), json.dumps(TAO[1:]))
    out = run_step(0, seed, client, PROMPT_TEMPLATES, options=OFF)
    assert len(client.requests) == 2
    again = client.requests[1].prompt
    assert "[Van: [500, 500, 700, 800] , Pedestrian: [800, 0, 900, 200]  ]" in again and "Car:" not in again
    assert again.count("Objects in the image at") == 1
    assert [r["kitti_index"] for r in out.record["regions"]] == [0, 1, 2]
    q = quality(out)
    assert (q["calls"], q["reasks"], q["kitti_skipped"], q["truncated"]) == (2, 1, 0, False)
    assert out.record["meta"]["step0_region_expr"]["missed_kitti"] == []


def test_structured_step0_cut_off_with_a_clean_stop_reasks_the_missing_ids(seed):
    text = json.dumps(OBJECTS)
    cut = text[: text.index('{"id": 2') + 12]
    client = Scripted((cut, "stop"), json.dumps({"objects": [OBJECTS["objects"][2]]}))
    out = run_step(0, seed, client, PROMPT_TEMPLATES, options=AUTO)
    assert "2: Pedestrian" in client.requests[1].prompt and "0: Car" not in client.requests[1].prompt
    assert [r["kitti_index"] for r in out.record["regions"]] == [0, 1, 2] and quality(out)["reasks"] == 1


def test_boxes_skipped_by_a_whole_answer_are_not_asked_again(seed):
    client = Scripted(json.dumps(TAO[:2]))  # complete JSON: the model chose to leave one out
    out = run_step(0, seed, client, PROMPT_TEMPLATES, options=OFF)
    assert len(client.requests) == 1
    assert out.record["meta"]["step0_region_expr"]["missed_kitti"] == [2]


def test_a_failed_reask_after_a_silent_cut_keeps_the_cut_answer_flagged(seed):
    text = json.dumps(TAO)
    cut = text[: text.index('"description": "red van"') + 14]
    client = Scripted((cut, "stop"), "I cannot help with that.")
    out = run_step(0, seed, client, PROMPT_TEMPLATES, options=OFF)
    assert [r["kitti_index"] for r in out.record["regions"]] == [0]
    q = quality(out)
    assert q["truncated"] is True and q["kitti_skipped"] == 2 and q["reasks"] == 1


# --------------------------------------------------------------------------- the image changed (issue 13)


def test_image_replaced_by_one_of_another_size_fails_the_image_step(seed):
    Image.new("RGB", (500, 250), (90, 90, 90)).save(seed["image_path"])
    client = Scripted(json.dumps(TAO))
    with pytest.raises(InputError) as exc:
        run_step(0, seed, client, PROMPT_TEMPLATES, options=OFF)
    assert client.requests == []  # no call with boxes that no longer fit
    assert str(exc.value).startswith(f"{seed['image_path']}: the image is 500x250 now but was 1000x500 when seeded")
    with pytest.raises(InputError):
        run_step(1, seed, Scripted("A street."), PROMPT_TEMPLATES, options=OFF)
