"""Box conventions: how each model writes boxes, and the conversion to ours at the edge.

Inside refexp every box a model sees or returns is *canonical*: ``[x1, y1, x2, y2]`` in the
0-1000 space of the original image (``worker.constants.NORM``). Models do not all speak that:

======================  =====================================================================
model (name contains)   what it writes natively
======================  =====================================================================
``gemini``              ``yxyx_1000`` — ``box_2d: [ymin, xmin, ymax, xmax]``, 0-1000
``qwen3-vl``            ``xyxy_1000`` — relative 0-1000 (Qwen3-VL changed this from 2.5)
``qwen2.5-vl``          ``xyxy_smart_resize`` — absolute pixels of the image *after* the
                        server's ``smart_resize`` (see :func:`smart_resize`)
``qwen2-vl``            ``xyxy_1000``
anything else           ``xyxy_1000`` — what the TAO prompts ask for
======================  =====================================================================

Pixel formats (``xyxy_pixels``, ``xyxy_smart_resize``) are pixels of the image *we send*: with
``vlm.downscale_to_pixels`` set that is the downscaled copy (:func:`downscaled_size`, carried by
:class:`Frame` as ``sent``), while canonical boxes, being relative, and the records' pixel boxes,
in the original image's pixels, do not change.

``vlm.box_format`` overrides the table: ``auto`` (the table), ``xyxy_1000``, ``yxyx_1000``,
``xyxy_pixels`` (pixels of the image we send), ``xyxy_norm1`` (0-1 floats) or
``xyxy_smart_resize``.

Prompts write boxes in the model's native format when its order is x-first (Qwen2.5-VL gets
resized pixels, which is what it can look at), and in ``xyxy_1000`` otherwise — the TAO prompts
say ``[x1, y1, x2, y2]`` in so many words, so Gemini is told x-first and mostly answers x-first.

Answers are read per answer, not per box (:func:`resolve`): the boxes are read in the prompt's
format; another format (the native one, the axis swap, pixels) is used only when it explains
strictly more of the answer's boxes — by matching the boxes we know the model was talking about
— and at least half of them. That is the "detect where unambiguous" rule: a wrong guess would
need a different convention to produce more IoU >= 0.5 matches than the right one. Per box, a
box whose values are all <= 1 is 0-1 normalised (rescaled), values a little outside the range
are clamped, corners are reordered, and NaN, wrong lengths, far-out-of-range values and boxes
with no area are rejected.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from worker.constants import NORM
from worker.geometry import iou, match_greedy

XYXY_1000 = "xyxy_1000"
YXYX_1000 = "yxyx_1000"
XYXY_PIXELS = "xyxy_pixels"
XYXY_NORM1 = "xyxy_norm1"
XYXY_SMART_RESIZE = "xyxy_smart_resize"
XYWH_1000 = "xywh_1000"  # COCO-style [x, y, width, height]: never asked for, only detected
FORMATS = (XYXY_1000, YXYX_1000, XYXY_PIXELS, XYXY_NORM1, XYXY_SMART_RESIZE)
BOX_FORMAT_CHOICES = ("auto", *FORMATS)

# (pattern on the lower-cased model name, native format). First match wins.
MODEL_TABLE: tuple[tuple[str, str], ...] = (
    (r"gemini", YXYX_1000),
    (r"qwen2\.?5[-_ ]?vl|qwen2_5_vl", XYXY_SMART_RESIZE),
    (r"qwen3(\.\d+)?[-_ ]?vl|qwen3_vl", XYXY_1000),
    (r"qwen2[-_ ]?vl", XYXY_1000),
)

# Qwen2.5-VL's image processor (HF ``Qwen2VLImageProcessor`` defaults, which vLLM and SGLang
# use unless the server is started with other ``min_pixels``/``max_pixels``): both sides are
# rounded to multiples of 28 (14-px patches merged 2x2), then scaled to keep the pixel count in
# [MIN_PIXELS, MAX_PIXELS] with the aspect ratio kept.
PATCH = 28
MIN_PIXELS = 4 * 28 * 28
MAX_PIXELS = 16384 * 28 * 28

# How far outside its range a value may be before the box is "not in this format" (models
# overshoot a little at image borders; that is clamped, not rejected).
_SLACK = 0.02


def smart_resize(height: int, width: int, *, factor: int = PATCH, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """The ``(height, width)`` a Qwen2.5-VL server resizes an image to (qwen-vl-utils' rule).

    >>> smart_resize(375, 1242)
    (364, 1232)
    """
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def downscaled_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The ``(width, height)`` an image is sent at under ``vlm.downscale_to_pixels`` = ``max_pixels``
    (0 = off): unchanged when it has no more pixels than that, else both sides scaled by one factor
    and rounded down, so the result never exceeds the limit and the aspect ratio stays within a pixel.

    >>> downscaled_size(3264, 2448, 1_000_000)
    (1154, 866)
    """
    if max_pixels <= 0 or width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))


