"""Box arithmetic: pixel <-> 0-1000 space, clipping, IoU and one-to-one matching.

Everything the VLM sees is in the model's 0-1000 space; everything we store for training is in
pixels of the original image. Matching maps a model's box back to the KITTI box it came from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from worker.constants import NORM

Box = list[float]


def to_norm(bbox: Sequence[float], width: int, height: int) -> list[int]:
    """Pixel box -> integer 0-1000 box, as the reference sends boxes to the model."""
    x1, y1, x2, y2 = bbox
    return [
        round(x1 / width * NORM),
        round(y1 / height * NORM),
        round(x2 / width * NORM),
        round(y2 / height * NORM),
    ]


def to_pixels(box: Sequence[float], width: int, height: int) -> list[float]:
    """0-1000 box -> pixel box, rounded to 2 decimals (sub-pixel precision is noise here)."""
    x1, y1, x2, y2 = box
    return [
        round(x1 / NORM * width, 2),
        round(y1 / NORM * height, 2),
        round(x2 / NORM * width, 2),
        round(y2 / NORM * height, 2),
    ]


def clip(bbox: Sequence[float], width: float, height: float) -> list[float]:
    """Clip a box to ``[0, width] x [0, height]``."""
    x1, y1, x2, y2 = bbox
    return [min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width),
            min(max(y2, 0.0), height)]


def area(bbox: Sequence[float]) -> float:
    x1, y1, x2, y2 = bbox
    return max(0.0, x2 - x1) * max(0.0, y2 - y1)


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix1, iy1 = max(a[0], b[0]), max(a[1], b[1])
    ix2, iy2 = min(a[2], b[2]), min(a[3], b[3])
    inter = area([ix1, iy1, ix2, iy2])
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def sanitize_norm_box(values: Sequence[object]) -> list[int] | None:
    """A model's box as ``[x1, y1, x2, y2]`` ints in 0-1000, or None when it is not a box.

    Accepts numbers or numeric strings; reorders swapped corners; clamps to the range; rejects
    NaN, the wrong length and boxes with no area.
    """
    if not isinstance(values, (list, tuple)) or len(values) != 4:
        return None
    out: list[float] = []
    for v in values:
        if isinstance(v, bool):
            return None
        try:
            f = float(v)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return None
        if math.isnan(f) or math.isinf(f):
            return None
        out.append(min(max(f, 0.0), float(NORM)))
    x1, x2 = sorted((out[0], out[2]))
    y1, y2 = sorted((out[1], out[3]))
    if x2 - x1 <= 0 or y2 - y1 <= 0:
        return None
    return [round(x1), round(y1), round(x2), round(y2)]


def match_one_to_one(
    candidates: Sequence[Sequence[float]], targets: Sequence[Sequence[float]], *, min_iou: float
) -> dict[int, int]:
    """Greedy one-to-one matching by IoU (best pairs first): ``{candidate_index: target_index}``.

    Greedy on sorted IoU is what annotation tools use for this size (tens of boxes); it is
    deterministic because ties break on indices.
    """
    pairs = []
    for ci, c in enumerate(candidates):
        for ti, t in enumerate(targets):
            v = iou(c, t)
            if v >= min_iou:
                pairs.append((-v, ci, ti))
    pairs.sort()
    used_c: set[int] = set()
    used_t: set[int] = set()
    result: dict[int, int] = {}
    for _, ci, ti in pairs:
        if ci in used_c or ti in used_t:
            continue
        used_c.add(ci)
        used_t.add(ti)
        result[ci] = ti
    return result


def nearest(candidate: Sequence[float], targets: Sequence[Sequence[float]]) -> tuple[int, float]:
    """Index and IoU of the target that overlaps ``candidate`` most; (-1, 0.0) if none overlaps."""
    best, best_iou = -1, 0.0
    for ti, t in enumerate(targets):
        v = iou(candidate, t)
        if v > best_iou:
            best, best_iou = ti, v
    return best, best_iou
