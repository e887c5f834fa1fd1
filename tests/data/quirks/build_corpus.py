"""Writes the quirk corpus: model answers as real VLMs emit them, with the right parse of each.

Run ``python tests/data/quirks/build_corpus.py`` to rewrite ``step{0,1,2,3}.jsonl``. The JSONL
files are the corpus; this script is how they were written. Every case's ``expect`` comes from
how the answer was *built* (which objects the model meant, in which coordinate convention),
never from running a parser, so the corpus can judge the parsers.

A case::

    {"id", "step", "mode": "text"|"structured", "model", "box_format", "quirks": [...],
     "finish_reason", "block_reason", "answer", "input": {...},
     "expect": {"error": null|"empty"|"blocked"|"truncated_empty"|"parse", ...}}

``expect`` for step 0: ``regions: [{kitti_index, description, bbox_2d}]`` (bbox_2d canonical:
xyxy in 0-1000 of the original image). Step 2: ``expressions: [{text, regions: [index|null],
bbox_2d: [...]}]`` (null = a box that joins no region and must be flagged). Step 3:
``expressions: [{text, bbox_ids, bbox_2d}]`` and ``missing`` (expression indices an answer cut
by the token limit never reached).

Scenes are KITTI-like (1242x375) and others; the "square" scene holds two boxes that are each
other's transpose, where an x/y mix-up cannot be told from the boxes alone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

HERE = Path(__file__).parent

# --------------------------------------------------------------------------- scenes

SCENES = {
    "kitti": {
        "width": 1242, "height": 375,
        "kitti": [
            [387.6, 181.5, 423.8, 203.1, "Car"],
            [614.2, 178.3, 727.5, 228.6, "Car"],
            [712.4, 143.0, 810.7, 307.9, "Pedestrian"],
            [0.0, 190.1, 150.3, 280.4, "Van"],
            [1010.5, 160.2, 1068.9, 260.0, "Cyclist"],
            [640.0, 182.0, 760.0, 232.0, "Car"],
        ],
        "objects": [
            ("sedan", "white", "White sedan far ahead in the center lane"),
            ("sedan", "silver", "Silver sedan in the right lane"),
            ("pedestrian", "black", "Pedestrian in a black jacket crossing the road"),
            ("van", "blue", "Blue van parked on the left shoulder"),
            ("cyclist", "red", "Cyclist in red riding on the right"),
            ("hatchback", "gray", "Gray hatchback just behind the silver sedan"),
        ],
    },
    "wide": {
        "width": 1000, "height": 500,
        "kitti": [[100, 100, 300, 200, "Car"], [500, 250, 700, 400, "Van"], [800, 0, 900, 100, "Pedestrian"]],
        "objects": [
            ("sedan", "white", "White sedan in the center lane"),
            ("van", "red", "Red van behind the sedan"),
            ("pedestrian", "black", "Person in black near the crosswalk"),
        ],
    },
    "hd": {
        "width": 1920, "height": 1080,
        "kitti": [
            [120, 560, 420, 760, "Car"], [470, 590, 610, 700, "Car"], [660, 600, 760, 680, "Car"],
            [900, 520, 980, 760, "Pedestrian"], [1010, 530, 1080, 750, "Pedestrian"],
            [1200, 540, 1500, 740, "Truck"], [1550, 600, 1700, 700, "Car"], [1760, 500, 1850, 800, "Cyclist"],
        ],
        "objects": [
            ("SUV", "black", "Black SUV in the left lane"),
            ("sedan", "white", "White sedan ahead in the center lane"),
            ("sedan", "blue", "Blue sedan far ahead"),
            ("pedestrian", "yellow", "Pedestrian in a yellow coat on the crosswalk"),
            ("pedestrian", "green", "Woman in green walking beside the crosswalk"),
            ("truck", "orange", "Orange truck stopped on the right"),
            ("sedan", "red", "Red sedan parked on the right"),
            ("cyclist", "white", "Cyclist in white at the right edge"),
        ],
    },
    "square": {
        "width": 1000, "height": 1000,
        "kitti": [[100, 300, 200, 400, "Car"], [300, 100, 400, 200, "Pedestrian"], [600, 600, 900, 800, "Car"]],
        "objects": [
            ("car", "green", "Green car in the lower left"),
            ("pedestrian", "orange", "Person in orange near the top"),
            ("sedan", "black", "Black sedan at the bottom right"),
        ],
    },
    "dense": {
        "width": 1242, "height": 375,
        "kitti": [[40 + 110 * k, 190, 150 + 110 * k, 250, "Car"] for k in range(10)],
        "objects": [("car", c, f"{c.capitalize()} car parked {n} from the left")
                    for c, n in zip(["white", "black", "red", "blue", "gray", "silver", "green", "white", "black",
                                     "yellow"],
                                    ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth",
                                     "ninth", "tenth"], strict=True)],
    },
}


def p1000(scene: dict, i: int) -> list[int]:
    """The canonical box of KITTI box ``i`` as TAO sends it: int(v / size * 1000)."""
    x1, y1, x2, y2 = scene["kitti"][i][:4]
    w, h = scene["width"], scene["height"]
    return [int(x1 / w * 1000), int(y1 / h * 1000), int(x2 / w * 1000), int(y2 / h * 1000)]


def smart_resize(h: int, w: int) -> tuple[int, int]:
    """Qwen2.5-VL's resize (28-px factor, default pixel limits), written out independently."""
    hb, wb = max(28, round(h / 28) * 28), max(28, round(w / 28) * 28)
    if hb * wb > 16384 * 28 * 28:
        beta = math.sqrt(h * w / (16384 * 28 * 28))
        hb, wb = math.floor(h / beta / 28) * 28, math.floor(w / beta / 28) * 28
    elif hb * wb < 4 * 28 * 28:
        beta = math.sqrt(4 * 28 * 28 / (h * w))
        hb, wb = math.ceil(h * beta / 28) * 28, math.ceil(w * beta / 28) * 28
    return hb, wb


def in_fmt(scene: dict, box: list[float], fmt: str) -> list:
    """A canonical box written as a model of that convention writes it."""
    x1, y1, x2, y2 = box
    w, h = scene["width"], scene["height"]
    if fmt == "xyxy_1000":
        return [round(x1), round(y1), round(x2), round(y2)]
    if fmt == "yxyx_1000":
        return [round(y1), round(x1), round(y2), round(x2)]
    if fmt == "norm1":
        return [round(x1 / 1000, 3), round(y1 / 1000, 3), round(x2 / 1000, 3), round(y2 / 1000, 3)]
    if fmt == "pixels":
        return [round(x1 * w / 1000), round(y1 * h / 1000), round(x2 * w / 1000), round(y2 * h / 1000)]
    if fmt == "smart":
        rh, rw = smart_resize(h, w)
        return [round(x1 * rw / 1000), round(y1 * rh / 1000), round(x2 * rw / 1000), round(y2 * rh / 1000)]
    if fmt == "xywh":
        return [round(x1), round(y1), round(x2 - x1), round(y2 - y1)]
    raise ValueError(fmt)


def back(scene: dict, vals: list[float], fmt: str) -> list[int]:
    """What a box written in ``fmt`` means, canonically (the truth for that box)."""
    w, h = scene["width"], scene["height"]
    if fmt == "xyxy_1000":
        x1, y1, x2, y2 = vals
    elif fmt == "yxyx_1000":
        y1, x1, y2, x2 = vals
    elif fmt == "norm1":
        x1, y1, x2, y2 = (v * 1000 for v in vals)
    elif fmt == "pixels":
        x1, y1, x2, y2 = vals[0] * 1000 / w, vals[1] * 1000 / h, vals[2] * 1000 / w, vals[3] * 1000 / h
    elif fmt == "smart":
        rh, rw = smart_resize(h, w)
        x1, y1, x2, y2 = vals[0] * 1000 / rw, vals[1] * 1000 / rh, vals[2] * 1000 / rw, vals[3] * 1000 / rh
    else:
        raise ValueError(fmt)
    x1, x2 = sorted((min(max(x1, 0), 1000), min(max(x2, 0), 1000)))
    y1, y2 = sorted((min(max(y1, 0), 1000), min(max(y2, 0), 1000)))
    return [round(x1), round(y1), round(x2), round(y2)]


CASES: dict[int, list[dict]] = {0: [], 1: [], 2: [], 3: []}


def add(step: int, quirks: list[str], answer: str, inp: dict, expect: dict, *, mode: str = "text",
        model: str = "gpt-4o", box_format: str = "auto", finish: str = "stop", block: str = "") -> None:
    n = len(CASES[step]) + 1
    CASES[step].append({
        "id": f"s{step}-{mode[0]}-{n:03d}", "step": step, "mode": mode, "model": model, "box_format": box_format,
        "quirks": quirks, "finish_reason": finish, "block_reason": block, "answer": answer, "input": inp,
        "expect": {"error": None, **expect},
    })


# --------------------------------------------------------------------------- step 0

def s0_input(scene: dict) -> dict:
    return {"width": scene["width"], "height": scene["height"], "kitti_bboxes": scene["kitti"]}


def obj(scene: dict, i: int, *, box=None, fmt="xyxy_1000", box_key="bbox_2d", type_key="type", color_key="color",
        desc_key="description", desc=None, extra=None) -> dict:
    kind, color, d = scene["objects"][i]
    o: dict = {}
    if box_key:
        o[box_key] = in_fmt(scene, p1000(scene, i), fmt) if box is None else box
    if type_key:
        o[type_key] = kind
    if color_key:
        o[color_key] = color
    if desc_key:
        o[desc_key] = d if desc is None else desc
    if extra:
        o.update(extra)
    return o


def truth0(scene: dict, i: int, *, box=None, desc=None) -> dict:
    return {"kitti_index": i, "description": scene["objects"][i][2] if desc is None else desc,
            "bbox_2d": p1000(scene, i) if box is None else box}


def arr(objs: list[dict], indent=None) -> str:
    return json.dumps(objs, indent=indent, ensure_ascii=False)


def lines_arr(objs: list[dict]) -> str:
    return "[\n" + ",\n".join("  " + json.dumps(o, ensure_ascii=False) for o in objs) + "\n]"


