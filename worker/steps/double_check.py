"""Step 3, ``double_check``: each step-2 box re-checked against the image.

Input columns: ``expressions`` (step 2). Output: ``expressions`` reconciled as the reference
does: a phrase the model left out is dropped; a box returned unchanged keeps its instance; a
moved box keeps the id of the box it replaces (the unused original it overlaps most) and is
marked ``updated``; boxes the model adds are dropped (it was told not to) and counted;
survivors are ``verified: true``.
"""

from __future__ import annotations

import json

from worker.coords import Convention, Frame, from_canonical, line_values, refine, rescue, resolve
from worker.errors import ParseError
from worker.geometry import iou, to_pixels
from worker.stepdefs import for_module
from worker.steps.options import STRUCTURED, AnswerContext
from worker.steps.parsing import answer_limit, cap_answer, norm_phrase, parse_grounding_lines, parse_groups
from worker.steps.quality import merge_quality, new_quality
from worker.steps.records import grounding_lines, with_step

DEF = for_module(__name__)  # number, name and policy: worker/stepdefs.py

MIN_IOU = 0.5


def _checkable(record: dict) -> list[int]:
    """Indices of the expressions that have boxes (the ones the prompt lists)."""
    out = []
    for k, e in enumerate(record.get("expressions") or []):
        if any(i.get("bbox_2d") for i in e.get("instances", [])):
            out.append(k)
    return out


def _asked(record: dict, ctx: AnswerContext) -> list[int]:
    checkable = _checkable(record)
    return checkable if ctx.only is None else [k for k in checkable if k in ctx.only]


def box_ids(record: dict) -> dict[int, tuple[int, int]]:
    """Structured mode's box ids: a running number over every instance with a box ->
    (expression index, instance index). Stable for a record, so a re-ask keeps the ids."""
    out, n = {}, 0
    for k, e in enumerate(record.get("expressions") or []):
        for j, inst in enumerate(e.get("instances", [])):
            if inst.get("bbox_2d"):
                out[n] = (k, j)
                n += 1
    return out


def _line(text: str, boxes: list) -> str:
    return f"{text.strip() or 'object'}: {json.dumps(boxes)}"


def build_prompt(record: dict, template: str, *, ctx: AnswerContext | None = None) -> tuple[str, dict] | None:
    """TAO's step-3 prompt (the step-2 lines); structured mode lists each group's boxes by id.

    A re-ask (``ctx.only``) lists only the groups asked about.
    """
    ctx = ctx or AnswerContext()
    exprs = record.get("expressions") or []
    asked = _asked(record, ctx)
    if not asked:
        return None
    frame = ctx.frame(record) if "width" in record else Frame(1000, 1000)
    fmt = ctx.convention.prompt

    def show(box):
        return list(box) if fmt == "xyxy_1000" else from_canonical(box, fmt, frame)

    hint = {"expressions": [exprs[k] for k in asked]}
    if ctx.mode == STRUCTURED:
        ids = box_ids(record)
        lines = []
        for k in asked:
            members = ", ".join(f"{n}: {show(exprs[k]['instances'][j]['bbox_2d'])}"
                                for n, (kk, j) in ids.items() if kk == k)
            lines.append(f"{json.dumps(exprs[k].get('text', '').strip() or 'object')}: {{{members}}}")
        return template.format(groups="\n".join(lines)), hint
    lines = [_line(exprs[k].get("text", ""), [show(i["bbox_2d"]) for i in exprs[k]["instances"] if i.get("bbox_2d")])
             for k in asked]
    return template.format(expr="\n".join(lines)), hint


