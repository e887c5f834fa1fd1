"""Box arithmetic: pixel <-> 0-1000 space, clipping, IoU and one-to-one matching.

Everything the VLM sees is in the model's 0-1000 space; everything we store for training is in
pixels of the original image. Matching maps a model's box back to the KITTI box it came from.
"""

from __future__ import annotations

from collections.abc import Sequence

from worker.constants import NORM

Box = list[float]


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


def match_greedy(
    candidates: Sequence[Sequence[float] | None], targets: Sequence[Sequence[float]], *, min_iou: float
) -> tuple[dict[int, int], float]:
    """Greedy one-to-one matching by IoU, best pairs first: ``({candidate: target}, summed IoU)``.

    Greedy on sorted IoU is what annotation tools use for this size (tens of boxes); it is
    deterministic because ties break on indices. ``None`` candidates (boxes that could not be
    read) match nothing.
    """
    pairs = sorted((-v, ci, ti) for ci, c in enumerate(candidates) if c is not None
                   for ti, t in enumerate(targets) if (v := iou(c, t)) >= min_iou)
    used_t: set[int] = set()
    result: dict[int, int] = {}
    total = 0.0
    for neg, ci, ti in pairs:
        if ci in result or ti in used_t:
            continue
        result[ci] = ti
        used_t.add(ti)
        total -= neg
    return result, total


def match_one_to_one(
    candidates: Sequence[Sequence[float]], targets: Sequence[Sequence[float]], *, min_iou: float
) -> dict[int, int]:
    """``match_greedy``'s assignment alone: ``{candidate_index: target_index}``."""
    return match_greedy(candidates, targets, min_iou=min_iou)[0]


def nearest(candidate: Sequence[float], targets: Sequence[Sequence[float]]) -> tuple[int, float]:
    """Index and IoU of the target that overlaps ``candidate`` most; (-1, 0.0) if none overlaps."""
    best, best_iou = -1, 0.0
    for ti, t in enumerate(targets):
        v = iou(candidate, t)
        if v > best_iou:
            best, best_iou = ti, v
    return best, best_iou
