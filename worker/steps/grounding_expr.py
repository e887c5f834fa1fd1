"""Step 2, ``grounding_expr``: step-0 objects grouped into phrases, each with its boxes.

Input columns: ``regions`` (step 0), ``caption`` (step 1, optional). Output: ``expressions`` —
``{expression_id, text, instances[{bbox_id, bbox, bbox_2d, bbox_score, region_index, matched}],
verified}``. Each returned box is joined to the step-0 region it overlaps most (IoU >= 0.5 in
0-1000 space); ``bbox`` is then that region's KITTI box in pixels. Boxes that join nothing are
kept with ``matched: false`` and ``bbox`` converted from the model's box.
"""

from __future__ import annotations

from worker.coords import Frame, from_canonical, line_values, refine, rescue, resolve
from worker.errors import ParseError
from worker.geometry import nearest, to_pixels
from worker.stepdefs import for_module
from worker.steps.options import STRUCTURED, AnswerContext
from worker.steps.parsing import answer_limit, cap_answer, norm_phrase, parse_grounding_lines, parse_groups
from worker.steps.quality import new_quality
from worker.steps.records import bbox_id, expression_id, grounding_lines, with_step
from worker.steps.region_expr import prompt_box

DEF = for_module(__name__)  # number, name and policy: worker/stepdefs.py

MIN_IOU = 0.5
BBOX_SCORE = 0.9


def _region_boxes(record: dict) -> list[list[int]]:
    w, h = int(record["width"]), int(record["height"])
    return [prompt_box(r["bbox"], w, h) for r in record.get("regions", [])]


def _chunk(region: dict, box: list) -> str:
    if region.get("description"):
        return f"{region['description']}:{box}"
    if region.get("color") and region.get("type"):
        return f"{region['color']} {region['type']}:{box}"
    return str(box)


def _label(region: dict) -> str:
    if region.get("description"):
        return str(region["description"])
    if region.get("color") and region.get("type"):
        return f"{region['color']} {region['type']}"
    return str(region.get("type") or "object")


def build_prompt(record: dict, template: str, *, ctx: AnswerContext | None = None) -> tuple[str, dict] | None:
    """TAO's step-2 prompt: region chunks as a Python list repr, then ``caption: ...``.

    Structured mode lists ``<id>: <description> [box]`` lines, the id being the region index.
    """
    ctx = ctx or AnswerContext()
    regions = record.get("regions") or []
    if not regions:
        return None
    boxes = _region_boxes(record)
    frame = ctx.frame(record)
    fmt = ctx.convention.prompt
    shown = boxes if fmt == "xyxy_1000" else [from_canonical(b, fmt, frame) for b in boxes]
    caption = record.get("caption") or ""
    caption_section = f"caption: {caption}" if caption else ""
    hint = {"regions": [{**r, "bbox_2d": b} for r, b in zip(regions, boxes, strict=True)], "caption": caption}
    if ctx.mode == STRUCTURED:
        lines = [f"{i}: {_label(r)} {b}" for i, (r, b) in enumerate(zip(regions, shown, strict=True))]
        return template.format(objects="\n".join(lines), caption_section=caption_section), hint
    chunks = [_chunk(r, b) for r, b in zip(regions, shown, strict=True)]
    return template.format(bboxes=chunks, caption_section=caption_section), hint


def _groups_by_id(parsed, n_regions: int, q: dict, repairs: list[str]):
    every = [i for _, ids, _ in parsed.items for i in ids]
    shift = -1 if sum(0 < i <= n_regions for i in every) > sum(0 <= i < n_regions for i in every) else 0
    if shift:
        repairs.append("one_based_ids")
    out = []
    for phrase, ids, bad in parsed.items:
        q["boxes_returned"] += len(ids) + len(bad)
        q["invalid_boxes"] += len(bad)
        members: list[tuple[int | None, list | None]] = []
        for i in ids:
            i += shift
            if not 0 <= i < n_regions:
                q["hallucinated_dropped"] += 1
                continue
            members.append((i, None))
        out.append((phrase, members))
    return out