def build_step0_text() -> None:
    K, W, H, S, D = (SCENES[k] for k in ("kitti", "wide", "hd", "square", "dense"))
    allk = list(range(len(K["kitti"])))

    def all_objs(sc, idx=None, **kw):
        idx = range(len(sc["kitti"])) if idx is None else idx
        return [obj(sc, i, **kw) for i in idx]

    def all_truth(sc, idx=None):
        idx = range(len(sc["kitti"])) if idx is None else idx
        return [truth0(sc, i) for i in idx]

    for sc, model in ((K, "gpt-4o"), (W, "qwen3-vl-235b-a22b-instruct"), (H, "nemotron-nano-12b-v2-vl")):
        add(0, ["clean"], arr(all_objs(sc)), s0_input(sc), {"regions": all_truth(sc)}, model=model)
    add(0, ["code_fence"], "```json\n" + arr(all_objs(K), 2) + "\n```", s0_input(K), {"regions": all_truth(K)})
    add(0, ["code_fence_no_language"], "```\n" + lines_arr(all_objs(W)) + "\n```", s0_input(W),
        {"regions": all_truth(W)})
    add(0, ["prose", "code_fence"], "Here are the descriptions for each object:\n\n```json\n" + arr(all_objs(H), 2)
        + "\n```\n\nLet me know if you need anything else!", s0_input(H), {"regions": all_truth(H)})
    add(0, ["prose"], "Sure! Based on the image, here is the JSON array:\n" + arr(all_objs(K))
        + "\nEach description focuses on the most distinctive feature.", s0_input(K), {"regions": all_truth(K)})
    add(0, ["prose_after_unfenced"], lines_arr(all_objs(W)) + "\n\nNote: the pedestrian is partly occluded.",
        s0_input(W), {"regions": all_truth(W)})
    sq = arr(all_objs(K, [0, 1, 3])).replace('"', "'")
    add(0, ["single_quotes"], sq, s0_input(K), {"regions": all_truth(K, [0, 1, 3])})
    pyl = ("[{'bbox_2d': (100, 200, 300, 400), 'type': 'sedan', 'color': 'white', 'description': "
           "\"White sedan in the center lane\", 'occluded': False}, {'bbox_2d': (500, 500, 700, 800), 'type': 'van', "
           "'color': 'red', 'description': 'Red van behind the sedan', 'occluded': None}]")
    add(0, ["python_literal", "single_quotes", "apostrophe"], pyl, s0_input(W), {"regions": all_truth(W, [0, 1])},
        model="llama-4-scout")
    apo = ("[{'bbox_2d': [800, 0, 900, 200], 'type': 'pedestrian', 'color': 'black', "
           "'description': 'Person in black near the driver's side'}]")
    add(0, ["single_quotes", "apostrophe_inside"], apo, s0_input(W),
        {"regions": [truth0(W, 2, desc="Person in black near the driver's side")]})
    tc = arr(all_objs(W)).replace("}", ",}").replace("]", ",]")
    add(0, ["trailing_comma"], tc, s0_input(W), {"regions": all_truth(W)})
    full = arr(all_objs(K), 2)
    cut = full[: full.index('"description": "Cyclist')] + '"description": "Cyclist in re'
    add(0, ["truncated_array"], cut, s0_input(K), {"regions": all_truth(K, [0, 1, 2, 3])}, finish="length")
    full = "```json\n" + arr(all_objs(H), 2)
    cut = full[: full.index('"bbox_2d"', full.index("Orange truck"))] + '"bbox_2d": [625, 5'
    add(0, ["truncated_array", "code_fence_unclosed"], cut, s0_input(H), {"regions": all_truth(H, range(6))},
        finish="MAX_TOKENS", model="gemini-2.5-flash")
    add(0, ["truncated_array", "mid_number"], arr(all_objs(W))[:-25], s0_input(W), {"regions": all_truth(W, [0, 1])},
        finish="length")
    add(0, ["ndjson"], "\n".join(json.dumps(o) for o in all_objs(K)), s0_input(K), {"regions": all_truth(K)})
    add(0, ["wrapped_in_object"], json.dumps({"objects": all_objs(H)}), s0_input(H), {"regions": all_truth(H)})
    add(0, ["wrapped_in_object", "code_fence"], "```json\n" + json.dumps({"regions": all_objs(W)}, indent=2) + "\n```",
        s0_input(W), {"regions": all_truth(W)})
    add(0, ["double_wrapped"], json.dumps({"response": {"objects": all_objs(K)}}), s0_input(K),
        {"regions": all_truth(K)})
    keyed = {f"object_{i + 1}": obj(K, i) for i in allk}
    add(0, ["keyed_objects"], json.dumps(keyed, indent=2), s0_input(K), {"regions": all_truth(K)})
    dup = ('[{"bbox_2d": [100, 200, 300, 400], "type": "car", "type": "sedan", "color": "white", '
           '"description": "White sedan in the center lane"}, {"bbox_2d": [500, 500, 700, 800], "type": "van", '
           '"color": "red", "color": "red", "description": "Red van behind the sedan"}]')
    add(0, ["duplicate_key"], dup, s0_input(W), {"regions": all_truth(W, [0, 1])})
    loop = all_objs(W, [0, 1]) + [obj(W, 1)] * 30
    text = arr(loop, 2)
    add(0, ["repetition_loop", "truncated_array"], text[: len(text) - 40], s0_input(W),
        {"regions": all_truth(W, [0, 1])}, finish="length")
    rep = obj(W, 2, desc="Person in black near the crosswalk near the crosswalk near the crosswalk near the crosswalk")
    add(0, ["repetition_in_string"], arr([obj(W, 0), rep]), s0_input(W),
        {"regions": [truth0(W, 0), truth0(W, 2, desc="Person in black near the crosswalk")]})
    add(0, ["alias_bbox"], arr(all_objs(H, box_key="bbox")), s0_input(H), {"regions": all_truth(H)})
    add(0, ["alias_box_2d_xy"], arr(all_objs(W, box_key="box_2d")), s0_input(W), {"regions": all_truth(W)},
        model="gpt-4.1-mini")
    add(0, ["alias_label"], arr(all_objs(K, type_key="label", color_key="colour")), s0_input(K),
        {"regions": all_truth(K)})
    add(0, ["alias_category_desc"], arr(all_objs(W, type_key="category", desc_key="referring_expression")),
        s0_input(W), {"regions": all_truth(W)})
    strs = [obj(K, i, box=json.dumps(p1000(K, i))) for i in allk]
    add(0, ["box_as_string"], arr(strs), s0_input(K), {"regions": all_truth(K)})
    strs = [obj(W, i, box=", ".join(str(v) for v in p1000(W, i))) for i in range(3)]
    add(0, ["box_as_csv_string"], arr(strs), s0_input(W), {"regions": all_truth(W)})
    strs = [obj(W, i, box=[str(v) for v in p1000(W, i)]) for i in range(3)]
    add(0, ["numbers_as_strings"], arr(strs), s0_input(W), {"regions": all_truth(W)})
    add(0, ["norm1_floats"], arr(all_objs(K, fmt="norm1")), s0_input(K),
        {"regions": [truth0(K, i, box=back(K, in_fmt(K, p1000(K, i), "norm1"), "norm1")) for i in allk]})
    add(0, ["pixel_coordinates"], arr(all_objs(H, fmt="pixels")), s0_input(H),
        {"regions": [truth0(H, i, box=back(H, in_fmt(H, p1000(H, i), "pixels"), "pixels")) for i in range(8)]},
        model="gpt-4o")
    add(0, ["pixel_coordinates", "kitti_width"], arr(all_objs(K, fmt="pixels")), s0_input(K),
        {"regions": [truth0(K, i, box=back(K, in_fmt(K, p1000(K, i), "pixels"), "pixels")) for i in allk]},
        model="pixtral-12b")
    add(0, ["gemini_yx", "box_2d"], arr(all_objs(K, fmt="yxyx_1000", box_key="box_2d")), s0_input(K),
        {"regions": all_truth(K)}, model="gemini-2.5-flash")
    add(0, ["gemini_yx", "box_2d", "code_fence"], "```json\n" + arr(all_objs(H, fmt="yxyx_1000", box_key="box_2d"), 2)
        + "\n```", s0_input(H), {"regions": all_truth(H)}, model="gemini-2.0-flash")
    add(0, ["gemini_yx", "bbox_2d_key"], arr(all_objs(D, fmt="yxyx_1000")), s0_input(D), {"regions": all_truth(D)},
        model="gemini-3.1-flash-lite-preview")
    add(0, ["yx_order", "non_gemini"], arr(all_objs(W, fmt="yxyx_1000")), s0_input(W), {"regions": all_truth(W)},
        model="gpt-4o-mini")
    add(0, ["qwen25_smart_resize"], arr(all_objs(K, fmt="smart")), s0_input(K),
        {"regions": [truth0(K, i, box=back(K, in_fmt(K, p1000(K, i), "smart"), "smart")) for i in allk]},
        model="Qwen/Qwen2.5-VL-72B-Instruct")
    add(0, ["qwen25_smart_resize", "hd"], arr(all_objs(H, fmt="smart")), s0_input(H),
        {"regions": [truth0(H, i, box=back(H, in_fmt(H, p1000(H, i), "smart"), "smart")) for i in range(8)]},
        model="qwen2.5-vl-7b-instruct")
    add(0, ["qwen25_answers_1000"], arr(all_objs(W)), s0_input(W), {"regions": all_truth(W)},
        model="Qwen2.5-VL-32B-Instruct")
    add(0, ["box_format_config_pixels"], arr(all_objs(H, fmt="pixels")), s0_input(H),
        {"regions": [truth0(H, i, box=back(H, in_fmt(H, p1000(H, i), "pixels"), "pixels")) for i in range(8)]},
        model="my-finetune", box_format="xyxy_pixels")
    add(0, ["box_format_config_yx"], arr(all_objs(S, fmt="yxyx_1000")), s0_input(S), {"regions": all_truth(S)},
        model="paligemma-ft", box_format="yxyx_1000")
    three = [obj(W, 0), obj(W, 1, box=[500, 500, 700]), obj(W, 2)]
    add(0, ["three_number_box"], arr(three), s0_input(W), {"regions": all_truth(W, [0, 2])})
    nested = [obj(W, 0, box=[[100, 200], [300, 400]]), obj(W, 1, box=[[500, 500, 700, 800]]), obj(W, 2)]
    add(0, ["nested_box"], arr(nested), s0_input(W), {"regions": all_truth(W)})
    five = [obj(W, 0, box=[100, 200, 300, 400, 0.93]), obj(W, 1), obj(W, 2)]
    add(0, ["five_number_box"], arr(five), s0_input(W), {"regions": all_truth(W, [1, 2])})
    nan = '[{"bbox_2d": [NaN, 200, 300, 400], "type": "sedan", "color": "white", "description": "x"}, ' + \
        json.dumps(obj(W, 1))[0:] + "]"
    add(0, ["nan_box"], nan, s0_input(W), {"regions": all_truth(W, [1])})
    nul = [obj(W, 0, box=None), obj(W, 1, box=[None, None, None, None]), obj(W, 2)]
    nul[0]["bbox_2d"] = None
    add(0, ["null_box"], arr(nul), s0_input(W), {"regions": all_truth(W, [2])})
    sw = [obj(W, 0, box=[300, 400, 100, 200]), obj(W, 1, box=[700, 500, 500, 800]), obj(W, 2)]
    add(0, ["swapped_corners"], arr(sw), s0_input(W), {"regions": all_truth(W)})
    ov = [obj(W, 0), obj(W, 1), obj(W, 2, box=[800, -3, 900, 204]), obj(W, 1, box=[500, 500, 700, 1006])]
    add(0, ["overshoot_clamped"], arr(ov[:3]), s0_input(W), {"regions": [
        *all_truth(W, [0, 1]), truth0(W, 2, box=[800, 0, 900, 204])]})
    add(0, ["overshoot_clamped", "bottom_edge"], arr([ov[0], ov[3]]), s0_input(W), {"regions": [
        truth0(W, 0), truth0(W, 1, box=[500, 500, 700, 1000])]})
    ghost = obj(W, 0, box=[0, 850, 60, 1000], desc="A dog on the sidewalk")
    add(0, ["hallucinated_object"], arr([obj(W, 0), ghost, obj(W, 1), obj(W, 2)]), s0_input(W),
        {"regions": all_truth(W)})
    again = obj(K, 1, desc="Another silver car")
    add(0, ["duplicate_object"], arr([*all_objs(K, [0, 1]), again, *all_objs(K, [2, 3, 4, 5])]), s0_input(K),
        {"regions": all_truth(K)})
    off = [obj(H, i, box=[v + (4 if k % 2 else -3) for k, v in enumerate(p1000(H, i))]) for i in range(8)]
    add(0, ["slightly_off_boxes"], arr(off), s0_input(H),
        {"regions": [truth0(H, i, box=[max(0, v + (4 if k % 2 else -3)) for k, v in enumerate(p1000(H, i))])
                     for i in range(8)]})
    occl = [obj(K, 5, box=[v + 2 for v in p1000(K, 5)]), obj(K, 1, box=[v - 1 for v in p1000(K, 1)])]
    add(0, ["overlapping_kitti_boxes", "answer_order"], arr(occl), s0_input(K),
        {"regions": [truth0(K, 1, box=[v - 1 for v in p1000(K, 1)]), truth0(K, 5, box=[v + 2 for v in p1000(K, 5)])]})
    add(0, ["skipped_boxes"], arr(all_objs(D, [0, 2, 4, 6, 8])), s0_input(D),
        {"regions": all_truth(D, [0, 2, 4, 6, 8])})
    add(0, ["dense_scene"], lines_arr(all_objs(D)), s0_input(D), {"regions": all_truth(D)})
    add(0, ["dense_scene", "gemini_yx"], arr(all_objs(D, fmt="yxyx_1000", box_key="box_2d")), s0_input(D),
        {"regions": all_truth(D)}, model="gemini-2.5-flash-lite")
    add(0, ["empty_answer"], "", s0_input(W), {"error": "empty"})
    add(0, ["whitespace_answer"], "  \n\n ", s0_input(W), {"error": "empty"})
    add(0, ["empty_array"], "[]", s0_input(W), {"error": "parse"})
    add(0, ["empty_fence"], "```json\n```", s0_input(W), {"error": "parse"})
    add(0, ["refusal_text"], "I'm sorry, but I can't help with identifying people in images.", s0_input(K),
        {"error": "parse"})
    add(0, ["safety_blocked"], "", s0_input(K), {"error": "blocked"}, finish="SAFETY", model="gemini-2.5-flash")
    add(0, ["safety_partial_text"], '[{"bbox_2d": [311, 484, 341, 541], "type": "sedan"', s0_input(K),
        {"error": "blocked"}, finish="SAFETY", model="gemini-2.5-flash")
    add(0, ["prompt_blocked"], "", s0_input(K), {"error": "blocked"}, finish="", block="PROHIBITED_CONTENT",
        model="gemini-2.5-flash")
    add(0, ["recitation"], "", s0_input(H), {"error": "blocked"}, finish="RECITATION", model="gemini-2.5-pro")
    add(0, ["content_filter"], "", s0_input(H), {"error": "blocked"}, finish="content_filter")
    add(0, ["thinking_used_budget"], "", s0_input(H), {"error": "truncated_empty"}, finish="MAX_TOKENS",
        model="gemini-2.5-flash")
    add(0, ["think_tags"], "<think>\nThere are three objects. The van is red.\n</think>\n" + arr(all_objs(W)),
        s0_input(W), {"regions": all_truth(W)}, model="qwen3-vl-30b-a3b-thinking")
    com = "[\n  // the white car\n  " + json.dumps(obj(W, 0)) + ",\n  // the van\n  " + json.dumps(obj(W, 1)) + "\n]"
    add(0, ["comments"], com, s0_input(W), {"regions": all_truth(W, [0, 1])})
    unq = ("[{bbox_2d: [100, 200, 300, 400], type: \"sedan\", color: \"white\", description: "
           "\"White sedan in the center lane\"}]")
    add(0, ["unquoted_keys"], unq, s0_input(W), {"regions": all_truth(W, [0])})
    add(0, ["markdown_table"], "| object | description |\n|---|---|\n| sedan | White sedan in the center lane |",
        s0_input(W), {"error": "parse"})
    ids = [obj(K, i, extra={"id": i + 1}) for i in allk]
    add(0, ["ids_in_text_mode"], arr(ids), s0_input(K), {"regions": all_truth(K)})
    nodesc = [obj(W, 0), obj(W, 1, desc_key=None)]
    add(0, ["missing_description"], arr(nodesc), s0_input(W), {"regions": [truth0(W, 0), truth0(W, 1, desc="")]})
    nonascii = [obj(W, 0, desc="Weißer Wagen auf der mittleren Spur"), obj(W, 1, desc="赤いバン")]
    add(0, ["non_ascii"], arr(nonascii), s0_input(W), {"regions": [
        truth0(W, 0, desc="Weißer Wagen auf der mittleren Spur"), truth0(W, 1, desc="赤いバン")]})
    nl = arr([obj(W, 0)])[:-3].replace("center lane", "center\nlane") + '"}]'
    add(0, ["raw_newline_in_string"], nl, s0_input(W),
        {"regions": [truth0(W, 0, desc="White sedan in the center\nlane")]})
    two = "First attempt:\n" + arr([obj(W, 0)]) + "\nCorrected:\n" + arr(all_objs(W))
    add(0, ["two_arrays"], two, s0_input(W), {"regions": all_truth(W)})
    dictbox = [obj(W, 0, box={"x1": 100, "y1": 200, "x2": 300, "y2": 400}),
               obj(W, 1, box={"xmin": 500, "ymin": 500, "xmax": 700, "ymax": 800})]
    add(0, ["box_as_dict"], arr(dictbox), s0_input(W), {"regions": all_truth(W, [0, 1])})
    json_mode_fence = "```json\n" + json.dumps(all_objs(K)) + "\n```"
    add(0, ["json_mode_fence"], json_mode_fence, s0_input(K), {"regions": all_truth(K)}, model="gemini-2.5-flash")
    floats = [obj(W, i, box=[v + 0.4 for v in p1000(W, i)]) for i in range(3)]
    add(0, ["float_coordinates"], arr(floats), s0_input(W), {"regions": all_truth(W)})
    bad = arr(all_objs(W)).replace('"bbox_2d"', '"bbox_2\ufffd"').replace('"description"', '"descriptoin"')
    add(0, ["garbled_keys"], bad, s0_input(W), {"regions": all_truth(W)})
    add(0, ["xywh_boxes"], arr(all_objs(H, fmt="xywh")), s0_input(H), {"regions": all_truth(H)},
        model="gpt-4o")
    mixed = [obj(K, i, fmt="yxyx_1000" if i % 2 else "xyxy_1000", box_key="box_2d") for i in allk]
    add(0, ["mixed_conventions", "gemini_yx"], arr(mixed), s0_input(K), {"regions": all_truth(K)},
        model="gemini-2.5-flash")
    between = obj(D, 3, box=[round((p1000(D, 3)[0] + p1000(D, 4)[0]) / 2), p1000(D, 3)[1],
                             round((p1000(D, 3)[2] + p1000(D, 4)[2]) / 2), p1000(D, 3)[3]], desc="A car")
    add(0, ["box_between_two_targets"], arr([obj(D, 0), between, obj(D, 9)]), s0_input(D),
        {"regions": all_truth(D, [0, 9])})
    part = obj(H, 5, box=[625, 600, 660, 640], desc="The truck's front wheel")
    add(0, ["part_of_an_object"], arr([obj(H, 0), part]), s0_input(H), {"regions": all_truth(H, [0])})
    add(0, ["pixels_equal_1000_space"], arr(all_objs(S, fmt="pixels")), s0_input(S), {"regions": all_truth(S)})
    # adversarial: two boxes that are each other's transpose
    add(0, ["transposed_targets", "xy"], arr(all_objs(S)), s0_input(S), {"regions": all_truth(S)}, model="gpt-4o")
    add(0, ["transposed_targets", "gemini_yx", "box_2d"], arr(all_objs(S, fmt="yxyx_1000", box_key="box_2d")),
        s0_input(S), {"regions": all_truth(S)}, model="gemini-2.5-flash")
    bare = [obj(S, i, fmt="yxyx_1000", type_key=None, desc="an object", color_key=None) for i in (0, 1)]
    add(0, ["transposed_targets", "no_type", "ambiguous"], arr(bare), s0_input(S), {"error": "parse"},
        model="gpt-4o")


