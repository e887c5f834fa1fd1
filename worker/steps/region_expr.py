"""Step 0, ``region_expr``: one short discriminative phrase per KITTI box.

Input columns: ``image_path, width, height, kitti_bboxes``. Output: ``regions`` — one per KITTI
box the model described, each ``{bbox (pixels, the KITTI box), bbox_2d (0-1000 as returned),
type, color, description, kitti_index}``, in KITTI order.

>>> rec = {"image_id": "a", "width": 1000, "height": 1000, "kitti_bboxes": [[100, 200, 300, 400, "Car"]]}
>>> build_prompt(rec, "{bboxes}")[0]
'[Car: [100, 200, 300, 400]  ]'
"""

from __future__ import annotations

import json

from worker.coords import Frame, prompt_box_in, raw_values, refine, rescue, resolve
from worker.errors import ParseError
from worker.geometry import iou, match_one_to_one
from worker.stepdefs import for_module
from worker.steps.options import STRUCTURED, AnswerContext
from worker.steps.parsing import answer_limit, cap_answer, collapse_repeats, field_of, item_id, parse_json_objects
from worker.steps.quality import merge_quality, new_quality
from worker.steps.records import with_step

DEF = for_module(__name__)  # number, name and policy: worker/stepdefs.py

MIN_IOU = 0.5

# Where models put each field. ``box_2d`` is Gemini's native key (y-first when it uses it
# natively; the answer-level convention check in ``worker.coords.resolve`` decides).
_BOX_KEYS = ("bbox_2d", "bbox", "box_2d", "box", "bounding_box", "bbox2d", "coordinates", "coords")
_TYPE_KEYS = ("type", "label", "category", "class", "object_type", "object")
_COLOR_KEYS = ("color", "colour", "primary_color")
_DESC_KEYS = ("description", "desc", "referring_expression", "expression", "phrase", "caption", "text")


def prompt_box(box: list, width: int, height: int) -> list[int]:
    """A pixel KITTI box as the reference sends it: ``int(v / size * 1000)`` (truncated)."""
    return [int(box[0] / width * 1000), int(box[1] / height * 1000),
            int(box[2] / width * 1000), int(box[3] / height * 1000)]


def format_bboxes(kitti: list[list], width: int, height: int, fmt: str = "xyxy_1000", *,
                  frame: Frame | None = None) -> str:
    """TAO's ``format_bboxes``, byte for byte: ``[Car: [52, 185, 156, 370] , Van: [...]  ]``.

    ``fmt`` writes the boxes in another convention (``worker.coords``); the default is TAO's.
    ``frame`` carries the sent size when the image is downscaled (pixel formats use it).
    """
    if not kitti:
        return "[]"
    frame = frame or Frame(width, height)
    parts = []
    for b in kitti:
        x1, y1, x2, y2 = prompt_box_in(b, fmt, frame)
        parts.append(f"{b[4]}: [{x1}, {y1}, {x2}, {y2}] ")
    return "[" + ", ".join(parts) + " ]"


def _asked(record: dict, ctx: AnswerContext) -> list[int]:
    n = len(record.get("kitti_bboxes") or [])
    return list(range(n)) if ctx.only is None else [i for i in ctx.only if 0 <= i < n]


def build_prompt(record: dict, template: str, *, ctx: AnswerContext | None = None) -> tuple[str, dict] | None:
    """The prompt and the offline hint, or None when there is nothing to ask (no boxes).

    Text mode is TAO's prompt; structured mode lists ``<id>: <type> [box]`` lines, the id
    being the KITTI index. A re-ask (``ctx.only``) lists only the boxes asked about.
    """
    ctx = ctx or AnswerContext()
    kitti = record.get("kitti_bboxes") or []
    if not kitti:
        return None
    w, h = int(record["width"]), int(record["height"])
    asked = _asked(record, ctx)
    hint = {"boxes": [{"index": i, "type": kitti[i][4], "bbox_2d": prompt_box(kitti[i], w, h)} for i in asked]}
    fmt = ctx.convention.prompt
    if ctx.mode == STRUCTURED:
        frame = ctx.frame(record)
        lines = [f"{i}: {kitti[i][4]} {prompt_box_in(kitti[i], fmt, frame)}" for i in asked]
        return template.format(objects="\n".join(lines)), hint
    return template.format(bboxes=format_bboxes([kitti[i] for i in asked], w, h, fmt, frame=ctx.frame(record))), hint


