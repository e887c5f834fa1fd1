"""Structured output, thinking, output budgets and finish reasons through the real SDK clients
against the fake endpoint (and the fake's structured answers and its old-server mode)."""

from __future__ import annotations

import json

import pytest

from worker.clients.base import BlockedAnswer, EmptyText, StructuredOutputRejected, TruncatedAnswer, VLMRequest
from worker.clients.gemini import GeminiClient
from worker.clients.openai_compat import OpenAICompatClient
from worker.errors import PermanentClientError
from worker.spec import GeminiSpec, OpenAISpec, VLMSpec
from worker.steps import input_record, run_step
from worker.steps.converse import forget_rejections
from worker.steps.options import StepOptions
from worker.steps.prompts import STRUCTURED_TEMPLATES, load_prompts
from worker.steps.schemas import REGIONS

KEY = "gk-test-0123456789abcdef"


@pytest.fixture(autouse=True)
def _keyed(monkeypatch):
    monkeypatch.setenv("GOOGLE_API_KEY", KEY)
    forget_rejections()
    yield
    forget_rejections()


def gemini(fake, **kw) -> GeminiClient:
    return GeminiClient(GeminiSpec(base_url=fake.gemini_base_url, timeout=5, **kw))


def openai_client(fake, **kw) -> OpenAICompatClient:
    return OpenAICompatClient(OpenAISpec(base_url=fake.openai_base_url, model_name=kw.pop("model", "m"), timeout=5,
                                         **kw))


# --------------------------------------------------------------------------- Gemini


def test_gemini_sends_json_schema_and_the_budget(fake_vlm, png):
    gemini(fake_vlm).generate(VLMRequest(image=png, prompt="x", response_schema=REGIONS, max_tokens=1234))
    params = fake_vlm.requests[0].params
    assert params["responseMimeType"] == "application/json"
    assert params["responseJsonSchema"] == REGIONS
    assert params["maxOutputTokens"] == 1234


def test_gemini_without_schema_sends_none(fake_vlm, png):
    gemini(fake_vlm, max_output_tokens=321).generate(VLMRequest(image=png, prompt="x"))
    params = fake_vlm.requests[0].params
    assert "responseJsonSchema" not in params and "responseMimeType" not in params
    assert params["maxOutputTokens"] == 321


@pytest.mark.parametrize(("model", "budget", "want"), [
    ("gemini-2.5-flash", None, {"thinkingBudget": 0}),
    ("gemini-2.5-flash-lite", None, {"thinkingBudget": 0}),
    ("gemini-2.5-pro", None, None),
    ("gemini-3-flash-preview", None, {"thinkingLevel": "MINIMAL"}),
    ("gemini-3.1-flash-lite-preview", None, {"thinkingLevel": "MINIMAL"}),
    ("gemini-3-pro-preview", None, {"thinkingLevel": "LOW"}),
    ("gemini-2.0-flash", None, None),
    ("gemini-2.5-pro", 512, {"thinkingBudget": 512}),
    ("gemini-2.5-flash", -1, {"thinkingBudget": -1}),
])
def test_gemini_thinking_defaults(fake_vlm, png, model, budget, want):
    gemini(fake_vlm, model=model, thinking_budget=budget).generate(VLMRequest(image=png, prompt="x"))
    got = fake_vlm.requests[0].params.get("thinkingConfig")
    if got is not None:  # the SDK's JSON names may be camel or snake case
        got = {("thinkingBudget" if "budget" in k.lower() else "thinkingLevel"): v for k, v in got.items()}
    assert got == want


def test_gemini_schema_refused_by_an_old_server(make_fake, png):
    fake = make_fake(reject_json_schema=True)
    with pytest.raises(StructuredOutputRejected, match="responseJsonSchema"):
        gemini(fake).generate(VLMRequest(image=png, prompt="x", response_schema=REGIONS))
    assert gemini(fake).generate(VLMRequest(image=png, prompt="x")).text  # no schema: fine


def test_gemini_other_400_is_not_a_schema_refusal(fake_vlm, png):
    fake_vlm.fail_next(1, 400, message="Request payload size exceeds the limit")
    with pytest.raises(PermanentClientError) as exc:
        gemini(fake_vlm).generate(VLMRequest(image=png, prompt="x"))
    assert not isinstance(exc.value, StructuredOutputRejected)


def test_gemini_finish_reasons(fake_vlm, png):
    c = gemini(fake_vlm)
    fake_vlm.answer_next('[{"bbox_2d": [1, 2, 3, 4]', finish_reason="SAFETY")
    with pytest.raises(BlockedAnswer, match="SAFETY"):  # a fragment after a safety stop is not used
        c.generate(VLMRequest(image=png, prompt="x"))
    fake_vlm.answer_next("", finish_reason="MAX_TOKENS")
    with pytest.raises(TruncatedAnswer):
        c.generate(VLMRequest(image=png, prompt="x"))
    fake_vlm.block_next(1, reason="OTHER")
    with pytest.raises(BlockedAnswer) as exc:
        c.generate(VLMRequest(image=png, prompt="x"))
    assert exc.value.reason == "OTHER"
    fake_vlm.answer_next("", finish_reason="STOP")
    with pytest.raises(EmptyText) as empty:
        c.generate(VLMRequest(image=png, prompt="x"))
    assert empty.value.finish_reason == "STOP"