def build_step0_structured() -> None:
    K, W, H, D = (SCENES[k] for k in ("kitti", "wide", "hd", "dense"))

    def sobj(sc, i, id_value=None, **kw):
        kind, color, d = sc["objects"][i]
        o = {"id": i if id_value is None else id_value, "type": kind, "color": color, "description": d}
        o.update(kw)
        return o

    def all_truth(sc, idx=None):
        idx = range(len(sc["kitti"])) if idx is None else idx
        return [truth0(sc, i) for i in idx]

    for sc, model in ((K, "gemini-2.5-flash"), (W, "gpt-4o"), (H, "qwen3-vl-235b-a22b-instruct"),
                      (D, "gemini-3.1-flash-lite-preview")):
        add(0, ["clean"], json.dumps({"objects": [sobj(sc, i) for i in range(len(sc["kitti"]))]}), s0_input(sc),
            {"regions": all_truth(sc)}, mode="structured", model=model)
    body = json.dumps({"objects": [sobj(K, i) for i in range(6)]}, indent=2)
    add(0, ["code_fence_in_json_mode"], "```json\n" + body + "\n```", s0_input(K), {"regions": all_truth(K)},
        mode="structured", model="gemini-2.5-flash")
    add(0, ["bare_array"], json.dumps([sobj(W, i) for i in range(3)]), s0_input(W), {"regions": all_truth(W)},
        mode="structured")
    add(0, ["id_as_string"], json.dumps({"objects": [sobj(W, i, id_value=str(i)) for i in range(3)]}), s0_input(W),
        {"regions": all_truth(W)}, mode="structured")
    add(0, ["id_prefixed"], json.dumps({"objects": [sobj(W, i, id_value=f"box_{i}") for i in range(3)]}),
        s0_input(W), {"regions": all_truth(W)}, mode="structured", model="llama-4-maverick")
    add(0, ["id_hash"], json.dumps({"objects": [sobj(H, i, id_value=f"#{i}") for i in range(8)]}), s0_input(H),
        {"regions": all_truth(H)}, mode="structured")
    add(0, ["id_float"], json.dumps({"objects": [sobj(W, i, id_value=float(i)) for i in range(3)]}), s0_input(W),
        {"regions": all_truth(W)}, mode="structured")
    add(0, ["unknown_id"], json.dumps({"objects": [sobj(W, 0), sobj(W, 1), sobj(W, 2, id_value=7)]}), s0_input(W),
        {"regions": all_truth(W, [0, 1])}, mode="structured")
    add(0, ["duplicate_id"], json.dumps({"objects": [sobj(W, 0), sobj(W, 0, description="again"), sobj(W, 2)]}),
        s0_input(W), {"regions": all_truth(W, [0, 2])}, mode="structured")
    add(0, ["skipped_ids"], json.dumps({"objects": [sobj(H, i) for i in (0, 3, 5)]}), s0_input(H),
        {"regions": all_truth(H, [0, 3, 5])}, mode="structured")
    full = json.dumps({"objects": [sobj(H, i) for i in range(8)]}, indent=2)
    cut = full[: full.index("Orange truck") + 4]
    add(0, ["truncated"], cut, s0_input(H), {"regions": all_truth(H, range(5))}, mode="structured", finish="length")
    keyed = {str(i): {k: v for k, v in sobj(K, i).items() if k != "id"} for i in range(6)}
    add(0, ["keyed_by_id"], json.dumps(keyed), s0_input(K), {"regions": all_truth(K)}, mode="structured")
    add(0, ["prose_around"], "Here is the JSON:\n" + json.dumps({"objects": [sobj(W, i) for i in range(3)]})
        + "\nDone.", s0_input(W), {"regions": all_truth(W)}, mode="structured", model="llava-onevision")
    legacy = arr([obj(K, i) for i in range(6)])
    add(0, ["schema_ignored_tao_answer"], legacy, s0_input(K), {"regions": all_truth(K)}, mode="structured",
        model="old-vllm-model")
    legacy = arr([obj(W, i, fmt="yxyx_1000", box_key="box_2d") for i in range(3)])
    add(0, ["schema_ignored_gemini_yx"], legacy, s0_input(W), {"regions": all_truth(W)}, mode="structured",
        model="gemini-2.0-flash")
    add(0, ["ids_with_coordinates"], json.dumps({"objects": [sobj(W, i, bbox_2d=p1000(W, i)) for i in range(3)]}),
        s0_input(W), {"regions": all_truth(W)}, mode="structured")
    add(0, ["alias_keys"], json.dumps({"objects": [{"object_id": i, "label": W["objects"][i][0],
                                                    "colour": W["objects"][i][1],
                                                    "desc": W["objects"][i][2]} for i in range(3)]}),
        s0_input(W), {"regions": all_truth(W)}, mode="structured")
    add(0, ["empty_objects"], json.dumps({"objects": []}), s0_input(W), {"error": "parse"}, mode="structured")
    add(0, ["empty_answer"], "", s0_input(W), {"error": "empty"}, mode="structured")
    add(0, ["safety_blocked"], "", s0_input(W), {"error": "blocked"}, mode="structured", finish="SAFETY",
        model="gemini-2.5-flash")
    add(0, ["refusal"], json.dumps({"objects": [], "note": "I cannot identify people."}), s0_input(K),
        {"error": "parse"}, mode="structured")
    add(0, ["thinking_used_budget"], "", s0_input(K), {"error": "truncated_empty"}, mode="structured",
        finish="MAX_TOKENS", model="gemini-2.5-flash")
    loop = json.dumps({"objects": [sobj(W, 0), sobj(W, 1)] + [sobj(W, 1)] * 20})[:-30]
    add(0, ["repetition_loop", "truncated"], loop, s0_input(W), {"regions": all_truth(W, [0, 1])},
        mode="structured", finish="length")
    tq = json.dumps({"objects": [sobj(W, i) for i in range(3)]}).replace('"', "'")
    add(0, ["single_quotes"], tq, s0_input(W), {"regions": all_truth(W)}, mode="structured",
        model="local-gguf-model")
    rep = sobj(W, 0, description="White sedan in the center lane in the center lane in the center lane in the "
                                 "center lane")
    add(0, ["repetition_in_string"], json.dumps({"objects": [rep]}), s0_input(W),
        {"regions": [truth0(W, 0, desc="White sedan in the center lane")]}, mode="structured")
    add(0, ["one_based_ids"], json.dumps({"objects": [sobj(K, i, id_value=i + 1) for i in range(6)]}), s0_input(K),
        {"regions": all_truth(K)}, mode="structured")
    add(0, ["one_based_ids", "subset", "types_tell"],
        json.dumps({"objects": [sobj(W, i, id_value=i + 1) for i in (1, 2)]}), s0_input(W),
        {"regions": all_truth(W, [1, 2])}, mode="structured")
    keyed = {f"object_{i + 1}": {k: v for k, v in sobj(W, i).items() if k != "id"} for i in range(3)}
    add(0, ["keyed_by_name_not_id"], json.dumps(keyed), s0_input(W), {"error": "parse"}, mode="structured")
    bad = json.dumps({"objects": [sobj(W, i) for i in range(3)]}, ensure_ascii=False).replace(
        '"description"', '"d\ufffdscription"').replace('"type"', '"typ\ufffd"')
    add(0, ["garbled_keys_bad_utf8"], bad, s0_input(W), {"regions": all_truth(W)}, mode="structured")


