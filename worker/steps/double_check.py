"""Step 3, ``double_check``: each step-2 box re-checked against the image.

Input columns: ``expressions`` (step 2). Output: ``expressions`` reconciled as the reference
does: a phrase the model left out is dropped; a box returned unchanged keeps its instance; a
moved box keeps the id of the box it replaces (the unused original it overlaps most) and is
marked ``updated``; boxes the model adds are dropped (it was told not to) and counted;
survivors are ``verified: true``.
"""

from __future__ import annotations

from worker.errors import ParseError
from worker.geometry import iou, sanitize_norm_box, to_pixels
from worker.steps.parsing import parse_grounding_lines
from worker.steps.records import grounding_lines, with_step

NUMBER = 3
NAME = "double_check"
INPUTS = ("expressions",)
OUTPUTS = ("expressions",)


def build_prompt(record: dict, template: str) -> tuple[str, dict] | None:
    lines = grounding_lines(record.get("expressions") or [])
    if not lines:
        return None
    return template.format(expr="\n".join(lines)), {"expressions": record.get("expressions") or []}


def _reconcile(expr: dict, boxes: list, w: int, h: int, counts: dict) -> list[dict]:
    originals = list(expr.get("instances", []))
    used: set[int] = set()
    out = []
    for raw in boxes:
        box = sanitize_norm_box(raw)
        if box is None:
            counts["invalid_boxes"] += 1
            continue
        exact = [i for i, o in enumerate(originals) if i not in used and list(o["bbox_2d"]) == box]
        if exact:
            used.add(exact[0])
            out.append(dict(originals[exact[0]]))
            continue
        best, best_iou = -1, 0.0
        for i, o in enumerate(originals):
            v = iou(box, o["bbox_2d"])
            if i not in used and v > best_iou:
                best, best_iou = i, v
        if best < 0:
            counts["added_dropped"] += 1
            continue
        used.add(best)
        inst = dict(originals[best])
        inst.update({"bbox": to_pixels(box, w, h), "bbox_2d": box, "updated": True})
        counts["updated"] += 1
        out.append(inst)
    counts["removed"] += len(originals) - len(used)
    return out


def parse(text: str, record: dict) -> dict:
    parsed = parse_grounding_lines(text)
    if not parsed.items:
        raise ParseError("step 3: no '<phrase>: [[x1, y1, x2, y2], ...]' line in the answer", raw=text)
    w, h = int(record["width"]), int(record["height"])
    verified = {phrase.strip(): boxes for phrase, boxes in parsed.items}  # last one wins, as TAO
    counts = {"removed": 0, "updated": 0, "added_dropped": 0, "invalid_boxes": 0, "dropped_expressions": 0}
    out = []
    for expr in record.get("expressions") or []:
        boxes = verified.get(expr.get("text", "").strip())
        instances = _reconcile(expr, boxes, w, h, counts) if boxes else []
        if not instances:
            counts["dropped_expressions"] += 1
            counts["removed"] += 0 if boxes else len(expr.get("instances", []))
            continue
        out.append({**expr, "instances": instances, "verified": True})
    return {"expressions": out, "report": {"repairs": parsed.repairs, **counts}}


def all_removed(record: dict) -> dict:
    """A cleanly finished empty answer: the model removed every box, so no expression survives."""
    exprs = record.get("expressions") or []
    n_boxes = sum(len(e.get("instances", [])) for e in exprs)
    return {"expressions": [], "report": {"repairs": ["empty_answer_all_removed"], "removed": n_boxes,
                                          "updated": 0, "added_dropped": 0, "invalid_boxes": 0,
                                          "dropped_expressions": len(exprs)}}


def empty() -> dict:
    return {"expressions": [], "report": {}}


def record(rec: dict, parsed: dict) -> dict:
    return with_step(rec, NUMBER, {"expressions": parsed["expressions"]}, parsed["report"])


def legacy(rec: dict) -> str:
    """``.txt.step3``: the surviving ``<phrase>: [[...]]`` lines, newline-terminated."""
    lines = grounding_lines(rec.get("expressions", []))
    return "\n".join(lines) + ("\n" if lines else "")