@dataclass(frozen=True)
class Convention:
    """How one model writes boxes (``native``) and how our prompts write them (``prompt``)."""

    native: str = XYXY_1000
    prompt: str = XYXY_1000
    source: str = "default"


def convention_for(model: str, box_format: str = "auto") -> Convention:
    """The convention for ``model``: ``vlm.box_format`` when set, else the table."""
    if box_format and box_format != "auto":
        if box_format not in FORMATS:
            raise ValueError(f"box format {box_format!r} is not one of: {', '.join(BOX_FORMAT_CHOICES)}")
        native, source = box_format, "vlm.box_format"
    else:
        native, source = XYXY_1000, "default"
        name = (model or "").lower()
        for pattern, fmt in MODEL_TABLE:
            if re.search(pattern, name):
                native, source = fmt, f"table:{pattern}"
                break
    prompt = native if native.startswith("xyxy") else XYXY_1000
    return Convention(native=native, prompt=prompt, source=source)


@dataclass(frozen=True)
class Frame:
    """The image a box lives in: the original size, the size we send (``sent``: differs only under
    ``vlm.downscale_to_pixels``) and the size the server resizes that to."""

    width: int
    height: int
    sent_width: int = 0  # 0: the original size is sent
    sent_height: int = 0

    @classmethod
    def for_image(cls, width: int, height: int, downscale_to_pixels: int = 0) -> Frame:
        """The frame of an image sent under ``vlm.downscale_to_pixels`` (0 = as it is)."""
        sw, sh = downscaled_size(width, height, downscale_to_pixels)
        return cls(width, height, sw, sh)

    @property
    def sent(self) -> tuple[int, int]:
        """``(width, height)`` of the image the model is shown."""
        return (self.sent_width or self.width), (self.sent_height or self.height)

    @property
    def resized(self) -> tuple[int, int]:
        """``(width, height)`` after Qwen2.5-VL's smart_resize of the image we send."""
        w, h = self.sent
        h, w = smart_resize(h, w)
        return w, h

    def scale(self, fmt: str) -> tuple[float, float]:
        """Units per canonical unit along x and y for a format."""
        if fmt in (XYXY_1000, YXYX_1000, XYWH_1000):
            return 1.0, 1.0
        if fmt == XYXY_NORM1:
            return 1.0 / NORM, 1.0 / NORM
        if fmt == XYXY_PIXELS:
            w, h = self.sent
            return w / NORM, h / NORM
        if fmt == XYXY_SMART_RESIZE:
            w, h = self.resized
            return w / NORM, h / NORM
        raise ValueError(f"unknown box format {fmt!r}")


def swapped(fmt: str) -> str:
    """The same format with the axes swapped (only 0-1000 has a y-first name)."""
    return {XYXY_1000: YXYX_1000, YXYX_1000: XYXY_1000}.get(fmt, fmt)


# --------------------------------------------------------------------------- raw values