# --------------------------------------------------------------------------- OpenAI-compatible


def test_openai_sends_strict_json_schema_and_the_budget(fake_vlm, png):
    openai_client(fake_vlm, max_tokens=100).generate(
        VLMRequest(image=png, prompt="x", response_schema=REGIONS, schema_name="refexp_region_expr", max_tokens=777))
    params = fake_vlm.requests[0].params
    fmt = params["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "refexp_region_expr"
    assert fmt["json_schema"]["strict"] is True
    schema = fmt["json_schema"]["schema"]
    assert schema["additionalProperties"] is False
    assert schema["properties"]["objects"]["items"]["additionalProperties"] is False
    assert params["max_tokens"] == 777


def test_openai_schema_refused_by_an_old_server(make_fake, png):
    fake = make_fake(reject_json_schema=True)
    with pytest.raises(StructuredOutputRejected, match="json_schema"):
        openai_client(fake).generate(VLMRequest(image=png, prompt="x", response_schema=REGIONS))


def test_openai_finish_reasons(fake_vlm, png):
    c = openai_client(fake_vlm)
    fake_vlm.answer_next("", finish_reason="length")
    with pytest.raises(TruncatedAnswer):
        c.generate(VLMRequest(image=png, prompt="x"))
    fake_vlm.block_next(1)
    with pytest.raises(BlockedAnswer, match="content_filter"):
        c.generate(VLMRequest(image=png, prompt="x"))
    fake_vlm.answer_next("a: [[1, 2", finish_reason="length")
    assert c.generate(VLMRequest(image=png, prompt="x")).truncated is True


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("backend", ["gemini", "openai"])
@pytest.mark.parametrize("reject", [False, True], ids=["schema", "old-server"])
def test_pipeline_in_structured_mode_through_the_fake(make_fake, tmp_path, backend, reject):
    from PIL import Image, ImageDraw

    fake = make_fake(reject_json_schema=reject)
    p = tmp_path / "a.png"
    im = Image.new("RGB", (1242, 375), (120, 120, 120))
    boxes = [[100, 150, 300, 300, "Car"], [500, 160, 640, 280, "Car"], [800, 100, 860, 330, "Pedestrian"]]
    draw = ImageDraw.Draw(im)
    for b, c in zip(boxes, [(200, 30, 30), (30, 60, 200), (240, 240, 240)], strict=True):
        draw.rectangle(b[:4], fill=c)
    im.save(p)
    seed = {"image_id": "a", "image_path": str(p), "width": 1242, "height": 375, "kitti_bboxes": boxes,
            "pipeline_steps": []}
    vlm = VLMSpec(backend=backend, structured_output="auto",
                  gemini=GeminiSpec(base_url=fake.gemini_base_url, model="gemini-2.5-flash", timeout=5),
                  openai=OpenAISpec(base_url=fake.openai_base_url, model_name="qwen3-vl", timeout=5))
    client = GeminiClient(vlm.gemini) if backend == "gemini" else OpenAICompatClient(vlm.openai)
    recs = {}
    for step in (0, 1, 2, 3):
        recs[step] = run_step(step, input_record(step, seed, recs), client, load_prompts(None),
                              options=StepOptions.from_vlm(vlm)).record
    q0 = recs[0]["meta"]["step0_region_expr"]["quality"]
    assert [r["kitti_index"] for r in recs[0]["regions"]] == [0, 1, 2]
    assert q0["mode"] == ("text" if reject else "structured")
    assert q0["fallback"] == ("structured_rejected" if reject else "")
    assert recs[3]["expressions"] and all(i["matched"] for e in recs[3]["expressions"] for i in e["instances"])
    # one refused request for the whole run, not one per step
    assert fake.status_counts.get(400, 0) == (1 if reject else 0)
    assert fake.calls == 4 + (1 if reject else 0)


def test_fake_answers_structured_prompts_with_valid_json(fake_vlm, png):
    from worker.steps import region_expr
    from worker.steps.options import AnswerContext

    seed = {"image_id": "a", "width": 320, "height": 200, "kitti_bboxes": [[20, 60, 120, 160, "Car"]]}
    prompt, _ = region_expr.build_prompt(seed, STRUCTURED_TEMPLATES["region_expr_structured"],
                                         ctx=AnswerContext(mode="structured"))
    text = openai_client(fake_vlm).generate(VLMRequest(image=png, prompt=prompt, response_schema=REGIONS)).text
    answer = json.loads(text)
    assert answer["objects"][0]["id"] == 0 and answer["objects"][0]["color"] == "red"