def _groups_by_box(parsed, targets, ctx: AnswerContext, frame: Frame, repairs: list[str], q: dict):
    raw_by_line, unique = line_values([boxes for _, boxes in parsed.items], repairs)
    reading = resolve(unique, targets, ctx.convention, frame, min_iou=MIN_IOU)
    ambiguous: set[int] = set()
    for tie in reading.ties:
        ambiguous |= reading.ambiguous(tie)
    if reading.ties:
        repairs.append("convention_tie")
    if reading.fmt != ctx.convention.prompt:
        repairs.append(f"read_as_{reading.fmt}")
    out = []
    for (phrase, _), vals in zip(parsed.items, raw_by_line, strict=True):
        members: list[tuple[int | None, list | None]] = []
        q["boxes_returned"] += len(vals)
        for v in vals:
            if v is None:
                q["invalid_boxes"] += 1
                continue
            k = unique.index(v)
            box = reading.boxes[k]
            if box is None:
                got = rescue(v, targets, ctx.convention, frame, skip=reading.fmt)
                if got is None:
                    q["invalid_boxes"] += 1
                    continue
                repairs.append(f"mixed_convention_{got[0]}")
                box = got[1]
            if k in ambiguous:
                q["ambiguous_dropped"] += 1
                continue
            repairs.extend(reading.repairs[k])
            ri, overlap = nearest(box, targets)
            if ri >= 0 and overlap >= MIN_IOU:
                better = refine(v, box, targets[ri], ctx.convention, frame, skip=reading.fmt)
                if better is not None:
                    repairs.append(f"mixed_convention_{better[0]}")
                    box = better[1]
            if ri < 0 or overlap < MIN_IOU:
                got = rescue(v, targets, ctx.convention, frame, skip=reading.fmt)
                if got is not None:
                    repairs.append(f"mixed_convention_{got[0]}")
                    box, ri, overlap = got[1], got[2], 1.0
            members.append((ri if ri >= 0 and overlap >= MIN_IOU else None, box))
        out.append((phrase, members))
    return out, reading.fmt


def parse(text: str, record: dict, *, ctx: AnswerContext | None = None) -> dict:
    """Expressions whose boxes are joined to step-0 regions (by id, or IoU >= 0.5).

    A box that joins no region is kept with ``matched: false`` (flagged) and its pixel box
    converted from the model's; a region listed twice in one group counts once; a phrase given
    twice is one expression with the union of its boxes.
    """
    ctx = ctx or AnswerContext()
    regions = record.get("regions") or []
    targets = _region_boxes(record)
    w, h = int(record["width"]), int(record["height"])
    frame = ctx.frame(record)
    image_id = record["image_id"]
    text, cut = cap_answer(text, answer_limit(len(regions)))
    if cut:
        ctx = ctx.but(truncated=True)  # what lies past the cut was not seen, not left out
    q = new_quality(ctx.mode, boxes_expected=len(regions), answers_cut=int(bool(cut)))
    groups = None
    repairs: list[str] = ["oversized_answer_cut"] if cut else []
    fmt = ""
    if ctx.mode == STRUCTURED:
        by_id = parse_groups(text)
        if by_id.shape and by_id.items:
            repairs += by_id.repairs
            groups = _groups_by_id(by_id, len(regions), q, repairs)
    if groups is None:
        parsed = parse_grounding_lines(text, truncated=ctx.truncated)
        repairs += parsed.repairs
        if ctx.mode == STRUCTURED and parsed.items:
            repairs.append("structured_answer_without_ids")
        groups, fmt = _groups_by_box(parsed, targets, ctx, frame, repairs, q)
    merged: dict[str, tuple[str, list]] = {}
    for phrase, members in groups:
        key = norm_phrase(phrase) or phrase
        if key in merged:
            repairs.append("duplicate_phrase_merged")
            merged[key][1].extend(members)
        else:
            merged[key] = (phrase, list(members))
    expressions, k_box, used = [], 0, set()
    for phrase, members in merged.values():
        instances, seen_regions = [], set()
        for ri, box in members:
            if ri is not None and ri in seen_regions:
                q["duplicates_dropped"] += 1
                continue
            matched = ri is not None
            if matched:
                seen_regions.add(ri)
                used.add(ri)
                q["boxes_matched"] += 1
            else:
                q["boxes_flagged"] += 1
            instances.append({
                "bbox_id": bbox_id(image_id, k_box),
                "bbox": list(regions[ri]["bbox"]) if matched else to_pixels(box, w, h),
                "bbox_2d": list(box) if box is not None else list(targets[ri]),
                "bbox_score": BBOX_SCORE,
                "region_index": ri,
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
    q["box_format"] = fmt
    q["kitti_skipped"] = len([i for i in range(len(regions)) if i not in used])
    q["repairs"] = new_quality(repairs=repairs)["repairs"]
    report = {"repairs": list(dict.fromkeys(repairs)), "invalid_boxes": q["invalid_boxes"],
              "unmatched_boxes": q["boxes_flagged"], "quality": q}
    return {"expressions": expressions, "report": report}


def n_items(record: dict) -> int:
    """Boxes the answer covers (sizes the output budget): the step-0 regions."""
    return len(record.get("regions") or [])


def empty() -> dict:
    return {"expressions": [], "report": {"quality": new_quality("")}}  # no call: nothing to report but the shape


def record(rec: dict, parsed: dict) -> dict:
    return with_step(rec, DEF.number, {"expressions": parsed["expressions"]}, parsed["report"])


def legacy(rec: dict) -> str:
    """``.txt.step2``: one ``<phrase>: [[...]]`` line per expression, newline-terminated."""
    lines = grounding_lines(rec.get("expressions", []))
    return "\n".join(lines) + ("\n" if lines else "")