_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|NaN|inf|Infinity", re.I)
_DICT_KEYS = (("x1", "y1", "x2", "y2"), ("xmin", "ymin", "xmax", "ymax"), ("left", "top", "right", "bottom"),
              ("x_min", "y_min", "x_max", "y_max"))


def _number(v: object) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        s = v.strip()
        try:
            return float(s)
        except ValueError:
            return None
    return None


def line_values(lines: list[list], repairs: list[str]) -> tuple[list[list[list[float] | None]], list[list[float]]]:
    """Every box of every answer line as raw numbers (``None`` where unreadable), and the distinct
    readable boxes in first-seen order (what a convention is resolved over). Repairs are appended."""
    by_line: list[list[list[float] | None]] = []
    unique: list[list[float]] = []
    for boxes in lines:
        vals = []
        for b in boxes:
            values, rep = raw_values(b)
            if rep:
                repairs.append(rep)
            vals.append(values)
            if values is not None and values not in unique:
                unique.append(values)
        by_line.append(vals)
    return by_line, unique


def raw_values(value: object) -> tuple[list[float] | None, str]:
    """A model's box as a flat list of numbers and the repair it took ("" for none).

    Accepts ``[x1, y1, x2, y2]`` (numbers or numeric strings), a string holding four numbers,
    corner pairs ``[[x1, y1], [x2, y2]]``, a box wrapped once ``[[x1, y1, x2, y2]]`` and dicts
    with ``x1..y2``/``xmin..ymax`` keys. Returns ``(None, "")`` for anything else, including
    three or five numbers: a wrong length is rejected, never guessed at.
    """
    repair = ""
    if isinstance(value, str):
        nums = _NUMBER.findall(value)
        if not nums:
            return None, ""
        value = [float(n) for n in nums]
        repair = "box_as_string"
    if isinstance(value, dict):
        low = {str(k).lower(): v for k, v in value.items()}
        for keys in _DICT_KEYS:
            if all(k in low for k in keys):
                value = [low[k] for k in keys]
                repair = "box_as_dict"
                break
        else:
            return None, ""
    if not isinstance(value, (list, tuple)):
        return None, ""
    if len(value) == 1 and isinstance(value[0], (list, tuple)):
        value = value[0]
        repair = repair or "nested_box"
    if (len(value) == 2 and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value)):
        value = [value[0][0], value[0][1], value[1][0], value[1][1]]
        repair = repair or "corner_pairs"
    if len(value) != 4:
        return None, ""
    out = []
    for v in value:
        f = _number(v)
        if f is None:
            return None, ""
        if isinstance(v, str):
            repair = repair or "box_as_string"
        out.append(f)
    return out, repair


# --------------------------------------------------------------------------- conversion

def to_canonical(values: Sequence[float], fmt: str, frame: Frame) -> tuple[list[int] | None, list[str]]:
    """Four numbers in ``fmt`` -> a canonical int box, or None when they are not a box there.

    Returns the repairs it made: ``norm1_rescaled`` (all values <= 1), ``clamped``,
    ``reordered``.
    """
    repairs: list[str] = []
    vals = [float(v) for v in values]
    if len(vals) != 4 or any(math.isnan(v) or math.isinf(v) for v in vals):
        return None, repairs
    if fmt == YXYX_1000:
        vals = [vals[1], vals[0], vals[3], vals[2]]
    elif fmt == XYWH_1000:
        if vals[2] <= 0 or vals[3] <= 0:
            return None, repairs
        vals = [vals[0], vals[1], vals[0] + vals[2], vals[1] + vals[3]]
    sx, sy = frame.scale(fmt)
    if fmt != XYXY_NORM1 and all(0.0 <= v <= 1.0 for v in vals) and any(v != int(v) for v in vals):
        sx = sy = 1.0 / NORM  # a 0-1 box in a 0-1000 or pixel answer
        repairs.append("norm1_rescaled")
    lim_x, lim_y = NORM * sx, NORM * sy
    x1, y1, x2, y2 = vals
    for v, lim in ((x1, lim_x), (x2, lim_x), (y1, lim_y), (y2, lim_y)):
        if v < -_SLACK * lim or v > (1 + _SLACK) * lim:
            return None, repairs
    box = [x1 / sx, y1 / sy, x2 / sx, y2 / sy]
    clamped = [min(max(v, 0.0), float(NORM)) for v in box]
    if any(abs(a - b) > 1e-9 for a, b in zip(box, clamped, strict=True)):
        repairs.append("clamped")
    x1, y1, x2, y2 = clamped
    if x1 > x2 or y1 > y2:
        repairs.append("reordered")
    x1, x2 = sorted((x1, x2))
    y1, y2 = sorted((y1, y2))
    out = [round(x1), round(y1), round(x2), round(y2)]
    if out[2] - out[0] <= 0 or out[3] - out[1] <= 0:
        return None, repairs
    return out, repairs