# --------------------------------------------------------------------------- step 1

def build_step1() -> None:
    inp = {"width": 1242, "height": 375}
    cap = "A suburban street in daylight with two cars ahead and a cyclist on the right."
    add(1, ["clean"], cap, inp, {"caption": cap})
    add(1, ["think_tags"], "<think>Let me look at the scene.</think>\n" + cap, inp, {"caption": cap})
    add(1, ["label"], "Caption: " + cap, inp, {"caption": cap})
    add(1, ["code_fence"], "```\n" + cap + "\n```", inp, {"caption": cap})
    add(1, ["empty_answer"], "", inp, {"error": "empty"})
    add(1, ["refusal"], "I'm sorry, but I can't describe this image.", inp, {"error": "parse"})
    add(1, ["safety_blocked"], "", inp, {"error": "blocked"}, finish="SAFETY", model="gemini-2.5-flash")
    add(1, ["thinking_used_budget"], "", inp, {"error": "truncated_empty"}, finish="MAX_TOKENS",
        model="gemini-2.5-flash")


# --------------------------------------------------------------------------- step 2

def regions_of(scene: dict, idx=None) -> list[dict]:
    idx = range(len(scene["kitti"])) if idx is None else idx
    out = []
    for i in idx:
        kind, color, d = scene["objects"][i]
        out.append({"bbox": [float(v) for v in scene["kitti"][i][:4]], "bbox_2d": p1000(scene, i), "type": kind,
                    "color": color, "description": d, "kitti_index": i})
    return out


def s2_input(scene: dict, idx=None, caption: str = "") -> dict:
    inp = {"width": scene["width"], "height": scene["height"], "regions": regions_of(scene, idx)}
    if caption:
        inp["caption"] = caption
    return inp


def rbox(scene: dict, idx, i: int) -> list[int]:
    """Canonical box of region ``i`` of a step-2 input built from ``idx``."""
    idx = list(range(len(scene["kitti"]))) if idx is None else list(idx)
    return p1000(scene, idx[i])


def ex2(text: str, regions: list, boxes: list) -> dict:
    return {"text": text, "regions": regions, "bbox_2d": boxes}