def _first(item: dict, keys: tuple[str, ...]):
    for k in keys:
        if k in item and item[k] not in (None, ""):
            return item[k]
    value = field_of({k: v for k, v in item.items() if v not in (None, "")}, keys)
    return value


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        value = " ".join(str(v) for v in value)
    return str(value).strip()


def _region(kitti: list, ti: int, box: list[int], item: dict, repairs: list[str]) -> dict:
    kind = _text(_first(item, _TYPE_KEYS))
    desc, looped = collapse_repeats(_text(_first(item, _DESC_KEYS)))
    if looped:
        repairs.append("repetition_collapsed")
    return {
        "bbox": [float(v) for v in kitti[ti][:4]],
        "bbox_2d": box,
        "type": kind or str(kitti[ti][4]),
        "color": _text(_first(item, _COLOR_KEYS)) or "unknown",
        "description": desc,
        "kitti_index": ti,
    }


def _id_shift(items: list[dict], kitti: list, asked: list[int]) -> int:
    """-1 when the model numbered the boxes from 1 (its ids fit the asked ones only shifted, or
    fit equally but its types agree only shifted); else 0."""
    ids = [item_id(it) for it in items]
    ids = [i for i in ids if i is not None]
    fit0 = sum(i in asked for i in ids)
    fit1 = sum(i - 1 in asked for i in ids)
    if fit1 > fit0:
        return -1
    if fit1 == fit0 and fit1 and 0 not in ids:
        agree0 = sum(_agrees(it, kitti[i][4]) for it in items if (i := item_id(it)) is not None and i in asked)
        agree1 = sum(_agrees(it, kitti[i - 1][4]) for it in items
                     if (i := item_id(it)) is not None and i - 1 in asked)
        if agree1 > agree0:
            return -1
    return 0


def _by_id(items: list[dict], kitti: list, asked: list[int], targets: list, repairs: list[str], q: dict) -> dict:
    regions: dict[int, dict] = {}
    shift = _id_shift(items, kitti, asked)
    if shift:
        repairs.append("one_based_ids")
    for item in items:
        ti = item_id(item)
        if ti is None:
            continue
        ti += shift
        q["boxes_returned"] += 1
        if ti not in asked:
            q["hallucinated_dropped"] += 1
            continue
        if ti in regions:
            q["duplicates_dropped"] += 1
            continue
        regions[ti] = _region(kitti, ti, list(targets[ti]), item, repairs)
    return regions