def from_canonical(box: Sequence[float], fmt: str, frame: Frame) -> list:
    """A canonical box written in ``fmt`` (ints, or 3-decimal floats for 0-1), for prompts."""
    sx, sy = frame.scale(fmt)
    x1, y1, x2, y2 = (float(v) for v in box)
    vals = [x1 * sx, y1 * sy, x2 * sx, y2 * sy]
    if fmt == YXYX_1000:
        vals = [vals[1], vals[0], vals[3], vals[2]]
    if fmt == XYXY_NORM1:
        return [round(v, 3) for v in vals]
    return [round(v) for v in vals]


def prompt_box_in(kitti_box: Sequence[float], fmt: str, frame: Frame) -> list:
    """A pixel KITTI box as a prompt writes it in ``fmt``.

    For ``xyxy_1000`` this is TAO's ``int(v / size * 1000)`` (truncated), byte for byte.
    """
    x1, y1, x2, y2 = (float(v) for v in kitti_box[:4])
    if fmt == XYXY_1000:
        return [int(x1 / frame.width * NORM), int(y1 / frame.height * NORM),
                int(x2 / frame.width * NORM), int(y2 / frame.height * NORM)]
    if fmt == XYXY_PIXELS and frame.sent == (frame.width, frame.height):
        return [round(x1), round(y1), round(x2), round(y2)]
    if fmt in (XYXY_PIXELS, XYXY_SMART_RESIZE):
        w, h = frame.resized if fmt == XYXY_SMART_RESIZE else frame.sent
        return [round(x1 * w / frame.width), round(y1 * h / frame.height),
                round(x2 * w / frame.width), round(y2 * h / frame.height)]
    canonical = [x1 / frame.width * NORM, y1 / frame.height * NORM, x2 / frame.width * NORM,
                 y2 / frame.height * NORM]
    return from_canonical(canonical, fmt, frame)


# --------------------------------------------------------------------------- per-answer choice

@dataclass
class Reading:
    """The boxes of one answer read in one format, and how well they explain the answer.

    ``ties`` holds other readings that explain it as well but join some boxes to other targets:
    the caller breaks the tie with other evidence (types, key names) or drops those boxes
    (``ambiguous``).
    """

    fmt: str
    boxes: list[list[int] | None]
    repairs: list[list[str]]
    assignment: dict[int, int] = field(default_factory=dict)
    iou_sum: float = 0.0
    ties: list[Reading] = field(default_factory=list)

    @property
    def matches(self) -> int:
        return len(self.assignment)

    def ambiguous(self, other: Reading) -> set[int]:
        """Boxes this reading and ``other`` join to different targets (or only one joins)."""
        keys = set(self.assignment) | set(other.assignment)
        return {k for k in keys if self.assignment.get(k) != other.assignment.get(k)}


def read_all(raw: Sequence[Sequence[float] | None], fmt: str, frame: Frame) -> Reading:
    boxes, repairs = [], []
    for values in raw:
        if values is None:
            boxes.append(None)
            repairs.append([])
            continue
        box, rep = to_canonical(values, fmt, frame)
        boxes.append(box)
        repairs.append(rep)
    return Reading(fmt, boxes, repairs)