def build_step2_text() -> None:
    K, W, H, S, D = (SCENES[k] for k in ("kitti", "wide", "hd", "square", "dense"))

    def b(sc, i, fmt="xyxy_1000"):
        return in_fmt(sc, p1000(sc, i), fmt)

    def line(phrase, boxes):
        return f"{phrase}: {json.dumps(boxes)}"

    # groups for the kitti scene (region index == kitti index)
    KG = [("the cars in the right lane", [1, 5]), ("the pedestrian crossing the road", [2]),
          ("all the vehicles", [0, 1, 3, 5]), ("the cyclist on the right", [4])]
    HG = [("the pedestrians on the crosswalk", [3, 4]), ("the cars driving ahead", [1, 2]),
          ("the vehicles parked or stopped on the right", [5, 6]), ("the black SUV in the left lane", [0]),
          ("the cyclist at the right edge", [7])]
    WG = [("the white sedan", [0]), ("the vehicles on the road", [0, 1]), ("the person in black", [2])]

    def answer(sc, groups, fmt="xyxy_1000", render=None):
        render = render or (lambda p, bs: line(p, bs))
        return "\n".join(render(p, [b(sc, i, fmt) for i in m]) for p, m in groups)

    def truth(sc, groups, fmt="xyxy_1000"):
        return [ex2(p, list(m), [back(sc, b(sc, i, fmt), fmt) for i in m]) for p, m in groups]

    add(2, ["clean"], answer(K, KG), s2_input(K), {"expressions": truth(K, KG)})
    add(2, ["clean", "hd"], answer(H, HG), s2_input(H, caption="A busy crossing."), {"expressions": truth(H, HG)},
        model="qwen3-vl-235b-a22b-instruct")
    add(2, ["code_fence"], "```\n" + answer(W, WG) + "\n```", s2_input(W), {"expressions": truth(W, WG)})
    add(2, ["code_fence_language"], "```text\n" + answer(K, KG) + "\n```", s2_input(K), {"expressions": truth(K, KG)})
    add(2, ["prose"], "Here are the groups I found:\n\n" + answer(H, HG) + "\n\nThese groupings are based on "
        "lane position and type.", s2_input(H), {"expressions": truth(H, HG)})
    add(2, ["bullets"], answer(W, WG, render=lambda p, bs: "- " + line(p, bs)), s2_input(W),
        {"expressions": truth(W, WG)})
    add(2, ["numbered"], "\n".join(f"{k + 1}. {line(p, [b(K, i) for i in m])}" for k, (p, m) in enumerate(KG)),
        s2_input(K), {"expressions": truth(K, KG)})
    add(2, ["markdown_bold"], answer(H, HG, render=lambda p, bs: f"**{p}**: {json.dumps(bs)}"), s2_input(H),
        {"expressions": truth(H, HG)})
    add(2, ["quoted_phrases"], answer(W, WG, render=lambda p, bs: f'"{p}": {json.dumps(bs)},'), s2_input(W),
        {"expressions": truth(W, WG)})
    add(2, ["single_brackets"], answer(W, [("the white sedan", [0]), ("the person in black", [2])],
                                       render=lambda p, bs: f"{p}: {json.dumps(bs[0])}"), s2_input(W),
        {"expressions": truth(W, [("the white sedan", [0]), ("the person in black", [2])])})
    add(2, ["boxes_without_outer_brackets"],
        answer(K, KG, render=lambda p, bs: f"{p}: " + ", ".join(json.dumps(x) for x in bs)), s2_input(K),
        {"expressions": truth(K, KG)})
    add(2, ["boxes_as_strings"], answer(W, WG, render=lambda p, bs: f"{p}: {json.dumps([json.dumps(x) for x in bs])}"),
        s2_input(W), {"expressions": truth(W, WG)})
    add(2, ["trailing_commas"], answer(K, KG, render=lambda p, bs: f"{p}: {json.dumps(bs)[:-1]},]"), s2_input(K),
        {"expressions": truth(K, KG)})
    add(2, ["tuples"], answer(W, WG, render=lambda p, bs: f"{p}: [" + ", ".join(f"({', '.join(map(str, x))})"
                                                                                 for x in bs) + "]"),
        s2_input(W), {"expressions": truth(W, WG)})
    add(2, ["json_dict"], json.dumps({p: [b(H, i) for i in m] for p, m in HG}, indent=2), s2_input(H),
        {"expressions": truth(H, HG)}, model="gemini-2.5-flash")
    add(2, ["json_list"], "```json\n" + json.dumps([{"phrase": p, "boxes": [b(K, i) for i in m]} for p, m in KG],
                                                   indent=2) + "\n```", s2_input(K), {"expressions": truth(K, KG)})
    add(2, ["json_groups_bbox_key"], json.dumps({"groups": [{"phrase": p, "bbox_2d": [b(W, i) for i in m]}
                                                            for p, m in WG]}), s2_input(W),
        {"expressions": truth(W, WG)})
    full = answer(H, HG)
    cut = full[: full.rindex("[", 0, full.index("the cyclist")) - 30]
    tail_group = HG[: [k for k, (p, _) in enumerate(HG) if full.index(p) < len(cut)][-1]]
    add(2, ["truncated_last_line"], cut, s2_input(H), {"expressions": truth(H, tail_group)}, finish="length")
    unclosed = answer(W, WG)[:-1]
    add(2, ["unclosed_last_line"], unclosed, s2_input(W), {"expressions": truth(W, WG)})
    rep = answer(W, WG[:2]) + "\n" + "\n".join([line(WG[1][0], [b(W, i) for i in WG[1][1]])] * 25)
    add(2, ["repetition_loop"], rep, s2_input(W), {"expressions": truth(W, WG[:2])})
    dupl = answer(K, [("the cars", [0, 1]), ("the pedestrian", [2]), ("the cars", [5])])
    add(2, ["duplicate_phrase"], dupl, s2_input(K), {"expressions": truth(K, [("the cars", [0, 1, 5]),
                                                                             ("the pedestrian", [2])])})
    add(2, ["gemini_yx"], answer(H, HG, fmt="yxyx_1000"), s2_input(H), {"expressions": truth(H, HG)},
        model="gemini-2.5-flash")
    add(2, ["gemini_yx", "kitti"], answer(K, KG, fmt="yxyx_1000"), s2_input(K), {"expressions": truth(K, KG)},
        model="gemini-2.5-pro")
    add(2, ["pixel_coordinates"], answer(H, HG, fmt="pixels"), s2_input(H), {"expressions": truth(H, HG, "pixels")})
    add(2, ["norm1_floats"], answer(K, KG, fmt="norm1"), s2_input(K), {"expressions": truth(K, KG, "norm1")})
    add(2, ["qwen25_smart_resize"], answer(K, KG, fmt="smart"), s2_input(K), {"expressions": truth(K, KG, "smart")},
        model="qwen2.5-vl-72b-instruct")
    add(2, ["qwen25_smart_resize", "hd"], answer(H, HG, fmt="smart"), s2_input(H),
        {"expressions": truth(H, HG, "smart")}, model="Qwen2.5-VL-7B-Instruct")
    three = f"the white sedan: [[100, 200, 300]]\n{line('the vehicles on the road', [b(W, 0), b(W, 1)])}"
    add(2, ["three_number_box"], three, s2_input(W), {"expressions": truth(W, [("the vehicles on the road", [0, 1])])})
    corners = "the white sedan: [[[100, 200], [300, 400]]]\nthe person in black: [[800, 0], [900, 200]]"
    add(2, ["corner_pairs"], corners, s2_input(W), {"expressions": truth(W, [("the white sedan", [0]),
                                                                            ("the person in black", [2])])})
    halluc = line("the vehicles on the road", [b(W, 0), b(W, 1), [20, 850, 90, 990]])
    add(2, ["hallucinated_box"], halluc, s2_input(W), {"expressions": [
        ex2("the vehicles on the road", [0, 1, None], [b(W, 0), b(W, 1), [20, 850, 90, 990]])]})
    off = answer(H, HG, render=lambda p, bs: line(p, [[v + 3 for v in x] for x in bs]))
    add(2, ["slightly_off_boxes"], off, s2_input(H), {"expressions": [
        ex2(p, list(m), [[v + 3 for v in b(H, i)] for i in m]) for p, m in HG]})
    occl = line("the car just behind the silver sedan", [[v + 2 for v in b(K, 5)]]) + "\n" + \
        line("the silver sedan", [[v - 2 for v in b(K, 1)]])
    add(2, ["overlapping_regions"], occl, s2_input(K), {"expressions": [
        ex2("the car just behind the silver sedan", [5], [[v + 2 for v in b(K, 5)]]),
        ex2("the silver sedan", [1], [[v - 2 for v in b(K, 1)]])]})
    add(2, ["empty_answer"], "", s2_input(W), {"error": "empty"})
    add(2, ["refusal"], "I'm sorry, I can't group these objects.", s2_input(W), {"error": "parse"})
    add(2, ["safety_blocked"], "", s2_input(W), {"error": "blocked"}, finish="SAFETY", model="gemini-2.5-flash")
    add(2, ["thinking_used_budget"], "", s2_input(H), {"error": "truncated_empty"}, finish="MAX_TOKENS",
        model="gemini-2.5-flash")
    add(2, ["group_labels"], "\n".join(f"Group {k + 1}: {line(p, [b(K, i) for i in m])}"
                                       for k, (p, m) in enumerate(KG)),
        s2_input(K), {"expressions": truth(K, KG)})
    colon = line("note: the white sedan", [b(W, 0)])
    add(2, ["colon_in_phrase"], colon, s2_input(W), {"expressions": truth(W, [("note: the white sedan", [0])])})
    add(2, ["arrow_separator"], answer(W, WG, render=lambda p, bs: f"{p} -> {json.dumps(bs)}"), s2_input(W),
        {"expressions": truth(W, WG)})
    add(2, ["dash_separator"], answer(W, WG, render=lambda p, bs: f"{p} - {json.dumps(bs)}"), s2_input(W),
        {"expressions": truth(W, WG)})
    add(2, ["think_tags"], "<think>\nGroup by lane.\n</think>\n" + answer(K, KG), s2_input(K),
        {"expressions": truth(K, KG)}, model="qwen3-vl-30b-a3b-thinking")
    add(2, ["text_after_boxes"], answer(W, WG, render=lambda p, bs: f"{line(p, bs)} ({len(bs)} objects)"),
        s2_input(W), {"expressions": truth(W, WG)})
    add(2, ["float_coordinates"], answer(W, WG, render=lambda p, bs: line(p, [[v + 0.25 for v in x] for x in bs])),
        s2_input(W), {"expressions": truth(W, WG)})
    nan = "the white sedan: [[NaN, 200, 300, 400]]\n" + line("the person in black", [b(W, 2)])
    add(2, ["nan_box"], nan, s2_input(W), {"expressions": truth(W, [("the person in black", [2])])})
    add(2, ["no_boxes_at_all"], "the white sedan: []\nthe vehicles: []", s2_input(W), {"error": "parse"})
    add(2, ["same_region_twice_in_group"], line("the vehicles on the road", [b(W, 0), b(W, 0), b(W, 1)]),
        s2_input(W), {"expressions": truth(W, [("the vehicles on the road", [0, 1])])})
    add(2, ["dense_scene"], "\n".join([line("the parked cars", [b(D, i) for i in range(10)]),
                                       line("the white cars", [b(D, 0), b(D, 7)]),
                                       line("the black cars", [b(D, 1), b(D, 8)])]),
        s2_input(D), {"expressions": truth(D, [("the parked cars", list(range(10))), ("the white cars", [0, 7]),
                                                ("the black cars", [1, 8])])})
    add(2, ["dense_scene", "gemini_yx"], "\n".join([line("the parked cars", [b(D, i, "yxyx_1000") for i in range(10)]),
                                                    line("the red car", [b(D, 2, "yxyx_1000")])]),
        s2_input(D), {"expressions": truth(D, [("the parked cars", list(range(10))), ("the red car", [2])])},
        model="gemini-2.5-flash")
    add(2, ["swapped_corners"], line("the white sedan", [[300, 400, 100, 200]]), s2_input(W),
        {"expressions": truth(W, [("the white sedan", [0])])})
    add(2, ["overshoot_clamped"], line("the person in black", [[800, -4, 900, 203]]), s2_input(W),
        {"expressions": [ex2("the person in black", [2], [[800, 0, 900, 203]])]})
    add(2, ["blank_lines_and_headers"], "## Groups\n\n" + answer(W, WG).replace("\n", "\n\n") + "\n\n---",
        s2_input(W), {"expressions": truth(W, WG)})
    add(2, ["transposed_targets", "xy"], "\n".join([line("the green car", [b(S, 0)]), line("the person", [b(S, 1)]),
                                                   line("the cars", [b(S, 0), b(S, 2)])]),
        s2_input(S), {"expressions": truth(S, [("the green car", [0]), ("the person", [1]), ("the cars", [0, 2])])})
    add(2, ["caption_echo_prose"], "caption: A busy street.\n" + answer(W, WG), s2_input(W, caption="A busy street."),
        {"expressions": truth(W, WG)})
    add(2, ["mixed_quotes_phrase"],
        "'the white sedan': [[100, 200, 300, 400]]\n“the person in black”: [[800, 0, 900, 200]]",
        s2_input(W), {"expressions": truth(W, [("the white sedan", [0]), ("the person in black", [2])])})
    add(2, ["all_regions_one_line_flat"], "vehicles: [100, 200, 300, 400], [500, 500, 700, 800]", s2_input(W),
        {"expressions": truth(W, [("vehicles", [0, 1])])})
    add(2, ["hallucinated_line_only"], line("a dog", [[20, 850, 90, 990]]), s2_input(W),
        {"expressions": [ex2("a dog", [None], [[20, 850, 90, 990]])]})
    add(2, ["box_format_config_pixels"], answer(K, KG, fmt="pixels"), s2_input(K),
        {"expressions": truth(K, KG, "pixels")}, model="internvl3-78b", box_format="xyxy_pixels")
    echo = "\n".join(f"{p}: {json.dumps([K['objects'][i][2] + ':' + str(b(K, i)) for i in m])}" for p, m in KG)
    add(2, ["prompt_chunks_echoed"], echo, s2_input(K), {"expressions": truth(K, KG)})
    add(2, ["xywh_boxes"], answer(H, HG, fmt="xywh"), s2_input(H), {"expressions": truth(H, HG)})
    mixed = "\n".join(line(p, [b(K, i, "yxyx_1000" if k % 2 else "xyxy_1000") for i in m])
                      for k, (p, m) in enumerate(KG))
    add(2, ["mixed_conventions", "gemini_yx"], mixed, s2_input(K), {"expressions": truth(K, KG)},
        model="gemini-2.5-flash")
    add(2, ["phrase_with_digits"], line("the 2 vehicles on the road", [b(W, 0), b(W, 1)]), s2_input(W),
        {"expressions": truth(W, [("the 2 vehicles on the road", [0, 1])])})


