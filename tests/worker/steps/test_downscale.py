"""``vlm.downscale_to_pixels``: boxes stay right when the model sees a smaller image.

A 0-1000 model's prompts do not change; a pixel-frame model (``xyxy_pixels``, Qwen2.5-VL's
``xyxy_smart_resize``) is shown boxes in pixels of the image it is sent, and its answers in that
frame come back as the original image's pixels in the records.
"""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from tests.support.doubles import FakeClient
from worker.coords import Frame, downscaled_size, smart_resize
from worker.steps import double_check, run_step
from worker.steps.options import AnswerContext, StepOptions
from worker.steps.prompts import PROMPT_TEMPLATES
from worker.steps.records import SOURCE

W, H = 2000, 1000
KITTI = [[200, 100, 600, 300, "Car"], [1000, 500, 1400, 800, "Van"], [1600, 0, 1800, 200, "Pedestrian"]]
LIMIT = 500_000  # -> sent at 1000x500


@pytest.fixture
def seed(tmp_path):
    p = tmp_path / "000001.jpg"
    Image.new("RGB", (W, H), (90, 90, 90)).save(p, format="JPEG")
    return {"image_id": "000001", "image_path": str(p), "width": W, "height": H, "kitti_bboxes": KITTI,
            "source": SOURCE, "pipeline_steps": []}


def options(tmp_path, model: str = "m", box_format: str = "auto", downscale: int = LIMIT) -> StepOptions:
    return StepOptions(structured_output="off", box_format=box_format, model=model, downscale_to_pixels=downscale,
                       image_cache_dir=str(tmp_path / "cache"))


def prompt_boxes(prompt: str) -> list[list[int]]:
    return [[int(v) for v in m.groups()] for m in re.finditer(r"\[(\d+), (\d+), (\d+), (\d+)\]", prompt)]


def answer(boxes: list[list[int]]) -> str:
    return json.dumps([{"bbox_2d": b, "type": k[4].lower(), "color": "grey", "description": f"grey {k[4].lower()}"}
                       for b, k in zip(boxes, KITTI, strict=True)])


def test_downscaled_size_keeps_aspect_and_limit():
    assert downscaled_size(W, H, LIMIT) == (1000, 500)
    assert downscaled_size(W, H, 0) == (W, H)
    assert downscaled_size(W, H, W * H) == (W, H)
    for w, h, n in [(3264, 2448, 1_000_000), (1242, 375, 65_536), (7, 9000, 65_536), (8000, 3, 100_000)]:
        sw, sh = downscaled_size(w, h, n)
        assert sw * sh <= n and sw >= 1 and sh >= 1
        assert abs(sw / sh - w / h) <= max(w / h, h / w) * 2 / min(sw, sh)


def test_a_0_1000_model_gets_the_same_prompt_and_records(tmp_path, seed):
    boxes_1000 = [[100, 100, 300, 300], [500, 500, 700, 800], [800, 0, 900, 200]]
    plain = run_step(0, seed, FakeClient(answer(boxes_1000)), PROMPT_TEMPLATES,
                     options=options(tmp_path, "qwen3-vl-8b", downscale=0))
    client = FakeClient(answer(boxes_1000))
    small = run_step(0, seed, client, PROMPT_TEMPLATES, options=options(tmp_path, "qwen3-vl-8b"))
    (req,) = client.requests
    assert req.image.sent == (1000, 500) and prompt_boxes(req.prompt) == boxes_1000
    assert small.record["regions"] == plain.record["regions"]
    assert [r["bbox"] for r in small.record["regions"]] == [k[:4] for k in KITTI]


def test_a_pixel_frame_model_sees_and_answers_in_the_sent_size(tmp_path, seed):
    client = FakeClient(answer([[100, 50, 300, 150], [500, 250, 700, 400], [800, 0, 900, 100]]))
    out = run_step(0, seed, client, PROMPT_TEMPLATES, options=options(tmp_path, box_format="xyxy_pixels"))
    (req,) = client.requests
    with Image.open(__import__("io").BytesIO(req.image.data)) as im:
        assert im.size == (1000, 500)
    # the prompt lists the KITTI boxes in pixels of the 1000x500 image it comes with
    assert prompt_boxes(req.prompt) == [[100, 50, 300, 150], [500, 250, 700, 400], [800, 0, 900, 100]]
    regions = out.record["regions"]
    assert [r["bbox"] for r in regions] == [k[:4] for k in KITTI]  # the original's pixels
    assert [r["bbox_2d"] for r in regions] == [[100, 100, 300, 300], [500, 500, 700, 800], [800, 0, 900, 200]]


def test_qwen25_boxes_are_in_the_smart_resize_of_the_sent_image(tmp_path, seed):
    sh, sw = smart_resize(500, 1000)  # of the sent image, not of the 2000x1000 original
    assert (sw, sh) != smart_resize(H, W)[::-1]
    expect = [[round(k[0] * sw / W), round(k[1] * sh / H), round(k[2] * sw / W), round(k[3] * sh / H)] for k in KITTI]
    client = FakeClient(answer(expect))
    out = run_step(0, seed, client, PROMPT_TEMPLATES, options=options(tmp_path, "Qwen/Qwen2.5-VL-7B-Instruct"))
    (req,) = client.requests
    assert prompt_boxes(req.prompt) == expect
    for region, k in zip(out.record["regions"], KITTI, strict=True):
        assert all(abs(a - b) <= 2 for a, b in zip(region["bbox"], k[:4], strict=True)), (region["bbox"], k)


def test_step3_prompt_uses_the_sent_frame_for_a_pixel_model():
    rec = {"image_id": "a", "width": W, "height": H,
           "expressions": [{"text": "the car", "instances": [{"bbox_2d": [100, 100, 300, 300]}]}]}
    conv = StepOptions(box_format="xyxy_pixels").convention
    full = double_check.build_prompt(rec, PROMPT_TEMPLATES["double_check"], ctx=AnswerContext(convention=conv))
    small = double_check.build_prompt(rec, PROMPT_TEMPLATES["double_check"],
                                      ctx=AnswerContext(convention=conv, downscale_to_pixels=LIMIT))
    assert prompt_boxes(full[0]) == [[200, 100, 600, 300]]
    assert prompt_boxes(small[0]) == [[100, 50, 300, 150]]


def test_frame_sent_size():
    f = Frame.for_image(W, H, LIMIT)
    assert f.sent == (1000, 500) and (f.width, f.height) == (W, H)
    assert Frame(W, H).sent == (W, H)
