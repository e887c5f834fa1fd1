"""``vlm.downscale_to_pixels`` through the real OpenAI SDK against the fake endpoint: what the
server decodes is the downscaled image, converted once for all of an image's calls, and the
boxes a pixel-frame model echoes back land on the original image's KITTI boxes."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw

from worker.clients.openai_compat import OpenAICompatClient
from worker.coords import downscaled_size, smart_resize
from worker.spec import OpenAISpec
from worker.steps import input_record, run_step
from worker.steps.options import StepOptions
from worker.steps.prompts import PROMPT_TEMPLATES
from worker.steps.records import SOURCE

W, H = 2400, 1200
KITTI = [[240, 600, 720, 1000, "Car"], [1400, 400, 1900, 1100, "Van"]]
MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"  # answers in pixels of the (smart-resized) image it is sent


def test_the_endpoint_decodes_the_downscaled_image_and_boxes_stay_right(fake_vlm, tmp_path):
    p = tmp_path / "frame.jpg"
    im = Image.new("RGB", (W, H), (120, 120, 120))
    draw = ImageDraw.Draw(im)
    for x1, y1, x2, y2, _ in KITTI:
        draw.rectangle([x1, y1, x2, y2], fill=(200, 30, 30))
    im.save(p, format="JPEG", quality=90)
    cache = tmp_path / "results" / ".image-cache"
    options = StepOptions(structured_output="off", model=MODEL, downscale_to_pixels=720_000,
                          image_cache_dir=str(cache))
    sent = downscaled_size(W, H, 720_000)
    assert sent == (1200, 600)
    client = OpenAICompatClient(OpenAISpec(base_url=fake_vlm.openai_base_url, model_name=MODEL, timeout=5))
    seed = {"image_id": "frame", "image_path": str(p), "width": W, "height": H, "kitti_bboxes": KITTI,
            "source": SOURCE, "pipeline_steps": []}
    records: dict[int, dict] = {}
    for step in (0, 1, 2, 3):
        records[step] = run_step(step, input_record(step, seed, records), client, PROMPT_TEMPLATES,
                                 options=options).record
    assert len(fake_vlm.requests) == 4
    for req in fake_vlm.requests:
        assert req.image_mime == "image/jpeg"
        with Image.open(io.BytesIO(req.image)) as got:
            assert got.size == sent
    assert f"the frame is {sent[0]} by {sent[1]} pixels" in records[1]["caption"]
    # step 0 showed the boxes in the frame the model sees: the smart-resize of the sent image
    rh, rw = smart_resize(sent[1], sent[0])
    for x1, y1, x2, y2, _ in KITTI:
        shown = [round(x1 * rw / W), round(y1 * rh / H), round(x2 * rw / W), round(y2 * rh / H)]
        assert f"{shown}" in fake_vlm.requests[0].prompt, (shown, fake_vlm.requests[0].prompt)
    # converted once: one cache entry, the bytes every call sent
    (entry,) = [x for x in cache.rglob("*") if x.is_file()]
    assert all(req.image == entry.read_bytes() for req in fake_vlm.requests)
    # the records speak of the original image
    assert (records[3]["width"], records[3]["height"]) == (W, H)
    for region, k in zip(records[0]["regions"], KITTI, strict=True):
        assert all(abs(a - b) <= 3 for a, b in zip(region["bbox"], k[:4], strict=True)), (region["bbox"], k)
    boxes = [i["bbox"] for e in records[3]["expressions"] for i in e["instances"]]
    assert boxes and all(any(all(abs(a - b) <= 3 for a, b in zip(box, k[:4], strict=True)) for k in KITTI)
                         for box in boxes)
