"""Step 2, ``grounding_expr``: step-0 objects grouped into phrases, each with its boxes.

Input columns: ``regions`` (step 0), ``caption`` (step 1, optional). Output: ``expressions`` —
``{expression_id, text, instances[{bbox_id, bbox, bbox_2d, bbox_score, region_index, matched}],
verified}``. Each returned box is joined to the step-0 region it overlaps most (IoU >= 0.5 in
0-1000 space); ``bbox`` is then that region's KITTI box in pixels. Boxes that join nothing are
kept with ``matched: false`` and ``bbox`` converted from the model's box.
"""

from __future__ import annotations

from worker.errors import ParseError
from worker.geometry import nearest, sanitize_norm_box, to_pixels
from worker.steps.parsing import parse_grounding_lines
from worker.steps.records import bbox_id, expression_id, grounding_lines, with_step
from worker.steps.region_expr import prompt_box

NUMBER = 2
NAME = "grounding_expr"
INPUTS = ("regions",)
OPTIONAL_INPUTS = ("caption",)
OUTPUTS = ("expressions",)
MIN_IOU = 0.5
BBOX_SCORE = 0.9


def _region_boxes(record: dict) -> list[list[int]]:
    w, h = int(record["width"]), int(record["height"])
    return [prompt_box(r["bbox"], w, h) for r in record.get("regions", [])]


def _chunk(region: dict, box: list[int]) -> str:
    if region.get("description"):
        return f"{region['description']}:{box}"
    if region.get("color") and region.get("type"):
        return f"{region['color']} {region['type']}:{box}"
    return str(box)


def build_prompt(record: dict, template: str) -> tuple[str, dict] | None:
    """TAO's step-2 prompt: region chunks as a Python list repr, then ``caption: ...``."""
    regions = record.get("regions") or []
    if not regions:
        return None
    boxes = _region_boxes(record)
    chunks = [_chunk(r, b) for r, b in zip(regions, boxes, strict=True)]
    caption = record.get("caption") or ""
    prompt = template.format(bboxes=chunks, caption_section=f"caption: {caption}" if caption else "")
    hint = {"regions": [{**r, "bbox_2d": b} for r, b in zip(regions, boxes, strict=True)], "caption": caption}
    return prompt, hint


def parse(text: str, record: dict) -> dict:
    parsed = parse_grounding_lines(text)
    regions = record.get("regions") or []
    targets = _region_boxes(record)
    w, h = int(record["width"]), int(record["height"])
    image_id = record["image_id"]
    expressions, invalid, unmatched, k_box = [], 0, 0, 0
    for phrase, boxes in parsed.items:
        instances = []
        for raw in boxes:
            box = sanitize_norm_box(raw)
            if box is None:
                invalid += 1
                continue
            ri, v = nearest(box, targets)
            matched = ri >= 0 and v >= MIN_IOU
            unmatched += not matched
            instances.append({
                "bbox_id": bbox_id(image_id, k_box),
                "bbox": list(regions[ri]["bbox"]) if matched else to_pixels(box, w, h),
                "bbox_2d": box,
                "bbox_score": BBOX_SCORE,
                "region_index": ri if matched else None,
                "matched": matched,
            })
            k_box += 1
        if not instances:
            continue  # a phrase with no usable box is dropped, as the reference does
        expressions.append({
            "expression_id": expression_id(image_id, len(expressions)),
            "text": phrase,
            "instances": instances,
            "verified": False,
        })
    if not expressions:
        raise ParseError("step 2: no '<phrase>: [[x1, y1, x2, y2], ...]' line with a usable box", raw=text)
    report = {"repairs": parsed.repairs, "invalid_boxes": invalid, "unmatched_boxes": unmatched}
    return {"expressions": expressions, "report": report}


def empty() -> dict:
    return {"expressions": [], "report": {}}


def record(rec: dict, parsed: dict) -> dict:
    return with_step(rec, NUMBER, {"expressions": parsed["expressions"]}, parsed["report"])


def legacy(rec: dict) -> str:
    """``.txt.step2``: one ``<phrase>: [[...]]`` line per expression, newline-terminated."""
    lines = grounding_lines(rec.get("expressions", []))
    return "\n".join(lines) + ("\n" if lines else "")