def _reconcile(expr: dict, boxes: list, w: int, h: int, counts: dict, raws: list | None = None,
               rescue_with: tuple[Convention, Frame, str] | None = None) -> list[dict]:
    originals = list(expr.get("instances", []))
    used: set[int] = set()
    out = []
    raws = raws or [None] * len(boxes)
    for box, raw in zip(boxes, raws, strict=True):
        if raw is not None and rescue_with is not None and (box is None or not any(
                iou(box, o["bbox_2d"]) > 0 for o in originals)):
            free = [i for i in range(len(originals)) if i not in used]
            got = rescue(raw, [originals[i]["bbox_2d"] for i in free], *rescue_with)
            if got is not None:
                box = list(originals[free[got[2]]]["bbox_2d"])
                counts["rescued"] = counts.get("rescued", 0) + 1
        if box is None:
            counts["invalid_boxes"] += 1
            continue
        # unchanged: the same box, give or take a unit of rounding (a format conversion)
        exact = [i for i, o in enumerate(originals)
                 if i not in used and max(abs(a - b) for a, b in zip(o["bbox_2d"], box, strict=True)) <= 1]
        if exact:
            used.add(exact[0])
            out.append(dict(originals[exact[0]]))
            continue
        best, best_iou = -1, 0.0
        for i, o in enumerate(originals):
            v = iou(box, o["bbox_2d"])
            if i not in used and v > best_iou:
                best, best_iou = i, v
        if best >= 0 and raw is not None and rescue_with is not None:
            better = refine(raw, box, originals[best]["bbox_2d"], *rescue_with)
            if better is not None and max(abs(a - b) for a, b in zip(better[1], originals[best]["bbox_2d"],
                                                                     strict=True)) <= 1:
                used.add(best)
                out.append(dict(originals[best]))  # unchanged, once read in the right format
                counts["rescued"] = counts.get("rescued", 0) + 1
                continue
            if better is not None:
                box = better[1]
        if best < 0:
            if any(iou(box, o["bbox_2d"]) >= MIN_IOU for o in originals):
                counts["duplicates"] += 1
            else:
                counts["added_dropped"] += 1
            continue
        used.add(best)
        inst = dict(originals[best])
        inst.update({"bbox": to_pixels(box, w, h), "bbox_2d": box, "updated": True})
        counts["updated"] += 1
        out.append(inst)
    counts["removed"] += len(originals) - len(used)
    return out


def _find_expression(phrase: str, exprs: list[dict], asked: list[int], taken: set[int]) -> int | None:
    """The expression a returned phrase names: exact, then normalised text (unambiguous only)."""
    exact = [k for k in asked if exprs[k].get("text", "").strip() == phrase.strip()]
    if len(exact) >= 1:
        return exact[0]
    want = norm_phrase(phrase)
    loose = [k for k in asked if norm_phrase(exprs[k].get("text", "")) == want]
    if len(loose) == 1:
        return loose[0]
    return None


def _id_shift(items, ids: dict, exprs: list[dict], asked: list[int]) -> int:
    """-1 when the model numbered boxes from 1: more of its ids sit in the group it names
    once shifted."""
    def fit(shift: int) -> int:
        n = 0
        for phrase, gids, _ in items:
            k = _find_expression(phrase, exprs, asked, set())
            n += sum(1 for i in gids if (i + shift) in ids and (k is None or ids[i + shift][0] == k))
        return n

    return -1 if fit(-1) > fit(0) else 0


def _break_tie(reading, items, raw_lines, unique, exprs, asked):
    """Of readings that explain the boxes equally well, the one under which most boxes sit in
    the group their line names (a group's boxes are known). Still tied: the boxes the readings
    read differently are ambiguous."""
    options = [reading, *reading.ties]

    def fits(r) -> int:
        n = 0
        for (phrase, _), vals in zip(items, raw_lines, strict=True):
            k = _find_expression(phrase, exprs, asked, set())
            if k is None:
                continue
            own = [i["bbox_2d"] for i in exprs[k]["instances"] if i.get("bbox_2d")]
            for v in vals:
                box = r.boxes[unique.index(v)] if v is not None else None
                n += box is not None and any(iou(box, o) >= MIN_IOU for o in own)
        return n

    top = max(fits(r) for r in options)
    options = [r for r in options if fits(r) == top]
    chosen = options[0]
    ambiguous: set[int] = set()
    for other in options[1:]:
        ambiguous |= chosen.ambiguous(other)
    return chosen, ambiguous


def _new_counts() -> dict:
    return {"removed": 0, "updated": 0, "added_dropped": 0, "invalid_boxes": 0, "dropped_expressions": 0,
            "duplicates": 0}