def _by_box(items: list[dict], kitti: list, asked: list[int], targets: list, ctx: AnswerContext, frame: Frame,
            repairs: list[str], q: dict) -> tuple[dict, str]:
    raw, owners = [], []
    for item in items:
        value = _first(item, _BOX_KEYS)
        if value is None:
            q["invalid_boxes"] += 1
            continue
        values, rep = raw_values(value)
        if values is None:
            q["invalid_boxes"] += 1
            continue
        if rep:
            repairs.append(rep)
        raw.append(values)
        owners.append(item)
    q["boxes_returned"] += len(raw)
    asked_targets = [targets[i] for i in asked]
    reading = resolve(raw, asked_targets, ctx.convention, frame, min_iou=MIN_IOU)
    ambiguous: set[int] = set()
    if reading.ties:
        reading, ambiguous = _break_tie(reading, owners, [kitti[i][4] for i in asked], ctx)
        repairs.append("convention_tie")
    if reading.fmt != ctx.convention.prompt:
        repairs.append(f"read_as_{reading.fmt}")
    cands, unread = [], []
    for ci, (box, rep, item) in enumerate(zip(reading.boxes, reading.repairs, owners, strict=True)):
        if ci in ambiguous:
            q["ambiguous_dropped"] += 1
            continue
        if box is None:
            unread.append(ci)
            continue
        repairs.extend(rep)
        cands.append((box, item, ci))
    matches = match_one_to_one([c[0] for c in cands], asked_targets, min_iou=MIN_IOU)
    regions: dict[int, dict] = {}
    for c, k in matches.items():
        box, item, ci = cands[c]
        ti = asked[k]
        better = refine(raw[ci], box, asked_targets[k], ctx.convention, frame, skip=reading.fmt)
        if better is not None:
            repairs.append(f"mixed_convention_{better[0]}")
            box = better[1]
        regions[ti] = _region(kitti, ti, box, item, repairs)
    leftovers = [cands[c][2] for c in range(len(cands)) if c not in matches] + unread
    for ci in sorted(leftovers):
        free = [k for k in range(len(asked)) if asked[k] not in regions]
        got = rescue(raw[ci], [asked_targets[k] for k in free], ctx.convention, frame, skip=reading.fmt)
        if got is not None:
            fmt2, box, j = got
            ti = asked[free[j]]
            regions[ti] = _region(kitti, ti, box, owners[ci], repairs)
            repairs.append(f"mixed_convention_{fmt2}")
            continue
        box = reading.boxes[ci]
        if box is None:
            q["invalid_boxes"] += 1
        elif any(iou(box, t) >= MIN_IOU for t in asked_targets):
            q["duplicates_dropped"] += 1
        else:
            q["hallucinated_dropped"] += 1
    return regions, reading.fmt


# Words that name each KITTI type, for telling apart two box conventions that explain an answer
# equally well (the model's type and description agree with the boxes it meant).
_TYPE_WORDS = {
    "car": ("car", "sedan", "suv", "hatchback", "coupe", "taxi", "wagon", "jeep", "vehicle"),
    "van": ("van", "minivan", "minibus"),
    "truck": ("truck", "pickup", "lorry", "trailer"),
    "tram": ("tram", "streetcar", "train", "trolley"),
    "pedestrian": ("pedestrian", "person", "man", "woman", "child", "walker", "people", "boy", "girl"),
    "person_sitting": ("sitting", "seated", "person", "man", "woman"),
    "cyclist": ("cyclist", "bicycle", "bike", "biker", "rider", "bicyclist"),
}


def _agrees(item: dict, kitti_type: str) -> bool:
    words = _TYPE_WORDS.get(str(kitti_type).lower())
    if not words:
        return False
    text = f"{_text(_first(item, _TYPE_KEYS))} {_text(_first(item, _DESC_KEYS))}".lower()
    return any(w in text.replace("-", " ").split() for w in words)


def _break_tie(reading, owners: list[dict], types: list[str], ctx: AnswerContext):
    """Of equally good readings, the one whose joins agree with the items' types; then, for a
    model whose native key is ``box_2d`` (Gemini), its native format when the items use that
    key. Still tied: the boxes the readings join differently are ambiguous (dropped)."""
    options = [reading, *reading.ties]

    def types_ok(r) -> int:
        return sum(_agrees(owners[ci], types[k]) for ci, k in r.assignment.items())

    top = max(types_ok(r) for r in options)
    options = [r for r in options if types_ok(r) == top]
    if len(options) > 1 and sum("box_2d" in it for it in owners) * 2 > len(owners):
        native = [r for r in options if r.fmt == ctx.convention.native]
        if native and ctx.convention.native != ctx.convention.prompt:
            options = native
    chosen = options[0]
    ambiguous: set[int] = set()
    for other in options[1:]:
        ambiguous |= chosen.ambiguous(other)
    return chosen, ambiguous