def build_step2_structured() -> None:
    K, W, H = (SCENES[k] for k in ("kitti", "wide", "hd"))

    def g(p, ids):
        return {"phrase": p, "box_ids": ids}

    def tr(sc, groups):
        return [ex2(p, list(m), [p1000(sc, i) for i in m]) for p, m in groups]

    KG = [("the cars in the right lane", [1, 5]), ("the pedestrian crossing the road", [2]),
          ("all the vehicles", [0, 1, 3, 5]), ("the cyclist on the right", [4])]
    HG = [("the pedestrians on the crosswalk", [3, 4]), ("the cars driving ahead", [1, 2]),
          ("the vehicles parked or stopped on the right", [5, 6])]
    WG = [("the white sedan", [0]), ("the vehicles on the road", [0, 1])]
    for sc, groups, model in ((K, KG, "gemini-2.5-flash"), (H, HG, "gpt-4o"), (W, WG, "qwen3-vl-8b-instruct")):
        add(2, ["clean"], json.dumps({"groups": [g(p, m) for p, m in groups]}), s2_input(sc),
            {"expressions": tr(sc, groups)}, mode="structured", model=model)
    add(2, ["code_fence_in_json_mode"], "```json\n" + json.dumps({"groups": [g(p, m) for p, m in KG]}, indent=2)
        + "\n```", s2_input(K), {"expressions": tr(K, KG)}, mode="structured", model="gemini-2.5-flash")
    add(2, ["bare_list"], json.dumps([g(p, m) for p, m in HG]), s2_input(H), {"expressions": tr(H, HG)},
        mode="structured")
    add(2, ["ids_as_strings"], json.dumps({"groups": [g(p, [str(i) for i in m]) for p, m in KG]}), s2_input(K),
        {"expressions": tr(K, KG)}, mode="structured")
    add(2, ["ids_prefixed"], json.dumps({"groups": [g(p, [f"id {i}" for i in m]) for p, m in WG]}), s2_input(W),
        {"expressions": tr(W, WG)}, mode="structured")
    add(2, ["unknown_id"], json.dumps({"groups": [g("the vehicles on the road", [0, 1, 9])]}), s2_input(W),
        {"expressions": tr(W, [("the vehicles on the road", [0, 1])])}, mode="structured")
    add(2, ["only_unknown_ids"], json.dumps({"groups": [g("ghosts", [11, 12])]}), s2_input(W), {"error": "parse"},
        mode="structured")
    add(2, ["duplicate_id_in_group"], json.dumps({"groups": [g("the vehicles on the road", [0, 0, 1])]}),
        s2_input(W), {"expressions": tr(W, [("the vehicles on the road", [0, 1])])}, mode="structured")
    add(2, ["other_keys"], json.dumps({"groups": [{"text": p, "ids": m} for p, m in HG]}), s2_input(H),
        {"expressions": tr(H, HG)}, mode="structured")
    add(2, ["keyed_by_phrase"], json.dumps({p: m for p, m in KG}), s2_input(K), {"expressions": tr(K, KG)},
        mode="structured")
    full = json.dumps({"groups": [g(p, m) for p, m in KG]}, indent=2)
    cut = full[: full.index("the cyclist") + 5]
    add(2, ["truncated"], cut, s2_input(K), {"expressions": tr(K, KG[:3])}, mode="structured", finish="length")
    add(2, ["prose_around"], "Groups:\n" + json.dumps({"groups": [g(p, m) for p, m in WG]}) + "\nThanks",
        s2_input(W), {"expressions": tr(W, WG)}, mode="structured")
    tao = "\n".join(f"{p}: {json.dumps([p1000(K, i) for i in m])}" for p, m in KG)
    add(2, ["schema_ignored_tao_answer"], tao, s2_input(K), {"expressions": tr(K, KG)}, mode="structured",
        model="old-vllm-model")
    add(2, ["empty_groups"], json.dumps({"groups": []}), s2_input(W), {"error": "parse"}, mode="structured")
    add(2, ["empty_answer"], "", s2_input(W), {"error": "empty"}, mode="structured")
    add(2, ["safety_blocked"], "", s2_input(W), {"error": "blocked"}, mode="structured", finish="SAFETY",
        model="gemini-2.5-flash")
    add(2, ["duplicate_phrase"], json.dumps({"groups": [g("the cars", [0, 1]), g("the cars", [5])]}), s2_input(K),
        {"expressions": tr(K, [("the cars", [0, 1, 5])])}, mode="structured")
    add(2, ["single_id_not_list"], json.dumps({"groups": [{"phrase": "the white sedan", "box_ids": 0}]}),
        s2_input(W), {"expressions": tr(W, [("the white sedan", [0])])}, mode="structured")
    add(2, ["repetition_loop"], json.dumps({"groups": [g(p, m) for p, m in WG] + [g(*WG[1])] * 20})[:-20],
        s2_input(W), {"expressions": tr(W, WG)}, mode="structured", finish="length")
    add(2, ["one_based_ids"], json.dumps({"groups": [g(p, [i + 1 for i in m]) for p, m in KG]}), s2_input(K),
        {"expressions": tr(K, KG)}, mode="structured")
    bad = json.dumps({"gr\ufffdups": [{"phras\ufffd": p, "box_\ufffdds": m} for p, m in WG]}, ensure_ascii=False)
    add(2, ["garbled_keys_bad_utf8"], bad, s2_input(W), {"expressions": tr(W, WG)}, mode="structured")


# --------------------------------------------------------------------------- step 3

def exprs_of(scene: dict, groups: list[tuple[str, list[int]]], image_id: str = "img") -> list[dict]:
    out, k = [], 0
    for e, (phrase, members) in enumerate(groups):
        inst = []
        for i in members:
            x1, y1, x2, y2 = scene["kitti"][i][:4]
            inst.append({"bbox_id": f"{image_id}/box_{k}", "bbox": [float(x1), float(y1), float(x2), float(y2)],
                         "bbox_2d": p1000(scene, i), "bbox_score": 0.9, "region_index": i, "matched": True})
            k += 1
        out.append({"expression_id": f"{image_id}/expr_{e}", "text": phrase, "instances": inst, "verified": False})
    return out


def s3_input(scene: dict, groups) -> dict:
    return {"width": scene["width"], "height": scene["height"], "expressions": exprs_of(scene, groups)}


def ex3(text: str, ids: list[int], boxes: list) -> dict:
    return {"text": text, "bbox_ids": [f"img/box_{k}" for k in ids], "bbox_2d": boxes}