def candidates(conv: Convention) -> list[str]:
    """Formats an answer may be read in, the prompt's first."""
    out = [conv.prompt, conv.native, swapped(conv.prompt), swapped(conv.native), XYXY_1000, YXYX_1000,
           XYXY_PIXELS, XYWH_1000]
    if XYXY_SMART_RESIZE in (conv.native, conv.prompt):
        out.append(XYXY_SMART_RESIZE)
    seen: list[str] = []
    for f in out:
        if f not in seen:
            seen.append(f)
    return seen


# A reading whose mean IoU over its matches beats the prompt format's by this much is taken
# even at equal match counts (echoed boxes are near-exact in the right format).
CLEAR_IOU_MARGIN = 0.15


def resolve(raw: Sequence[Sequence[float] | None], targets: Sequence[Sequence[float]], conv: Convention,
            frame: Frame, *, min_iou: float = 0.5) -> Reading:
    """Read an answer's boxes in the format that explains it, by the rule in the module doc.

    The prompt's format wins unless another explains strictly more boxes (and at least half),
    or as many with a clearly better fit. Readings that explain as many boxes, not clearly
    worse, but with different joins are returned in ``ties``.
    """
    readings = [read_all(raw, fmt, frame) for fmt in candidates(conv)]
    first = readings[0]
    if not targets or not any(v is not None for v in raw):
        return first
    for r in readings:
        r.assignment, r.iou_sum = match_greedy(r.boxes, targets, min_iou=min_iou)
    best_n = max(r.matches for r in readings)
    if best_n == 0:
        return first
    n_raw = sum(v is not None for v in raw)
    top = [r for r in readings if r.matches == best_n]
    fittest = max(top, key=lambda r: r.iou_sum)  # first on ties: the prompt's format
    if first.matches == best_n:
        chosen = first
        if fittest is not first and (fittest.iou_sum - first.iou_sum) / best_n >= CLEAR_IOU_MARGIN:
            chosen = fittest
    elif best_n * 2 >= n_raw:
        chosen = fittest
    else:
        return first
    chosen.ties = [r for r in top if r is not chosen and r.assignment != chosen.assignment
                   and (chosen.iou_sum - r.iou_sum) / best_n < CLEAR_IOU_MARGIN]
    return chosen


# A box no reading of its answer joins is still taken when another format turns it into a
# near-exact copy of exactly one free target (a model that mixes conventions within an answer).
RESCUE_IOU = 0.9


def rescue(values: Sequence[float], free: Sequence[Sequence[float]], conv: Convention, frame: Frame,
           skip: str) -> tuple[str, list[int], int] | None:
    """``(format, box, index into free)`` when exactly one other format reads ``values`` as a
    near-exact (IoU >= 0.9) copy of exactly one of the ``free`` targets; else None."""
    found = []
    for fmt in candidates(conv):
        if fmt == skip:
            continue
        box, _ = to_canonical(values, fmt, frame)
        if box is None:
            continue
        hits = [k for k, t in enumerate(free) if iou(box, t) >= RESCUE_IOU]
        if len(hits) == 1:
            found.append((fmt, box, hits[0]))
        elif len(hits) > 1:
            return None
    targets = {f[2] for f in found}
    if len(targets) != 1:
        return None
    return found[0]


def refine(values: Sequence[float], box: list[int], target: Sequence[float], conv: Convention, frame: Frame,
           skip: str) -> tuple[str, list[int]] | None:
    """For a box joined to ``target`` only loosely (IoU < 0.9): the reading of another format
    that makes it a near-exact copy of that same target, when exactly one format does."""
    if iou(box, target) >= RESCUE_IOU:
        return None
    found = []
    for fmt in candidates(conv):
        if fmt == skip:
            continue
        other, _ = to_canonical(values, fmt, frame)
        if other is not None and iou(other, target) >= RESCUE_IOU:
            found.append((fmt, other))
    return found[0] if len(found) == 1 else None