def parse(text: str, record: dict, *, ctx: AnswerContext | None = None) -> dict:
    """Regions joined to KITTI boxes (by id, or one-to-one by IoU >= 0.5); ParseError when none.

    Structured answers join by id; items without an id (a model or server that ignored the
    schema) are joined by their boxes, like text answers. Boxes are read in the model's
    convention (``worker.coords.resolve``); whatever joins nothing is dropped and counted.
    """
    ctx = ctx or AnswerContext()
    kitti = record.get("kitti_bboxes") or []
    asked = _asked(record, ctx)
    text, cut = cap_answer(text, answer_limit(len(asked)))
    parsed = parse_json_objects(text)
    w, h = int(record["width"]), int(record["height"])
    frame = ctx.frame(record)
    targets = [prompt_box(b, w, h) for b in kitti]
    repairs = list(parsed.repairs) + (["oversized_answer_cut"] if cut else [])
    q = new_quality(ctx.mode, boxes_expected=len(asked), answers_cut=int(bool(cut)))
    items = parsed.items
    with_ids = [it for it in items if item_id(it) is not None]
    regions: dict[int, dict] = {}
    fmt = ""
    if with_ids and ctx.mode == STRUCTURED:
        regions = _by_id(with_ids, kitti, asked, targets, repairs, q)
        rest = [it for it in items if item_id(it) is None]
    else:
        rest = items
        if ctx.mode == STRUCTURED and items:
            repairs.append("structured_answer_without_ids")
    if rest:
        more, fmt = _by_box(rest, kitti, [i for i in asked if i not in regions], targets, ctx, frame, repairs, q)
        regions.update(more)
    if not regions:
        raise ParseError(
            f"step 0: no region in the answer matched a KITTI box "
            f"({len(items)} objects parsed, {q['invalid_boxes']} without a usable box)",
            raw=text,
        )
    q["box_format"] = fmt
    q["boxes_matched"] = len(regions)
    missing = [i for i in asked if i not in regions]
    q["kitti_skipped"] = len(missing)
    q["repairs"] = new_quality(repairs=repairs)["repairs"]
    report = {
        "repairs": list(dict.fromkeys(repairs)),
        "invalid_boxes": q["invalid_boxes"],
        "invented": q["hallucinated_dropped"] + q["duplicates_dropped"],
        "missed_kitti": missing,
        "quality": q,
    }
    return {"regions": [regions[i] for i in sorted(regions)], "report": report, "missing": missing}


def merge(first: dict, reask: dict, record: dict | None = None) -> dict:
    """A first answer and the re-ask about its missing boxes, as one result."""
    regions = {r["kitti_index"]: r for r in first["regions"]}
    for r in reask["regions"]:
        regions.setdefault(r["kitti_index"], r)
    missing = [i for i in first["missing"] if i not in regions]
    a, b = first["report"], reask["report"]
    q = merge_quality(a["quality"], b["quality"])
    q["boxes_expected"] = a["quality"]["boxes_expected"]
    q["boxes_matched"] = len(regions)
    q["kitti_skipped"] = len(missing)
    report = {"repairs": list(dict.fromkeys(a["repairs"] + b["repairs"])),
              "invalid_boxes": a["invalid_boxes"] + b["invalid_boxes"], "invented": a["invented"] + b["invented"],
              "missed_kitti": missing, "quality": q}
    return {"regions": [regions[i] for i in sorted(regions)], "report": report, "missing": missing}


def n_items(record: dict) -> int:
    """Boxes the answer covers (sizes the output budget): the KITTI boxes."""
    return len(record.get("kitti_bboxes") or [])


def empty() -> dict:
    """The result when no call is needed (an image without boxes): no regions, as the reference."""
    return {"regions": [], "report": {"quality": new_quality("")}}  # no call: nothing to report but the shape


def record(rec: dict, parsed: dict) -> dict:
    return with_step(rec, DEF.number, {"regions": parsed["regions"]}, parsed["report"])


def legacy(rec: dict) -> str:
    """``.txt.step0``: TAO's JSON array, ``indent=2``, no trailing newline."""
    out = [
        {"bbox_2d": list(r["bbox_2d"]), "type": r.get("type", ""), "color": r.get("color", ""),
         "description": r.get("description", "")}
        for r in rec.get("regions", [])
    ]
    if not out:
        return "[]"
    return json.dumps(out, ensure_ascii=False, indent=2)