def build_step3_text() -> None:
    K, W, H, S = (SCENES[k] for k in ("kitti", "wide", "hd", "square"))
    KG = [("the cars in the right lane", [1, 5]), ("the pedestrian crossing the road", [2]),
          ("all the vehicles", [0, 1, 3, 5]), ("the cyclist on the right", [4])]
    HG = [("the pedestrians on the crosswalk", [3, 4]), ("the cars driving ahead", [1, 2]),
          ("the vehicles parked or stopped on the right", [5, 6]), ("the black SUV in the left lane", [0]),
          ("the cyclist at the right edge", [7])]
    WG = [("the white sedan", [0]), ("the vehicles on the road", [0, 1]), ("the person in black", [2])]

    def ids_of(groups):
        """expression index -> list of bbox ordinal ids."""
        out, k = [], 0
        for _, m in groups:
            out.append(list(range(k, k + len(m))))
            k += len(m)
        return out

    def b(sc, i, fmt="xyxy_1000"):
        return in_fmt(sc, p1000(sc, i), fmt)

    def line(p, boxes):
        return f"{p}: {json.dumps(boxes)}"

    def keep_all(sc, groups, fmt="xyxy_1000", render=None):
        render = render or line
        return "\n".join(render(p, [b(sc, i, fmt) for i in m]) for p, m in groups)

    def truth_all(sc, groups, keep=None):
        """Every group kept whole (or only the members in ``keep``: {expr index: [member positions]})."""
        ids = ids_of(groups)
        out = []
        for e, (p, m) in enumerate(groups):
            pos = range(len(m)) if keep is None else keep.get(e, [])
            if not list(pos):
                continue
            out.append(ex3(p, [ids[e][j] for j in pos], [p1000(sc, m[j]) for j in pos]))
        return out

    add(3, ["clean_keep_all"], keep_all(K, KG), s3_input(K, KG), {"expressions": truth_all(K, KG), "missing": []})
    add(3, ["clean_keep_all", "hd"], keep_all(H, HG), s3_input(H, HG), {"expressions": truth_all(H, HG), "missing": []},
        model="qwen3-vl-235b-a22b-instruct")
    rm = "\n".join([line(KG[0][0], [b(K, 1)]), line(KG[1][0], [b(K, 2)]), line(KG[2][0], [b(K, 0), b(K, 1), b(K, 3)]),
                    line(KG[3][0], [b(K, 4)])])
    add(3, ["remove_box"], rm, s3_input(K, KG),
        {"expressions": truth_all(K, KG, {0: [0], 1: [0], 2: [0, 1, 2], 3: [0]}),
                                                  "missing": []})
    drop = "\n".join([line(KG[0][0], [b(K, 1), b(K, 5)]), line(KG[2][0], [b(K, i) for i in KG[2][1]])])
    add(3, ["omit_group"], drop, s3_input(K, KG), {"expressions": truth_all(K, KG, {0: [0, 1], 2: [0, 1, 2, 3]}),
                                                    "missing": []})
    moved = [v + 6 for v in b(W, 1)]
    upd = "\n".join([line(WG[0][0], [b(W, 0)]), line(WG[1][0], [b(W, 0), moved]), line(WG[2][0], [b(W, 2)])])
    add(3, ["update_box"], upd, s3_input(W, WG), {"expressions": [ex3(WG[0][0], [0], [b(W, 0)]),
                                                                 ex3(WG[1][0], [1, 2], [b(W, 0), moved]),
                                                                 ex3(WG[2][0], [3], [b(W, 2)])], "missing": []})
    add3 = "\n".join([line(WG[0][0], [b(W, 0), [20, 850, 90, 990]]), line(WG[1][0], [b(W, 0), b(W, 1)]),
                      line(WG[2][0], [b(W, 2)])])
    add(3, ["added_box"], add3, s3_input(W, WG), {"expressions": truth_all(W, WG), "missing": []})
    add(3, ["renamed_phrase"], "\n".join([line("the white car", [b(W, 0)]), line(WG[1][0], [b(W, 0), b(W, 1)])]),
        s3_input(W, WG), {"expressions": truth_all(W, WG, {1: [0, 1]}), "missing": []})
    add(3, ["phrase_case_and_period"], "\n".join([line("The white sedan.", [b(W, 0)]),
                                                 line("THE VEHICLES ON THE ROAD", [b(W, 0), b(W, 1)]),
                                                 line("the person in black", [b(W, 2)])]),
        s3_input(W, WG), {"expressions": truth_all(W, WG), "missing": []})
    add(3, ["article_dropped"], "\n".join([line("white sedan", [b(W, 0)]), line("vehicles on the road", [b(W, 0)])]),
        s3_input(W, WG), {"expressions": truth_all(W, WG, {0: [0], 1: [0]}), "missing": []})
    add(3, ["code_fence"], "```\n" + keep_all(H, HG) + "\n```", s3_input(H, HG),
        {"expressions": truth_all(H, HG), "missing": []})
    add(3, ["prose"], "After checking each box against the image:\n\n" + keep_all(K, KG) + "\n\nAll boxes look "
        "correct.", s3_input(K, KG), {"expressions": truth_all(K, KG), "missing": []})
    add(3, ["bullets_bold"], keep_all(W, WG, render=lambda p, bs: f"- **{p}**: {json.dumps(bs)}"), s3_input(W, WG),
        {"expressions": truth_all(W, WG), "missing": []})
    add(3, ["quoted_phrases"], keep_all(W, WG, render=lambda p, bs: f'"{p}": {json.dumps(bs)}'), s3_input(W, WG),
        {"expressions": truth_all(W, WG), "missing": []})
    add(3, ["single_brackets"], "\n".join([f"{WG[0][0]}: {json.dumps(b(W, 0))}", f"{WG[2][0]}: {json.dumps(b(W, 2))}"]),
        s3_input(W, WG), {"expressions": truth_all(W, WG, {0: [0], 2: [0]}), "missing": []})
    add(3, ["boxes_as_strings"],
        keep_all(K, KG, render=lambda p, bs: f"{p}: {json.dumps([json.dumps(x) for x in bs])}"),
        s3_input(K, KG), {"expressions": truth_all(K, KG), "missing": []})
    add(3, ["trailing_commas"], keep_all(W, WG, render=lambda p, bs: f"{p}: {json.dumps(bs)[:-1]},],"), s3_input(W, WG),
        {"expressions": truth_all(W, WG), "missing": []})
    full = keep_all(H, HG)
    cut = full[: full.index(HG[3][0]) + len(HG[3][0]) + 8]
    add(3, ["truncated_last_line"], cut, s3_input(H, HG),
        {"expressions": truth_all(H, HG, {0: [0, 1], 1: [0, 1], 2: [0, 1]}), "missing": [3, 4]}, finish="length")
    cut = full[: full.index(HG[2][0])]
    add(3, ["truncated_between_lines"], cut, s3_input(H, HG),
        {"expressions": truth_all(H, HG, {0: [0, 1], 1: [0, 1]}), "missing": [2, 3, 4]}, finish="MAX_TOKENS",
        model="gemini-2.5-flash")
    add(3, ["unclosed_not_truncated"], keep_all(W, WG)[:-1], s3_input(W, WG),
        {"expressions": truth_all(W, WG), "missing": []})
    rep = keep_all(W, WG) + "\n" + "\n".join([line(WG[2][0], [b(W, 2)])] * 30)
    add(3, ["repetition_loop"], rep, s3_input(W, WG), {"expressions": truth_all(W, WG), "missing": []})
    dupl = "\n".join([line(WG[1][0], [b(W, 0)]), line(WG[1][0], [b(W, 1)]), line(WG[0][0], [b(W, 0)])])
    add(3, ["duplicate_phrase"], dupl, s3_input(W, WG), {"expressions": truth_all(W, WG, {0: [0], 1: [0, 1]}),
                                                          "missing": []})
    add(3, ["gemini_yx"], keep_all(H, HG, fmt="yxyx_1000"), s3_input(H, HG),
        {"expressions": truth_all(H, HG), "missing": []}, model="gemini-2.5-flash")
    add(3, ["gemini_yx", "kitti"], keep_all(K, KG, fmt="yxyx_1000"), s3_input(K, KG),
        {"expressions": truth_all(K, KG), "missing": []}, model="gemini-3-flash-preview")
    add(3, ["pixel_coordinates"], keep_all(H, HG, fmt="pixels"), s3_input(H, HG),
        {"expressions": [{**e, "bbox_2d": [back(H, in_fmt(H, x, "pixels"), "pixels") for x in e["bbox_2d"]]}
                         for e in truth_all(H, HG)], "missing": []})
    add(3, ["norm1_floats"], keep_all(K, KG, fmt="norm1"), s3_input(K, KG),
        {"expressions": [{**e, "bbox_2d": [back(K, in_fmt(K, x, "norm1"), "norm1") for x in e["bbox_2d"]]}
                         for e in truth_all(K, KG)], "missing": []})
    add(3, ["qwen25_smart_resize"], keep_all(K, KG, fmt="smart"), s3_input(K, KG),
        {"expressions": [{**e, "bbox_2d": [back(K, in_fmt(K, x, "smart"), "smart") for x in e["bbox_2d"]]}
                         for e in truth_all(K, KG)], "missing": []}, model="qwen2.5-vl-72b-instruct")
    add(3, ["three_number_box"], "\n".join([line(WG[0][0], [[100, 200, 300]]), line(WG[1][0], [b(W, 0), b(W, 1)])]),
        s3_input(W, WG), {"expressions": truth_all(W, WG, {1: [0, 1]}), "missing": []})
    add(3, ["corner_pairs"], "\n".join([f"{WG[0][0]}: [[[100, 200], [300, 400]]]", line(WG[2][0], [b(W, 2)])]),
        s3_input(W, WG), {"expressions": truth_all(W, WG, {0: [0], 2: [0]}), "missing": []})
    add(3, ["empty_answer_clean_stop"], "", s3_input(W, WG), {"expressions": [], "missing": []})
    add(3, ["empty_answer_length"], "", s3_input(W, WG), {"error": "truncated_empty"}, finish="length")
    add(3, ["safety_blocked"], "", s3_input(W, WG), {"error": "blocked"}, finish="SAFETY", model="gemini-2.5-flash")
    add(3, ["refusal"], "I'm unable to verify these boxes.", s3_input(W, WG), {"error": "parse"})
    add(3, ["prose_only"], "Everything looks right.", s3_input(W, WG), {"error": "parse"})
    add(3, ["think_tags"], "<think>check each</think>\n" + keep_all(W, WG), s3_input(W, WG),
        {"expressions": truth_all(W, WG), "missing": []}, model="qwen3-vl-30b-a3b-thinking")
    add(3, ["numbered"], "\n".join(f"{k + 1}) {line(p, [b(K, i) for i in m])}" for k, (p, m) in enumerate(KG)),
        s3_input(K, KG), {"expressions": truth_all(K, KG), "missing": []})
    add(3, ["json_dict"], json.dumps({p: [b(H, i) for i in m] for p, m in HG}), s3_input(H, HG),
        {"expressions": truth_all(H, HG), "missing": []}, model="gemini-2.5-flash")
    add(3, ["json_list"], json.dumps([{"phrase": p, "bboxes": [b(W, i) for i in m]} for p, m in WG]), s3_input(W, WG),
        {"expressions": truth_all(W, WG), "missing": []})
    add(3, ["reordered_lines"], "\n".join(line(p, [b(K, i) for i in m]) for p, m in reversed(KG)), s3_input(K, KG),
        {"expressions": truth_all(K, KG), "missing": []})
    add(3, ["reordered_boxes"], line(KG[2][0], [b(K, i) for i in reversed(KG[2][1])]), s3_input(K, KG),
        {"expressions": [ex3(KG[2][0], [6, 5, 4, 3], [p1000(K, i) for i in reversed(KG[2][1])])], "missing": []})
    add(3, ["slightly_moved_all"], keep_all(W, WG, render=lambda p, bs: line(p, [[v + 2 for v in x] for x in bs])),
        s3_input(W, WG), {"expressions": [{**e, "bbox_2d": [[v + 2 for v in x] for x in e["bbox_2d"]]}
                                          for e in truth_all(W, WG)], "missing": []})
    add(3, ["moved_box_and_removed_other"], line(KG[0][0], [[v + 5 for v in b(K, 5)]]), s3_input(K, KG),
        {"expressions": [ex3(KG[0][0], [1], [[v + 5 for v in b(K, 5)]])], "missing": []})
    add(3, ["box_from_other_group"], line(WG[0][0], [b(W, 0), b(W, 2)]), s3_input(W, WG),
        {"expressions": truth_all(W, WG, {0: [0]}), "missing": []})
    add(3, ["nan_box"], "\n".join([line(WG[1][0], [b(W, 0)])[:-1] + ", [NaN, 1, 2, 3]]", line(WG[2][0], [b(W, 2)])]),
        s3_input(W, WG), {"expressions": truth_all(W, WG, {1: [0], 2: [0]}), "missing": []})
    add(3, ["swapped_corners"], line(WG[2][0], [[900, 200, 800, 0]]), s3_input(W, WG),
        {"expressions": truth_all(W, WG, {2: [0]}), "missing": []})
    add(3, ["group_labels"], "\n".join(f"Group {k + 1}: {line(p, [b(W, i) for i in m])}"
                                       for k, (p, m) in enumerate(WG)),
        s3_input(W, WG), {"expressions": truth_all(W, WG), "missing": []})
    add(3, ["empty_list_line"], "\n".join([f"{WG[0][0]}: []", line(WG[1][0], [b(W, 0), b(W, 1)])]), s3_input(W, WG),
        {"expressions": truth_all(W, WG, {1: [0, 1]}), "missing": []})
    add(3, ["transposed_targets"], "\n".join([line("the green car", [b(S, 0)]), line("the person", [b(S, 1)])]),
        s3_input(S, [("the green car", [0]), ("the person", [1])]),
        {"expressions": [ex3("the green car", [0], [p1000(S, 0)]), ex3("the person", [1], [p1000(S, 1)])],
         "missing": []})
    add(3, ["text_after_boxes"], keep_all(W, WG, render=lambda p, bs: f"{line(p, bs)}  # kept"), s3_input(W, WG),
        {"expressions": truth_all(W, WG), "missing": []})
    add(3, ["boxes_without_outer_brackets"], keep_all(K, KG, render=lambda p, bs: f"{p}: " + ", ".join(
        json.dumps(x) for x in bs)), s3_input(K, KG), {"expressions": truth_all(K, KG), "missing": []})
    add(3, ["arrow_separator"], keep_all(W, WG, render=lambda p, bs: f"{p} => {json.dumps(bs)}"), s3_input(W, WG),
        {"expressions": truth_all(W, WG), "missing": []})
    add(3, ["shared_box_across_groups"], keep_all(W, WG), s3_input(W, WG), {"expressions": truth_all(W, WG),
                                                                         "missing": []}, model="gemini-2.5-flash")
    add(3, ["blank_lines_and_headers"], "### Verified\n\n" + keep_all(H, HG).replace("\n", "\n\n"), s3_input(H, HG),
        {"expressions": truth_all(H, HG), "missing": []})
    add(3, ["tuples"], keep_all(W, WG, render=lambda p, bs: f"{p}: [" + ", ".join(
        "(" + ", ".join(map(str, x)) + ")" for x in bs) + "]"), s3_input(W, WG),
        {"expressions": truth_all(W, WG), "missing": []})
    add(3, ["float_coordinates"], keep_all(K, KG, render=lambda p, bs: line(p, [[v + 0.3 for v in x] for x in bs])),
        s3_input(K, KG), {"expressions": truth_all(K, KG), "missing": []})
    add(3, ["overshoot_clamped"], line(WG[2][0], [[800, -2, 900, 201]]), s3_input(W, WG),
        {"expressions": [ex3(WG[2][0], [3], [[800, 0, 900, 201]])], "missing": []})
    add(3, ["mixed_quotes_phrase"], "“the white sedan”: [[100, 200, 300, 400]]", s3_input(W, WG),
        {"expressions": truth_all(W, WG, {0: [0]}), "missing": []})
    add(3, ["content_filter"], "", s3_input(K, KG), {"error": "blocked"}, finish="content_filter")
    add(3, ["thinking_used_budget"], "", s3_input(K, KG), {"error": "truncated_empty"}, finish="MAX_TOKENS",
        model="gemini-2.5-flash")
    add(3, ["xywh_boxes"], keep_all(H, HG, fmt="xywh"), s3_input(H, HG), {"expressions": truth_all(H, HG),
                                                                          "missing": []})
    mixed = "\n".join(line(p, [b(K, i, "yxyx_1000" if k % 2 else "xyxy_1000") for i in m])
                      for k, (p, m) in enumerate(KG))
    add(3, ["mixed_conventions", "gemini_yx"], mixed, s3_input(K, KG), {"expressions": truth_all(K, KG),
                                                                      "missing": []}, model="gemini-2.5-flash")
    add(3, ["box_twice_in_line"], line(WG[1][0], [b(W, 0), b(W, 0), b(W, 1)]), s3_input(W, WG),
        {"expressions": truth_all(W, WG, {1: [0, 1]}), "missing": []})
    add(3, ["prompt_lines_echoed_with_prose"], "Checked. Output:\n" + keep_all(W, WG) + "\nNo changes needed.",
        s3_input(W, WG), {"expressions": truth_all(W, WG), "missing": []})
    add(3, ["box_format_config_pixels"], keep_all(W, WG, fmt="pixels"), s3_input(W, WG),
        {"expressions": [{**e, "bbox_2d": [back(W, in_fmt(W, x, "pixels"), "pixels") for x in e["bbox_2d"]]}
                         for e in truth_all(W, WG)], "missing": []}, model="internvl3-78b", box_format="xyxy_pixels")