def parse(text: str, record: dict, *, ctx: AnswerContext | None = None) -> dict:
    """The step-2 expressions reconciled with the model's verdict (see the module docstring).

    Groups are found by phrase (exact, then normalised: case, punctuation, markup, articles);
    in structured mode a renamed group is found by its ids when they all belong to one group.
    When the answer was cut (``ctx.truncated``), the groups it never reached are left out of
    the result and listed in ``missing`` (a re-ask asks about them), not dropped as removed.
    """
    ctx = ctx or AnswerContext()
    exprs = record.get("expressions") or []
    asked = _asked(record, ctx)
    w, h = int(record["width"]), int(record["height"])
    frame = ctx.frame(record)
    counts = _new_counts()
    n_boxes = sum(1 for k in asked for i in exprs[k]["instances"] if i.get("bbox_2d"))
    text, cut = cap_answer(text, answer_limit(n_boxes))
    if cut:
        ctx = ctx.but(truncated=True)  # what lies past the cut was not seen, not left out
    q = new_quality(ctx.mode, boxes_expected=n_boxes, answers_cut=int(bool(cut)))
    repairs: list[str] = ["oversized_answer_cut"] if cut else []
    verdicts: dict[int, list] = {}   # expression index -> boxes kept (canonical)
    verdict_raws: dict[int, list] = {}
    by_instance: dict[int, list[dict]] = {}
    named: set[int] = set()
    fmt = ""
    cut_phrases: list[str] = []
    found_any = False
    if ctx.mode == STRUCTURED:
        groups = parse_groups(text)
        if groups.shape:
            found_any = True
            repairs += groups.repairs
            ids = box_ids(record)
            shift = _id_shift(groups.items, ids, exprs, asked)
            if shift:
                repairs.append("one_based_ids")
            for phrase, gids, bad in groups.items:
                gids = [i + shift for i in gids]
                q["boxes_returned"] += len(gids) + len(bad)
                counts["invalid_boxes"] += len(bad)
                owners = {ids[i][0] for i in gids if i in ids}
                k = _find_expression(phrase, exprs, asked, named)
                if k is None and len(owners) == 1 and next(iter(owners)) in asked:
                    k = next(iter(owners))
                    repairs.append("phrase_rewritten")
                if k is None:
                    counts["added_dropped"] += len(gids)
                    continue
                named.add(k)
                keep = by_instance.setdefault(k, [])
                for i in gids:
                    if i not in ids or ids[i][0] != k:
                        counts["added_dropped"] += 1
                        continue
                    inst = exprs[k]["instances"][ids[i][1]]
                    if any(x is inst for x in keep):
                        counts["duplicates"] += 1
                        continue
                    keep.append(inst)
    if not found_any:
        parsed = parse_grounding_lines(text, truncated=ctx.truncated)
        if not parsed.items and not parsed.cut:
            raise ParseError("step 3: no '<phrase>: [[x1, y1, x2, y2], ...]' line in the answer", raw=text)
        repairs += parsed.repairs
        cut_phrases = parsed.cut
        if ctx.mode == STRUCTURED and parsed.items:
            repairs.append("structured_answer_without_ids")
        raw_lines, unique = line_values([boxes for _, boxes in parsed.items], repairs)
        targets: list[list] = []
        for k in asked:
            for i in exprs[k]["instances"]:
                if i.get("bbox_2d") and list(i["bbox_2d"]) not in targets:
                    targets.append(list(i["bbox_2d"]))  # a box shared by groups counts once
        reading = resolve(unique, targets, ctx.convention, frame, min_iou=MIN_IOU)
        ambiguous: set[int] = set()
        if reading.ties:
            reading, ambiguous = _break_tie(reading, parsed.items, raw_lines, unique, exprs, asked)
            repairs.append("convention_tie")
        fmt = reading.fmt
        if fmt != ctx.convention.prompt:
            repairs.append(f"read_as_{fmt}")
        for (phrase, _), vals in zip(parsed.items, raw_lines, strict=True):
            boxes, raws = [], []
            for v in vals:
                if v is None:
                    boxes.append(None)
                    raws.append(None)
                    continue
                kk = unique.index(v)
                if kk in ambiguous:
                    q["ambiguous_dropped"] += 1
                    continue
                repairs.extend(reading.repairs[kk])
                boxes.append(reading.boxes[kk])
                raws.append(v)
            q["boxes_returned"] += len(boxes)
            k = _find_expression(phrase, exprs, asked, named)
            if k is None:  # a renamed group is dropped, as TAO does (the prompt forbids renaming)
                counts["added_dropped"] += sum(b is not None for b in boxes)
                continue
            if k in verdicts:
                repairs.append("duplicate_phrase_merged")
                for b, r in zip(boxes, raws, strict=True):
                    if b not in verdicts[k]:
                        verdicts[k].append(b)
                        verdict_raws[k].append(r)
            else:
                verdicts[k] = list(boxes)
                verdict_raws[k] = list(raws)
            named.add(k)
    missing: list[int] = []
    if ctx.truncated or cut_phrases:
        missing = [k for k in asked if k not in named]
    out = []
    for k in asked:
        expr = exprs[k]
        if k in missing:
            continue
        if k in by_instance:
            instances = [dict(i) for i in by_instance[k]]
            counts["removed"] += sum(1 for i in expr["instances"] if i.get("bbox_2d")) - len(instances)
        elif k in verdicts:
            instances = _reconcile(expr, verdicts[k], w, h, counts, verdict_raws.get(k),
                                   (ctx.convention, frame, fmt))
        else:
            instances = []
            counts["removed"] += len(expr.get("instances", []))
        if not instances:
            counts["dropped_expressions"] += 1
            continue
        out.append({**expr, "instances": instances, "verified": True})
    q["box_format"] = fmt
    q["boxes_matched"] = sum(len(e["instances"]) for e in out)
    q["hallucinated_dropped"] = counts["added_dropped"]
    q["duplicates_dropped"] = counts.pop("duplicates")
    if counts.pop("rescued", 0):
        repairs.append("mixed_convention")
    q["invalid_boxes"] = counts["invalid_boxes"]
    q["kitti_skipped"] = sum(1 for k in missing for i in exprs[k]["instances"] if i.get("bbox_2d"))
    q["repairs"] = new_quality(repairs=repairs)["repairs"]
    report = {"repairs": list(dict.fromkeys(repairs)), **counts, "quality": q}
    return {"expressions": out, "report": report, "missing": missing}


