"""The offline teacher, driven through the real steps: prompt -> generate -> parse -> record."""

from __future__ import annotations

import json

import pytest
from PIL import Image, ImageDraw

from producer.demo import plan_scene, render_scene
from worker.clients.base import VLMClient, VLMRequest
from worker.clients.offline import OfflineClient, name_color
from worker.errors import PermanentClientError
from worker.images import load_payload
from worker.steps import input_record, run_step
from worker.steps.prompts import PROMPT_TEMPLATES
from worker.steps.records import deterministic

BACKGROUND = (128, 128, 128)
W, H = 620, 188


def draw_car(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], color: tuple[int, int, int]) -> None:
    """A car seen from behind: body, rear window, lights, plate and wheels, filling ``box``."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    draw.rectangle([x1 + w * 0.15, y1, x2 - w * 0.15, y1 + h * 0.45], fill=color)            # cabin
    draw.rectangle([x1 + w * 0.2, y1 + h * 0.06, x2 - w * 0.2, y1 + h * 0.4], fill=(36, 46, 60))  # glass
    draw.rectangle([x1, y1 + h * 0.42, x2, y2 - h * 0.12], fill=color)                       # body
    draw.rectangle([x1 + w * 0.04, y1 + h * 0.5, x1 + w * 0.2, y1 + h * 0.6], fill=(200, 20, 20))
    draw.rectangle([x2 - w * 0.2, y1 + h * 0.5, x2 - w * 0.04, y1 + h * 0.6], fill=(200, 20, 20))
    draw.rectangle([x1 + w * 0.4, y1 + h * 0.66, x2 - w * 0.4, y1 + h * 0.76], fill=(235, 235, 235))
    draw.rectangle([x1 + w * 0.04, y2 - h * 0.14, x1 + w * 0.22, y2], fill=(20, 20, 20))      # wheels
    draw.rectangle([x2 - w * 0.22, y2 - h * 0.14, x2 - w * 0.04, y2], fill=(20, 20, 20))


def draw_person(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], shirt: tuple[int, int, int]) -> None:
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    draw.ellipse([x1 + w * 0.35, y1, x2 - w * 0.35, y1 + h * 0.13], fill=(220, 175, 140))
    draw.rectangle([x1 + w * 0.2, y1 + h * 0.14, x2 - w * 0.2, y1 + h * 0.52], fill=shirt)
    draw.rectangle([x1 + w * 0.25, y1 + h * 0.52, x2 - w * 0.25, y2], fill=(40, 44, 70))


def scene(tmp_path, objects, *, name="scene.png", size=(W, H), background=BACKGROUND) -> dict:
    """Draw ``objects`` (``(kind, box, color)``) on a flat background; return the seed record."""
    im = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(im)
    for kind, box, color in objects:
        if color is None:
            continue  # a box over bare background
        if kind in ("Pedestrian", "Cyclist"):
            draw_person(draw, box, color)
        else:
            draw_car(draw, box, color)
    path = tmp_path / name
    im.save(path)
    return {
        "image_id": path.stem,
        "image_path": str(path),
        "width": size[0],
        "height": size[1],
        "kitti_bboxes": [[float(v) for v in box] + [kind] for kind, box, _ in objects],
        "pipeline_steps": [],
    }


def run(seed: dict, steps=(0, 1, 2, 3), client=None) -> dict:
    client = client or OfflineClient()
    records, outcomes = {}, {}
    for step in steps:
        out = run_step(step, input_record(step, seed, records), client, PROMPT_TEMPLATES)
        records[step] = out.record
        outcomes[step] = out
    return outcomes


RED, BLUE, WHITE = (190, 28, 30), (28, 62, 160), (238, 238, 234)
# Three cars at the same distance: left lane, center lane, right lane.
THREE_CARS = [
    ("Car", (170, 90, 230, 130), RED),
    ("Car", (280, 90, 340, 130), WHITE),
    ("Car", (390, 90, 450, 130), BLUE),
]


def test_is_a_vlm_client():
    client = OfflineClient(vlm_spec=None)
    assert isinstance(client, VLMClient)
    assert client.name == "offline"


def test_unknown_step_is_permanent(tmp_path):
    seed = scene(tmp_path, THREE_CARS)
    request = VLMRequest(image=load_payload(seed["image_path"]), prompt="hi", step="translate")
    with pytest.raises(PermanentClientError, match="unknown step"):
        OfflineClient().generate(request)


def test_step0_colors_lanes_and_every_box_matched(tmp_path):
    out = run(scene(tmp_path, THREE_CARS), steps=(0,))[0]
    assert out.response.model == "offline"
    assert out.response.finish_reason == "stop"
    assert out.response.usage["total_tokens"] > 0
    regions = out.record["regions"]
    assert [r["kitti_index"] for r in regions] == [0, 1, 2]
    assert out.record["meta"]["step0_region_expr"]["missed_kitti"] == []
    assert out.record["meta"]["step0_region_expr"]["repairs"] == []  # clean JSON, no repairs
    assert [r["color"] for r in regions] == ["red", "white", "blue"]
    assert [r["type"] for r in regions] == ["car", "car", "car"]
    assert "left lane" in regions[0]["description"]
    assert "center lane" in regions[1]["description"]
    assert "right lane" in regions[2]["description"]
    for r in regions:
        assert r["description"].startswith(f"{r['color']} car")
        assert len(r["description"].split()) < 15
    # the answer is the JSON array a model would write, boxes exactly as prompted
    answer = json.loads(out.response.text)
    assert [a["bbox_2d"] for a in answer] == [r["bbox_2d"] for r in regions]


@pytest.mark.parametrize(
    ("rgb", "name"),
    [
        ((190, 28, 30), "red"), ((28, 62, 160), "blue"), ((32, 112, 58), "green"),
        ((232, 192, 34), "yellow"), ((224, 112, 24), "orange"), ((104, 68, 42), "brown"),
        ((238, 238, 234), "white"), ((152, 156, 162), "silver"), ((98, 100, 104), "gray"),
        ((26, 26, 30), "black"),
    ],
)
def test_color_names_of_drawn_cars(rgb, name):
    im = Image.new("RGB", (120, 80), BACKGROUND)
    draw_car(ImageDraw.Draw(im), (10, 10, 110, 70), rgb)
    assert name_color(im.crop((22, 28, 98, 61))) == name  # the central part, as step 0 crops it


def test_color_of_people_comes_from_the_torso(tmp_path):
    seed = scene(tmp_path, [("Pedestrian", (100, 60, 130, 150), (230, 200, 40)),
                            ("Cyclist", (480, 70, 505, 140), (36, 74, 170))])
    regions = run(seed, steps=(0,))[0].record["regions"]
    assert [r["description"] for r in regions] == [
        "pedestrian in yellow on the left, close by",
        "cyclist in blue on the right, close by",
    ]


def test_look_alikes_get_a_relation(tmp_path):
    # two red cars in the center lane, a short way ahead, one twice as far (half the height);
    # two white cars side by side on the far left, same size
    seed = scene(tmp_path, [
        ("Car", (295, 80, 325, 100), RED),
        ("Car", (280, 100, 340, 140), RED),
        ("Car", (20, 60, 60, 90), WHITE),
        ("Car", (62, 60, 102, 90), WHITE),
    ])
    descriptions = [r["description"] for r in run(seed, steps=(0,))[0].record["regions"]]
    assert descriptions == [
        "farther red car in the center lane",
        "nearer red car in the center lane",
        "leftmost white car on the far left, a short way ahead",
        "rightmost white car on the far left, a short way ahead",
    ]


def test_caption_counts_brightness_and_nearest(tmp_path):
    objects = [*THREE_CARS, ("Car", (470, 100, 560, 160), RED), ("Pedestrian", (60, 60, 80, 110), WHITE)]
    caption = run(scene(tmp_path, objects), steps=(1,))[1].record["caption"]
    assert caption.startswith("A daytime street scene with four cars and one pedestrian; ")
    assert "The nearest is a red car in the right lane" in caption

    dark = scene(tmp_path, THREE_CARS[:1], name="night.png", background=(12, 12, 16))
    assert run(dark, steps=(1,))[1].record["caption"].startswith("A night-time street scene with one car;")

    empty = scene(tmp_path, [], name="empty.png")
    assert run(empty, steps=(1,))[1].record["caption"] == "A daytime street scene."


def test_without_boxes_the_caption_claims_no_absence(tmp_path):
    """An image without a label file is seeded with no boxes; its street may still be full of
    cars (the demo's demo_000002 is), so the caption says only what the pixels tell."""
    plan = plan_scene(2, seed=0)
    assert len(plan.objects) >= 2  # drawn, but the demo writes no label file for it
    path = tmp_path / "demo_000002.png"
    render_scene(plan).save(path)
    seed = {"image_id": path.stem, "image_path": str(path), "width": 1242, "height": 375,
            "kitti_bboxes": [], "pipeline_steps": []}
    caption = run(seed, steps=(1,))[1].record["caption"]
    assert caption == "A daytime street scene."
    for claim in ("no ", "nothing", "empty", "without", "vehicle", "people", "car"):
        assert claim not in caption.lower()


def test_step2_groups_cover_every_region(tmp_path):
    objects = [*THREE_CARS, ("Car", (470, 100, 560, 160), RED), ("Van", (40, 70, 110, 140), WHITE),
               ("Pedestrian", (590, 60, 610, 130), BLUE)]
    out = run(scene(tmp_path, objects), steps=(0, 1, 2))
    regions = out[0].record["regions"]
    expressions = out[2].record["expressions"]
    assert out[2].record["meta"]["step2_grounding_expr"]["unmatched_boxes"] == 0
    covered = {inst["region_index"] for e in expressions for inst in e["instances"]}
    assert covered == set(range(len(regions)))
    by_text = {e["text"]: sorted(inst["region_index"] for inst in e["instances"]) for e in expressions}
    assert by_text["the red cars"] == [0, 3]
    assert by_text["all the cars"] == [0, 1, 2, 3]
    assert by_text["all the vehicles"] == [0, 1, 2, 3, 4]
    assert by_text["the vehicles on the right"] == [2, 3]
    # a region in no group of two or more gets a line of its own, worded as its description
    assert by_text[regions[5]["description"]] == [5]
    assert len(by_text) == len(expressions)  # phrases are unique


def test_step3_drops_a_box_on_bare_background(tmp_path):
    # the Misc box covers flat background: nothing is there
    objects = [*THREE_CARS, ("Misc", (500, 20, 600, 60), None)]
    out = run(scene(tmp_path, objects))
    step2 = out[2].record["expressions"]
    step3 = out[3].record["expressions"]
    misc_box = out[0].record["regions"][3]["bbox_2d"]
    assert any(inst["bbox_2d"] == misc_box for e in step2 for inst in e["instances"])
    assert not any(inst["bbox_2d"] == misc_box for e in step3 for inst in e["instances"])
    report = out[3].record["meta"]["step3_double_check"]
    assert report["removed"] == 1
    assert report["dropped_expressions"] == 1  # its line held only that box, so it is omitted
    # everything else survives, verified
    kept = sorted(inst["region_index"] for e in step3 for inst in e["instances"])
    assert set(kept) == {0, 1, 2}
    assert all(e["verified"] for e in step3)


def test_step3_answer_is_empty_when_every_box_is_degenerate(tmp_path):
    seed = scene(tmp_path, [("Car", (100, 50, 160, 90), None)])
    hint = {"expressions": [{"text": "a car", "instances": [{"bbox_2d": [161, 265, 258, 478]},
                                                            {"bbox_2d": [500, 500, 501, 501]}]}]}
    request = VLMRequest(image=load_payload(seed["image_path"]), prompt="check", step="double_check", hint=hint)
    assert OfflineClient().generate(request).text == ""


def test_same_input_same_text(tmp_path):
    objects = [*THREE_CARS, ("Car", (470, 100, 560, 160), RED), ("Pedestrian", (60, 60, 90, 150), WHITE)]
    seed = scene(tmp_path, objects)
    first = run(seed)
    second = run(seed, client=OfflineClient())
    for step in (0, 1, 2, 3):
        assert first[step].response.text == second[step].response.text
        assert deterministic(first[step].record) == deterministic(second[step].record)


def test_names_the_colors_drawn_in_demo_scenes(tmp_path):
    """On the synthetic road scenes, the teacher names what was drawn (unoccluded vehicles)."""
    hits = total = 0
    for index in (0, 5, 6, 7, 8, 9):
        plan = plan_scene(index, seed=0)
        path = tmp_path / f"demo_{index}.png"
        render_scene(plan).save(path)
        vehicles = [o for o in plan.objects if o.kind in ("Car", "Van", "Truck") and o.occluded == 0]
        seed = {"image_id": path.stem, "image_path": str(path), "width": 1242, "height": 375,
                "kitti_bboxes": [[*o.bbox, o.kind] for o in vehicles], "pipeline_steps": []}
        if not vehicles:
            continue
        regions = run(seed, steps=(0,))[0].record["regions"]
        assert len(regions) == len(vehicles)
        for r in regions:
            total += 1
            hits += r["color"] == vehicles[r["kitti_index"]].color
    assert total >= 10
    assert hits >= 0.85 * total


def test_names_colors_at_dusk_as_in_daylight(tmp_path):
    """Black, gray, silver and white differ only in brightness: the same scenes drawn at half
    the light (the demo's dusk) get the names the drawn colors have, not darker ones."""
    from dataclasses import replace

    from worker.clients.offline import exposure_gain

    hits = total = 0
    light_called_dark = []
    for index in (0, 5, 6, 7, 8, 9):
        plan = replace(plan_scene(index, seed=0), brightness=0.5, dusk=True)
        path = tmp_path / f"dusk_{index}.png"
        image = render_scene(plan)
        image.save(path)
        assert exposure_gain(image) > 1.5  # the scene is recognised as dim
        vehicles = [o for o in plan.objects if o.kind in ("Car", "Van", "Truck") and o.occluded == 0]
        seed = {"image_id": path.stem, "image_path": str(path), "width": 1242, "height": 375,
                "kitti_bboxes": [[*o.bbox, o.kind] for o in vehicles], "pipeline_steps": []}
        for r in run(seed, steps=(0,))[0].record["regions"]:
            drawn = vehicles[r["kitti_index"]].color
            total += 1
            hits += r["color"] == drawn
            if drawn in ("white", "silver") and r["color"] in ("black", "gray"):
                light_called_dark.append((index, drawn, r["color"]))
    assert total >= 10
    assert not light_called_dark
    assert hits >= 0.9 * total


def test_demo_dusk_scene_names_its_light_cars_light(tmp_path):
    """demo_000004 (dusk): its silver car was called black and its white car gray."""
    plan = plan_scene(4, seed=0)
    assert plan.dusk
    path = tmp_path / "demo_000004.png"
    render_scene(plan).save(path)
    seed = {"image_id": path.stem, "image_path": str(path), "width": 1242, "height": 375,
            "kitti_bboxes": [[*o.bbox, o.kind] for o in plan.objects], "pipeline_steps": []}
    regions = run(seed, steps=(0,))[0].record["regions"]
    named = [(plan.objects[r["kitti_index"]].color, r["color"]) for r in regions]
    assert ("silver", "silver") in named and ("white", "white") in named
    assert all(drawn == said for drawn, said in named), named


def test_exposure_gain_leaves_daylight_alone_and_is_capped():
    assert exposure_gain_of((180, 190, 200)) == 1.0
    dim = exposure_gain_of((60, 70, 80))
    assert 1.9 < dim < 2.5
    assert exposure_gain_of((5, 5, 5)) == 2.5  # night: brightened at most 2.5 times


def exposure_gain_of(rgb: tuple[int, int, int]) -> float:
    from worker.clients.offline import exposure_gain

    return exposure_gain(Image.new("RGB", (64, 64), rgb))