def build_step3_structured() -> None:
    K, W, H = (SCENES[k] for k in ("kitti", "wide", "hd"))
    KG = [("the cars in the right lane", [1, 5]), ("the pedestrian crossing the road", [2]),
          ("all the vehicles", [0, 1, 3, 5]), ("the cyclist on the right", [4])]
    WG = [("the white sedan", [0]), ("the vehicles on the road", [0, 1]), ("the person in black", [2])]
    HG = [("the pedestrians on the crosswalk", [3, 4]), ("the cars driving ahead", [1, 2]),
          ("the vehicles parked or stopped on the right", [5, 6])]

    def ids_of(groups):
        out, k = [], 0
        for _, m in groups:
            out.append(list(range(k, k + len(m))))
            k += len(m)
        return out

    def g(p, ids):
        return {"phrase": p, "box_ids": ids}

    def truth(sc, groups, keep=None):
        ids = ids_of(groups)
        out = []
        for e, (p, m) in enumerate(groups):
            pos = range(len(m)) if keep is None else keep.get(e, [])
            if not list(pos):
                continue
            out.append(ex3(p, [ids[e][j] for j in pos], [p1000(sc, m[j]) for j in pos]))
        return out

    def all_groups(groups):
        return [g(p, i) for (p, _), i in zip(groups, ids_of(groups), strict=True)]

    for sc, groups, model in ((K, KG, "gemini-2.5-flash"), (W, WG, "gpt-4o"), (H, HG, "qwen3-vl-32b-instruct")):
        add(3, ["clean_keep_all"], json.dumps({"groups": all_groups(groups)}), s3_input(sc, groups),
            {"expressions": truth(sc, groups), "missing": []}, mode="structured", model=model)
    add(3, ["remove_ids"], json.dumps({"groups": [g(KG[0][0], [0]), g(KG[2][0], [3, 4, 5]), g(KG[3][0], [7])]}),
        s3_input(K, KG), {"expressions": truth(K, KG, {0: [0], 2: [0, 1, 2], 3: [0]}), "missing": []},
        mode="structured")
    add(3, ["code_fence_in_json_mode"], "```json\n" + json.dumps({"groups": all_groups(WG)}, indent=2) + "\n```",
        s3_input(W, WG), {"expressions": truth(W, WG), "missing": []}, mode="structured", model="gemini-2.5-flash")
    add(3, ["ids_as_strings"], json.dumps({"groups": [g(p, [str(i) for i in ids]) for (p, _), ids in
                                                      zip(WG, ids_of(WG), strict=True)]}), s3_input(W, WG),
        {"expressions": truth(W, WG), "missing": []}, mode="structured")
    add(3, ["id_from_other_group"], json.dumps({"groups": [g(WG[0][0], [0, 3])]}), s3_input(W, WG),
        {"expressions": truth(W, WG, {0: [0]}), "missing": []}, mode="structured")
    add(3, ["unknown_id"], json.dumps({"groups": [g(WG[2][0], [3, 42])]}), s3_input(W, WG),
        {"expressions": truth(W, WG, {2: [0]}), "missing": []}, mode="structured")
    add(3, ["renamed_phrase_ids"], json.dumps({"groups": [g("white sedans", [0]), g(WG[1][0], [1, 2])]}),
        s3_input(W, WG), {"expressions": truth(W, WG, {0: [0], 1: [0, 1]}), "missing": []}, mode="structured")
    add(3, ["renamed_phrase_mixed_ids"], json.dumps({"groups": [g("everything", [0, 3])]}), s3_input(W, WG),
        {"expressions": [], "missing": []}, mode="structured")
    full = json.dumps({"groups": all_groups(HG)}, indent=2)
    cut = full[: full.index(HG[2][0]) + 5]
    add(3, ["truncated"], cut, s3_input(H, HG), {"expressions": truth(H, HG, {0: [0, 1], 1: [0, 1]}),
                                                 "missing": [2]}, mode="structured", finish="length")
    add(3, ["empty_groups_clean"], json.dumps({"groups": []}), s3_input(W, WG), {"expressions": [], "missing": []},
        mode="structured")
    add(3, ["empty_answer_clean_stop"], "", s3_input(W, WG), {"expressions": [], "missing": []}, mode="structured")
    add(3, ["safety_blocked"], "", s3_input(W, WG), {"error": "blocked"}, mode="structured", finish="SAFETY",
        model="gemini-2.5-flash")
    add(3, ["schema_ignored_tao_answer"], "\n".join(f"{p}: {json.dumps([p1000(K, i) for i in m])}" for p, m in KG),
        s3_input(K, KG), {"expressions": truth(K, KG), "missing": []}, mode="structured", model="old-vllm-model")
    add(3, ["bare_list_other_keys"], json.dumps([{"text": p, "ids": i} for (p, _), i in zip(WG, ids_of(WG),
                                                                                           strict=True)]),
        s3_input(W, WG), {"expressions": truth(W, WG), "missing": []}, mode="structured")
    add(3, ["duplicate_ids"], json.dumps({"groups": [g(WG[1][0], [1, 1, 2])]}), s3_input(W, WG),
        {"expressions": truth(W, WG, {1: [0, 1]}), "missing": []}, mode="structured")
    add(3, ["phrase_case"], json.dumps({"groups": [g("The Person In Black", [3])]}), s3_input(W, WG),
        {"expressions": truth(W, WG, {2: [0]}), "missing": []}, mode="structured")
    add(3, ["keyed_by_phrase"], json.dumps({p: i for (p, _), i in zip(KG, ids_of(KG), strict=True)}), s3_input(K, KG),
        {"expressions": truth(K, KG), "missing": []}, mode="structured")
    add(3, ["prose_around"], "Verified:\n" + json.dumps({"groups": all_groups(WG)}) + "\nDone.", s3_input(W, WG),
        {"expressions": truth(W, WG), "missing": []}, mode="structured")
    add(3, ["refusal_text"], "I can't verify these.", s3_input(W, WG), {"error": "parse"}, mode="structured")
    add(3, ["one_based_ids"], json.dumps({"groups": [g(p, [x + 1 for x in i]) for (p, _), i in
                                                     zip(KG, ids_of(KG), strict=True)]}), s3_input(K, KG),
        {"expressions": truth(K, KG), "missing": []}, mode="structured")
    # ids numbered within the group (0-3) instead of the listed ones (3-6): only id 3 is in the
    # group; the others belong to other groups and are dropped (never moved into this one)
    add(3, ["local_ids_per_group"], json.dumps({"groups": [g(KG[2][0], [0, 1, 2, 3])]}), s3_input(K, KG),
        {"expressions": truth(K, KG, {2: [0]}), "missing": []}, mode="structured")


def main() -> None:
    build_step0_text()
    build_step0_structured()
    build_step1()
    build_step2_text()
    build_step2_structured()
    build_step3_text()
    build_step3_structured()
    for step, cases in CASES.items():
        with open(HERE / f"step{step}.jsonl", "w", encoding="utf-8") as f:
            for case in cases:
                f.write(json.dumps(case, ensure_ascii=False) + "\n")
        by_mode: dict[str, int] = {}
        for c in cases:
            by_mode[c["mode"]] = by_mode.get(c["mode"], 0) + 1
        print(f"step {step}: {len(cases)} cases {by_mode}")


if __name__ == "__main__":
    main()