def merge(first: dict, reask: dict, record: dict) -> dict:
    """A first (cut) answer and the re-ask about the groups it missed, in input order."""
    order = {e["expression_id"]: k for k, e in enumerate(record.get("expressions") or [])}
    got = {e["expression_id"]: e for e in first["expressions"]}
    for e in reask["expressions"]:
        got.setdefault(e["expression_id"], e)
    exprs = sorted(got.values(), key=lambda e: order.get(e["expression_id"], 1 << 30))
    a, b = first["report"], reask["report"]
    report = {"repairs": list(dict.fromkeys(a["repairs"] + b["repairs"]))}
    for key in ("removed", "updated", "added_dropped", "invalid_boxes", "dropped_expressions"):
        report[key] = a.get(key, 0) + b.get(key, 0)
    q = merge_quality(a["quality"], b["quality"])
    q["boxes_expected"] = a["quality"]["boxes_expected"]
    q["kitti_skipped"] = b["quality"]["kitti_skipped"]
    q["boxes_matched"] = sum(len(e["instances"]) for e in exprs)
    report["quality"] = q
    return {"expressions": exprs, "report": report, "missing": reask.get("missing", [])}


def all_removed(record: dict) -> dict:
    """A cleanly finished empty answer: the model removed every box, so no expression survives."""
    exprs = record.get("expressions") or []
    n_boxes = sum(len(e.get("instances", [])) for e in exprs)
    q = new_quality(repairs=["empty_answer_all_removed"], boxes_expected=n_boxes)
    return {"expressions": [], "report": {"repairs": ["empty_answer_all_removed"], "removed": n_boxes,
                                          "updated": 0, "added_dropped": 0, "invalid_boxes": 0,
                                          "dropped_expressions": len(exprs), "quality": q}}


def n_items(record: dict) -> int:
    """Boxes the answer covers (sizes the output budget): every box of every phrase."""
    return sum(len(e.get("instances", [])) for e in record.get("expressions") or [])


def empty() -> dict:
    return {"expressions": [], "report": {"quality": new_quality("")}}  # no call: nothing to report but the shape


def record(rec: dict, parsed: dict) -> dict:
    return with_step(rec, DEF.number, {"expressions": parsed["expressions"]}, parsed["report"])


def legacy(rec: dict) -> str:
    """``.txt.step3``: the surviving ``<phrase>: [[...]]`` lines, newline-terminated."""
    lines = grounding_lines(rec.get("expressions", []))
    return "\n".join(lines) + ("\n" if lines else "")
