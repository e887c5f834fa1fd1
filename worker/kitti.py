"""KITTI label parsing: field 0 is the type, fields 4-7 the pixel box ``left top right bottom``.

Beyond the reference, every line we cannot use is reported with its line number and reason
instead of disappearing, ignored types are dropped, and boxes are clipped to the image.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from worker.geometry import area, clip


@dataclass(frozen=True)
class SkippedLine:
    """A label line that produced no box, and why."""

    line: int
    reason: str
    text: str


@dataclass
class LabelParse:
    boxes: list[dict] = field(default_factory=list)
    skipped: list[SkippedLine] = field(default_factory=list)
    ignored: int = 0


BOM = "\ufeff"
# Boxes one image may carry into a prompt (``data.max_boxes_per_image``'s default): step 0 asks
# about every box in one answer, and 200 boxes already need ~14k output tokens in text mode.
MAX_BOXES_PER_IMAGE = 200


def decode_label_bytes(data: bytes) -> str:
    """Label files are ASCII in practice; accept UTF-8 and fall back to latin-1 rather than fail.

    A UTF-8 byte-order mark (Windows editors write one) is dropped: left in, the first type
    would read ``\ufeffCar`` and a first ``DontCare`` line would not be ignored.
    """
    data = data.removeprefix(b"\xef\xbb\xbf")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def type_key(kind: str) -> str:
    """How KITTI types compare: case, surrounding blanks and a byte-order mark do not count
    (``DontCare``, ``dontcare`` and ``DONTCARE `` are one type)."""
    return kind.strip().lstrip(BOM).strip().casefold()


def ignored_types(ignore_types: Iterable[str]) -> frozenset[str]:
    """``data.ignore_types`` as :func:`type_key` values."""
    return frozenset(type_key(str(t)) for t in ignore_types if type_key(str(t)))


def cap_boxes(rows: list, limit: int) -> tuple[list, int]:
    """At most ``limit`` of ``rows`` (``[x1, y1, x2, y2, type]`` lists or ``{"bbox"}`` dicts):
    the largest boxes, kept in their order (their indices are the KITTI ids the model sees).

    Returns ``(kept, dropped)``. Why the largest: a prompt cannot carry a label file with
    thousands of boxes, and the smallest boxes are the ones a phrase can least tell apart.
    """
    if limit <= 0 or len(rows) <= limit:
        return rows, 0

    def size(r) -> float:
        return area(r["bbox"] if isinstance(r, dict) else r[:4])

    keep = set(sorted(range(len(rows)), key=lambda i: (-size(rows[i]), i))[:limit])
    return [r for i, r in enumerate(rows) if i in keep], len(rows) - limit


def parse_kitti(
    text: str, *, width: int, height: int, ignore_types: Iterable[str] = ("DontCare",)
) -> LabelParse:
    """Parse KITTI label text into ``{"type", "bbox"}`` boxes in pixels of a ``width x height`` image.

    Lines with fewer than 8 fields are skipped (as the reference does), as are non-numeric or NaN
    coordinates and boxes left with no area after clipping. Whitespace may be spaces or tabs and
    line endings LF or CRLF. ``ignore_types`` match whatever their case (:func:`type_key`); the
    type a box keeps is written as in the file.
    """
    ignore = ignored_types(ignore_types)
    out = LabelParse()
    for lineno, raw in enumerate(text.lstrip(BOM).splitlines(), start=1):
        fields = raw.split()
        if not fields:
            continue
        if len(fields) < 8:
            out.skipped.append(SkippedLine(lineno, f"{len(fields)} fields, need at least 8", raw[:200]))
            continue
        kind = fields[0].lstrip(BOM)
        if type_key(kind) in ignore:
            out.ignored += 1
            continue
        try:
            coords = [float(v) for v in fields[4:8]]
        except ValueError:
            out.skipped.append(SkippedLine(lineno, "non-numeric box field", raw[:200]))
            continue
        if any(math.isnan(v) or math.isinf(v) for v in coords):
            out.skipped.append(SkippedLine(lineno, "NaN or infinite box field", raw[:200]))
            continue
        x1, y1, x2, y2 = coords
        if x2 < x1 or y2 < y1:
            out.skipped.append(SkippedLine(lineno, "inverted box (right < left or bottom < top)", raw[:200]))
            continue
        box = [round(v, 2) for v in clip(coords, width, height)]
        if area(box) <= 0:
            out.skipped.append(SkippedLine(lineno, "box has no area inside the image", raw[:200]))
            continue
        out.boxes.append({"type": kind, "bbox": box})
    return out
