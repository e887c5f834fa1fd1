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

from worker.errors import ParseError
from worker.geometry import match_one_to_one, sanitize_norm_box
from worker.steps.parsing import parse_json_objects
from worker.steps.records import with_step

NUMBER = 0
NAME = "region_expr"
INPUTS = ("image_path", "width", "height", "kitti_bboxes")
OUTPUTS = ("regions",)
MIN_IOU = 0.5

_BOX_KEYS = ("bbox_2d", "bbox", "box_2d", "box")
_TYPE_KEYS = ("type", "label", "category", "class")


def prompt_box(box: list, width: int, height: int) -> list[int]:
    """A pixel KITTI box as the reference sends it: ``int(v / size * 1000)`` (truncated)."""
    return [int(box[0] / width * 1000), int(box[1] / height * 1000),
            int(box[2] / width * 1000), int(box[3] / height * 1000)]


def format_bboxes(kitti: list[list], width: int, height: int) -> str:
    """TAO's ``format_bboxes``, byte for byte: ``[Car: [52, 185, 156, 370] , Van: [...]  ]``."""
    if not kitti:
        return "[]"
    parts = []
    for b in kitti:
        x1, y1, x2, y2 = prompt_box(b, width, height)
        parts.append(f"{b[4]}: [{x1}, {y1}, {x2}, {y2}] ")
    return "[" + ", ".join(parts) + " ]"


def build_prompt(record: dict, template: str) -> tuple[str, dict] | None:
    """The prompt and the offline hint, or None when there is nothing to ask (no boxes)."""
    kitti = record.get("kitti_bboxes") or []
    if not kitti:
        return None
    w, h = int(record["width"]), int(record["height"])
    hint = {"boxes": [{"index": i, "type": b[4], "bbox_2d": prompt_box(b, w, h)} for i, b in enumerate(kitti)]}
    return template.format(bboxes=format_bboxes(kitti, w, h)), hint


def _first(item: dict, keys: tuple[str, ...]):
    for k in keys:
        if k in item:
            return item[k]
    return None


def parse(text: str, record: dict) -> dict:
    """Regions matched one-to-one to KITTI boxes; raises ParseError when none match."""
    parsed = parse_json_objects(text)
    kitti = record.get("kitti_bboxes") or []
    w, h = int(record["width"]), int(record["height"])
    targets = [prompt_box(b, w, h) for b in kitti]
    candidates, invalid = [], 0
    for item in parsed.items:
        box = _first(item, _BOX_KEYS)
        if isinstance(box, str):
            try:
                box = json.loads(box)
            except ValueError:
                box = None
        clean = sanitize_norm_box(box) if box is not None else None
        if clean is None:
            invalid += 1
            continue
        candidates.append((clean, item))
    matches = match_one_to_one([c[0] for c in candidates], targets, min_iou=MIN_IOU)
    if not matches:
        raise ParseError(
            f"step 0: no region in the answer matched a KITTI box "
            f"({len(parsed.items)} objects parsed, {invalid} without a usable box)",
            raw=text,
        )
    regions = []
    for ci, ti in sorted(matches.items(), key=lambda kv: kv[1]):
        box, item = candidates[ci]
        kind = _first(item, _TYPE_KEYS)
        regions.append({
            "bbox": [float(v) for v in kitti[ti][:4]],
            "bbox_2d": box,
            "type": str(kind) if kind not in (None, "") else str(kitti[ti][4]),
            "color": str(item.get("color") or "unknown"),
            "description": str(item.get("description") or "").strip(),
            "kitti_index": ti,
        })
    matched = set(matches.values())
    report = {
        "repairs": parsed.repairs,
        "invalid_boxes": invalid,
        "invented": len(candidates) - len(matches),
        "missed_kitti": [i for i in range(len(kitti)) if i not in matched],
    }
    return {"regions": regions, "report": report}


def empty() -> dict:
    """The result when no call is needed (an image without boxes): no regions, as the reference."""
    return {"regions": [], "report": {}}


def record(rec: dict, parsed: dict) -> dict:
    return with_step(rec, NUMBER, {"regions": parsed["regions"]}, parsed["report"])


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
