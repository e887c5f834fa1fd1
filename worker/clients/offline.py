"""A deterministic, network-free teacher: answers every step from pixels and box geometry.

``OfflineClient`` stands in for a VLM in demos, tests and dry runs. It reads ``request.step`` and
``request.hint`` (the structured inputs each step's ``build_prompt`` returns) and the image, and
answers in the same text formats a real model does, so the real parsers run on its answers:

- ``region_expr``: a JSON array of ``{bbox_2d, type, color, description}``. The color is the
  dominant named color of the central part of the box (the torso for people), named after the
  scene's exposure is evened out (a silver car at dusk is silver, not black); the description
  adds the lane or side and a rough distance, both estimated with a pinhole camera model
  (KITTI-like focal length, typical object heights), and a relation ("nearer", "leftmost")
  when two objects would otherwise read the same.
- ``image_caption``: object counts, scene brightness, where the traffic is, the nearest object;
  for an image without boxes only its brightness (no boxes is not no objects).
- ``grounding_expr``: ``<phrase>: [[x1, y1, x2, y2], ...]`` lines grouping regions by type and
  color, by type, and by side of the road; every region lands in at least one line.
- ``double_check``: the same lines, without boxes whose crop is tiny or uniform.

The same request always gets the same text. Pillow only (no numpy): crops are shrunk to a few
hundred pixels before anything is counted, so a call costs a few milliseconds.

>>> OfflineClient().name
'offline'
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

from PIL import Image, ImageStat

from worker.clients.base import VLMRequest, VLMResponse
from worker.constants import NORM
from worker.errors import PermanentClientError
from worker.images import open_rgb

MODEL = "offline"

# KITTI type (lower case) -> the word descriptions use, its plural and a typical height (m).
_TYPES: dict[str, tuple[str, str, float]] = {
    "car": ("car", "cars", 1.5),
    "van": ("van", "vans", 2.1),
    "truck": ("truck", "trucks", 3.2),
    "tram": ("tram", "trams", 3.4),
    "pedestrian": ("pedestrian", "pedestrians", 1.75),
    "person_sitting": ("seated person", "seated people", 1.25),
    "cyclist": ("cyclist", "cyclists", 1.75),
    "misc": ("object", "objects", 1.5),
}
# Words back to KITTI types, so step 2 understands the types step 0 wrote.
_WORD_TO_TYPE = {word: kind for kind, (word, _, _) in _TYPES.items()}
_PERSON_TYPES = frozenset({"pedestrian", "person_sitting", "cyclist"})
_VEHICLE_TYPES = frozenset({"car", "van", "truck", "tram"})
_TYPE_ORDER = ("car", "van", "truck", "tram", "pedestrian", "person_sitting", "cyclist", "misc")
_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
            "eleven", "twelve")

# Camera model: focal length as a fraction of the image width (KITTI: 721 px / 1242 px).
FOCAL_FRACTION = 0.58
HALF_LANE_M = 1.75          # a vehicle within this of the camera's axis is in the center lane
PERSON_CENTER_M = 1.0       # a person within this is "straight ahead"
ROAD_HALF_WIDTH_M = 6.0     # beyond this: "on the far left/right" (a lane and a half, with slack)
NEAR_M, MID_M = 12.0, 30.0  # close by / a short way ahead / far ahead
DISTINCT_DEPTH = 1.15       # two depths whose ratio is above this are "nearer" and "farther"

# Colors. Pixels are counted on a crop shrunk to at most _SAMPLE x _SAMPLE.
_SAMPLE = 24
_DARK_V = 60                # value below this is black whatever the hue (shadow, glass, tyres)
_CHROMA_MIN = 40            # max - min (0-255) at or above this makes a pixel chromatic
# A pixel's vote for its hue: (chroma - floor) / span, at most 1. Cool hues need more chroma:
# skylight mirrored in glass and paint, and shade, tint black and silver cars blue.
_VOTE = {"blue": (30, 70), "purple": (30, 70), "green": (25, 50)}
_WARM_VOTE = (20, 40)
_CHROMATIC_SHARE = 0.22     # the top hue must hold this share of the crop to name the object
_BLACK_SHARE = 0.45         # dark pixels above this share: black
_DIM_SHARE, _GRAY_MEDIAN = 0.3, 95  # fairly dark and the lit part dim: still black
_WHITE_MEDIAN = 185         # most lit pixels this bright: white
_WHITE_UPPER, _WHITE_SHADED = 212, 150  # or a bright quarter and a shaded rest (side in shade)
_SILVER_UPPER = 140         # the brighter quarter this bright: silver
# Hue (0-360) upper bounds; red wraps around.
_HUES = ((14, "red"), (40, "orange"), (68, "yellow"), (160, "green"), (255, "blue"),
         (295, "purple"), (335, "pink"), (361, "red"))

# Exposure: a scene whose 90th-percentile luminance is below this is dim, and its pixels are
# brightened by at most _MAX_GAIN before colors are named (see exposure_gain).
_DAYLIGHT_P90, _MAX_GAIN = 165, 2.5

# Step 3: a box whose crop is smaller than this, or this uniform, is not on an object.
MIN_BOX_PIXELS = 36
MIN_STDDEV = 3.0


@dataclass(frozen=True)
class _Object:
    """One box as the teacher sees it: type, pixels, color and place on the road."""

    kind: str                 # KITTI type, lower case ("car", "person_sitting", or as given)
    box: tuple[float, float, float, float]  # pixels
    color: str
    lateral: float            # metres, negative = left of the camera
    depth: float              # metres ahead

    @property
    def word(self) -> str:
        return _TYPES.get(self.kind, (self.kind.replace("_", " "), "", 0.0))[0]

    @property
    def plural(self) -> str:
        if self.kind in _TYPES:
            return _TYPES[self.kind][1]
        return self.word + ("es" if self.word.endswith(("s", "x", "ch", "sh")) else "s")

    @property
    def is_person(self) -> bool:
        return self.kind in _PERSON_TYPES

    @property
    def is_vehicle(self) -> bool:
        return self.kind in _VEHICLE_TYPES

    @property
    def side(self) -> str:
        """``left``, ``center`` or ``right``: the lane for a vehicle, the side for a person."""
        limit = PERSON_CENTER_M if self.is_person else HALF_LANE_M
        if abs(self.lateral) <= limit:
            return "center"
        return "left" if self.lateral < 0 else "right"

    @property
    def place(self) -> str:
        side = self.side
        far = abs(self.lateral) > ROAD_HALF_WIDTH_M
        if self.is_person:
            if side == "center":
                return "straight ahead"
            return f"on the far {side}" if far else f"on the {side}"
        if far:
            return f"on the far {side}"
        return f"in the {side} lane"

    @property
    def distance(self) -> str:
        if self.depth < NEAR_M:
            return "close by"
        if self.depth < MID_M:
            return "a short way ahead"
        return "far ahead"

    def label(self, prefix: str = "") -> str:
        """``white car`` / ``pedestrian in white``, with an optional ordinal in front."""
        head = f"{prefix} " if prefix else ""
        if self.color in ("", "unknown"):
            return f"{head}{self.word}"
        if self.is_person:
            return f"{head}{self.word} in {self.color}"
        return f"{head}{self.color} {self.word}"

    def description(self, prefix: str = "", *, with_distance: bool = True) -> str:
        text = f"{self.label(prefix)} {self.place}"
        return f"{text}, {self.distance}" if with_distance else text


# --------------------------------------------------------------------------- pixels


def _kind_of(value: object) -> str:
    """A KITTI type or a step-0 type word -> the lower-case KITTI type (unknown words kept)."""
    text = str(value or "").strip().lower()
    if text in _TYPES:
        return text
    return _WORD_TO_TYPE.get(text, text.replace(" ", "_") or "misc")


def _norm_to_pixels(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return (x1 / NORM * width, y1 / NORM * height, x2 / NORM * width, y2 / NORM * height)


def _crop(image: Image.Image, box: Sequence[float]) -> Image.Image | None:
    """The pixels of ``box`` (floats, any order), clipped to the image; None when nothing is left."""
    x1, x2 = sorted((box[0], box[2]))
    y1, y2 = sorted((box[1], box[3]))
    left, top = max(0, math.floor(x1)), max(0, math.floor(y1))
    right, bottom = min(image.width, math.ceil(x2)), min(image.height, math.ceil(y2))
    if right <= left or bottom <= top:
        return None
    return image.crop((left, top, right, bottom))


def _core(box: Sequence[float], kind: str) -> tuple[float, float, float, float]:
    """The part of a box that shows the object's own color: the body, or a person's torso."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    if kind in _PERSON_TYPES:
        fx, fy = (0.3, 0.7), (0.2, 0.5)
    else:
        fx, fy = (0.2, 0.8), (0.3, 0.85)
    return (x1 + fx[0] * w, y1 + fy[0] * h, x1 + fx[1] * w, y1 + fy[1] * h)


def _hue_name(hue: float, sat: float, value: float) -> str:
    """A chromatic pixel's name; dark or washed-out oranges and reds are brown."""
    for bound, name in _HUES:
        if hue < bound:
            if name in ("orange", "red") and value < 150 and sat < 190 and hue >= 8:
                return "brown"
            if name == "yellow" and value < 120:
                return "brown" if hue < 52 else "green"
            return name
    return "red"  # pragma: no cover - the last bound is above 360


def _pixels(image: Image.Image, gain: float = 1.0) -> list[tuple[int, int, int]]:
    """``(hue, saturation, value)`` triples, each 0-255, of an image shrunk to a small sample;
    ``gain`` brightens the values (see ``exposure_gain``)."""
    small = image.copy()
    small.thumbnail((_SAMPLE, _SAMPLE), Image.Resampling.BOX)
    data = small.convert("HSV").tobytes()
    if gain == 1.0:
        return [(data[i], data[i + 1], data[i + 2]) for i in range(0, len(data), 3)]
    return [(data[i], data[i + 1], min(255, round(data[i + 2] * gain))) for i in range(0, len(data), 3)]


def exposure_gain(image: Image.Image) -> float:
    """How much to brighten this image's pixels before naming colors: 1 for a normally exposed
    scene, up to ``_MAX_GAIN`` for a dim one.

    Why: black, gray, silver and white differ only in brightness, and at dusk every surface is
    darker, so fixed thresholds call a silver car black and a white one gray. The scene's bright
    end (its 90th-percentile luminance: sky, facades, lane markings) tells how much light there
    is; scaling it back up to a daylight level is what an eye adapting to the dark does.
    """
    small = image.copy()
    small.thumbnail((64, 64), Image.Resampling.BOX)
    values = sorted(small.convert("L").tobytes())
    bright = max(1, values[(len(values) * 9) // 10])
    return min(_MAX_GAIN, max(1.0, _DAYLIGHT_P90 / bright))


def name_color(crop: Image.Image | None, gain: float = 1.0) -> str:
    """The dominant named color of ``crop``.

    A hue names the object when it covers enough of the crop (a red car's body outweighs its
    dark windows). Pixels vote by how colorful they are, and cool hues need more color than
    warm ones, so the blue tint of shade and of sky mirrored in glass does not make a black or
    silver car blue while a brown one stays brown. Otherwise the
    crop is achromatic: black when dark pixels dominate (glass, tyres and shade are dark on
    every car, so they only win when there is little else), else white, silver or gray from
    how bright the lit pixels are.
    """
    if crop is None or crop.width * crop.height == 0:
        return "unknown"
    pixels = _pixels(crop, gain)
    total = len(pixels)
    dark = 0
    hues: dict[str, float] = {}
    lit: list[int] = []
    for h, s, v in pixels:
        if v < _DARK_V:
            dark += 1
            continue
        chroma = s * v // 255
        if chroma >= _CHROMA_MIN:
            name = _hue_name(h * 360 / 256, s, v)
            floor, span = _VOTE.get(name, _WARM_VOTE)
            hues[name] = hues.get(name, 0.0) + min(1.0, max(0, chroma - floor) / span)
        else:
            lit.append(v)
    if hues:
        name, score = min(hues.items(), key=lambda kv: (-kv[1], kv[0]))
        if score >= _CHROMATIC_SHARE * total:
            return name
    if dark >= _BLACK_SHARE * total or not lit:
        return "black"
    lit.sort()
    median, upper = lit[len(lit) // 2], lit[(len(lit) * 3) // 4]
    if median >= _WHITE_MEDIAN or (upper >= _WHITE_UPPER and median >= _WHITE_SHADED):
        return "white"
    if upper >= _SILVER_UPPER:
        return "silver"
    if dark >= _DIM_SHARE * total and median < _GRAY_MEDIAN:
        return "black"
    return "gray"


def _is_degenerate(image: Image.Image, box_px: Sequence[float]) -> bool:
    """True for a box that cannot hold an object: a few pixels, or all one color."""
    x1, y1, x2, y2 = box_px
    if max(0.0, x2 - x1) * max(0.0, y2 - y1) < MIN_BOX_PIXELS:
        return True
    crop = _crop(image, box_px)
    if crop is None or crop.width * crop.height < MIN_BOX_PIXELS:
        return True
    return ImageStat.Stat(crop.convert("L")).stddev[0] < MIN_STDDEV


# --------------------------------------------------------------------------- geometry


def _place(kind: str, box: Sequence[float], width: int) -> tuple[float, float]:
    """Lateral offset and depth in metres, from the box's height and a typical object height.

    Pinhole model: depth = f * H / h_px, lateral = (u - width / 2) * depth / f.
    """
    height_m = _TYPES.get(kind, ("", "", 1.5))[2]
    focal = FOCAL_FRACTION * width
    h_px = max(1.0, box[3] - box[1])
    depth = focal * height_m / h_px
    u = (box[0] + box[2]) / 2
    return (u - width / 2) * depth / focal, depth


def _object(image: Image.Image, kind: str, box_px: Sequence[float], gain: float = 1.0) -> _Object:
    box = tuple(float(v) for v in box_px)
    lateral, depth = _place(kind, box, image.width)
    color = name_color(_crop(image, _core(box, kind)), gain)
    return _Object(kind=kind, box=box, color=color, lateral=lateral, depth=depth)  # type: ignore[arg-type]


_ORDINALS = ("second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")


def _nth(k: int) -> str:
    """``second``, ``third``, ... for k = 0, 1, ..."""
    return _ORDINALS[k] if k < len(_ORDINALS) else f"{k + 2}th"


def describe(objects: Sequence[_Object]) -> list[str]:
    """One description per object, made distinct where two would read the same.

    Look-alikes (same color, type and place) are told apart by depth when their depths differ
    ("nearer", "farther"; "nearest", "second nearest", ..., "farthest"), else from left to right
    ("leftmost", "..., second from the left", "rightmost").
    """
    out = [o.description() for o in objects]
    groups: dict[str, list[int]] = {}
    for i, text in enumerate(out):
        groups.setdefault(text, []).append(i)
    for members in groups.values():
        n = len(members)
        if n < 2:
            continue
        by_depth = sorted(members, key=lambda i: (objects[i].depth, i))
        depths = [objects[i].depth for i in by_depth]
        if all(b > a * DISTINCT_DEPTH for a, b in pairwise(depths)):
            words = ["nearer", "farther"] if n == 2 else [
                "nearest", *(f"{_nth(k)} nearest" for k in range(n - 2)), "farthest"]
            for i, word in zip(by_depth, words, strict=True):
                out[i] = objects[i].description(word, with_distance=False)
            continue
        by_x = sorted(members, key=lambda i: ((objects[i].box[0] + objects[i].box[2]) / 2, i))
        for rank, i in enumerate(by_x):
            o = objects[i]
            if rank == 0:
                out[i] = o.description("leftmost")
            elif rank == n - 1:
                out[i] = o.description("rightmost")
            else:
                out[i] = f"{o.description(with_distance=False)}, {_nth(rank - 1)} from the left"
    return [_clean_phrase(t) for t in out]


def _clean_phrase(text: str) -> str:
    """A phrase safe for ``<phrase>: [[...]]`` lines: one line, no colon, no brackets."""
    for ch in ":[]\n\r\"":
        text = text.replace(ch, " ")
    return " ".join(text.split())


def _count_words(n: int) -> str:
    return _NUMBERS[n] if n < len(_NUMBERS) else str(n)


def _join(parts: Sequence[str]) -> str:
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


# --------------------------------------------------------------------------- steps


def _region_expr(image: Image.Image, hint: dict) -> str:
    boxes = hint.get("boxes") or []
    gain = exposure_gain(image) if boxes else 1.0
    objects, given = [], []
    for b in boxes:
        box_2d = list(b.get("bbox_2d") or [])
        if len(box_2d) != 4:
            continue
        kind = _kind_of(b.get("type"))
        objects.append(_object(image, kind, _norm_to_pixels(box_2d, image.width, image.height), gain))
        given.append(box_2d)
    items = [
        {"bbox_2d": box_2d, "type": o.word, "color": o.color, "description": text}
        for box_2d, o, text in zip(given, objects, describe(objects), strict=True)
    ]
    if not items:
        return "[]"
    # one object a line, as models write it
    return "[\n" + ",\n".join("  " + json.dumps(item, ensure_ascii=False) for item in items) + "\n]"


def _brightness(image: Image.Image) -> str:
    small = image.copy()
    small.thumbnail((64, 64), Image.Resampling.BOX)
    mean = ImageStat.Stat(small.convert("L")).mean[0]
    if mean >= 70:
        return "daytime"
    if mean >= 40:
        return "dimly lit"
    return "night-time"


def _image_caption(image: Image.Image, hint: dict) -> str:
    """Counts, where the traffic is and the nearest object, all from the labelled boxes.

    Without boxes the teacher says only what the pixels tell it (how light the scene is): an
    image without labels may still be full of cars, and a caption claiming "no vehicles" would
    teach a model to miss them.
    """
    gain = exposure_gain(image)
    objects = []
    for b in hint.get("kitti_bboxes") or []:
        if len(b) < 5:
            continue
        kind = _kind_of(b[4])
        if kind == "dontcare":
            continue
        objects.append(_object(image, kind, [float(v) for v in b[:4]], gain))
    light = _brightness(image)
    if not objects:
        return f"A {light} street scene."
    counts: dict[str, int] = {}
    for o in objects:
        counts[o.kind] = counts.get(o.kind, 0) + 1
    order = [k for k in _TYPE_ORDER if k in counts] + sorted(k for k in counts if k not in _TYPE_ORDER)
    parts = []
    for kind in order:
        n = counts[kind]
        probe = next(o for o in objects if o.kind == kind)
        parts.append(f"{_count_words(n)} {probe.word if n == 1 else probe.plural}")
    text = f"A {light} street scene with {_join(parts)}"
    vehicles = [o for o in objects if o.is_vehicle]
    movers = vehicles or objects
    sides = {s: sum(o.side == s for o in movers) for s in ("left", "center", "right")}
    top = max(sides, key=lambda s: (sides[s], s == "center"))
    if vehicles:
        subject, whole = "traffic", "the road"
        where = {"left": "on the left side of the road", "right": "on the right side of the road",
                 "center": "in the lane ahead"}[top]
    else:
        subject, whole = ("everyone" if len(movers) > 1 else "it"), "the view"
        where = {"left": "on the left", "right": "on the right", "center": "straight ahead"}[top]
    if len(movers) == 1:
        text += f"; {subject} is {where}."
    elif sides[top] >= 0.6 * len(movers):
        text += f"; most {subject} is {where}." if vehicles else f"; {subject} is {where}."
    else:
        spread = "traffic is" if vehicles else "people are"
        text += f"; {spread} spread across {whole}."
    nearest = min(objects, key=lambda o: (o.depth, o.box))
    article = "an" if nearest.label()[0] in "aeiou" else "a"
    return text + f" The nearest is {article} {nearest.description()}."


def _lines(groups: list[tuple[str, list[list[int]]]]) -> str:
    return "\n".join(f"{phrase}: {json.dumps(boxes)}" for phrase, boxes in groups)


def _grounding_expr(image: Image.Image, hint: dict) -> str:
    regions = [r for r in hint.get("regions") or [] if len(r.get("bbox_2d") or []) == 4]
    objects = []
    for r in regions:
        kind = _kind_of(r.get("type"))
        box = _norm_to_pixels(r["bbox_2d"], image.width, image.height)
        lateral, depth = _place(kind, box, image.width)
        color = str(r.get("color") or "").strip().lower() or "unknown"
        objects.append(_Object(kind=kind, box=box, color=color, lateral=lateral, depth=depth))
    boxes = [list(r["bbox_2d"]) for r in regions]
    candidates: list[tuple[str, list[int]]] = []

    def add(phrase: str, members: list[int]) -> None:
        candidates.append((_clean_phrase(phrase), members))

    kinds = [k for k in _TYPE_ORDER if any(o.kind == k for o in objects)]
    kinds += sorted({o.kind for o in objects} - set(kinds))
    for kind in kinds:
        of_kind = [i for i, o in enumerate(objects) if o.kind == kind]
        colors = sorted({objects[i].color for i in of_kind})
        for color in colors:
            members = [i for i in of_kind if objects[i].color == color]
            if len(members) >= 2 and color != "unknown":
                o = objects[members[0]]
                add(f"the {o.plural} in {color}" if o.is_person else f"the {color} {o.plural}", members)
        if len(of_kind) >= 2:
            add(f"all the {objects[of_kind[0]].plural}", of_kind)
    vehicles = [i for i, o in enumerate(objects) if o.is_vehicle]
    if len({objects[i].kind for i in vehicles}) > 1:
        add("all the vehicles", vehicles)
    where = {"left": "on the left", "center": "in the center lane", "right": "on the right"}
    for side, phrase in where.items():
        members = [i for i in vehicles if objects[i].side == side]
        if len(members) >= 2:
            add(f"the vehicles {phrase}", members)
    people = [i for i, o in enumerate(objects) if o.is_person]
    if len({objects[i].kind for i in people}) > 1:
        add("the people on foot or on bikes", people)

    groups: list[tuple[str, list[list[int]]]] = []
    seen_sets: set[tuple[int, ...]] = set()
    covered: set[int] = set()
    for phrase, members in candidates:
        key = tuple(sorted(members))
        if key in seen_sets:
            continue
        seen_sets.add(key)
        covered.update(members)
        groups.append((phrase, [boxes[i] for i in members]))
    for i, (r, o) in enumerate(zip(regions, objects, strict=True)):
        if i in covered:
            continue
        phrase = _clean_phrase(str(r.get("description") or "")) or _clean_phrase(o.label())
        groups.append((phrase, [boxes[i]]))
    merged: dict[str, list[list[int]]] = {}   # a phrase twice would be one line in step 3
    for phrase, group_boxes in groups:
        line = merged.setdefault(phrase, [])
        for box in group_boxes:
            if box not in line:
                line.append(box)
    return _lines(list(merged.items()))


def _double_check(image: Image.Image, hint: dict) -> str:
    groups: list[tuple[str, list[list[int]]]] = []
    for expr in hint.get("expressions") or []:
        phrase = str(expr.get("text") or "").strip()
        kept = []
        for inst in expr.get("instances") or []:
            box_2d = inst.get("bbox_2d")
            if not box_2d or len(box_2d) != 4:
                continue
            if not _is_degenerate(image, _norm_to_pixels(box_2d, image.width, image.height)):
                kept.append([int(v) for v in box_2d])
        if phrase and kept:
            groups.append((phrase, kept))
    return _lines(groups)


_STEPS = {
    "region_expr": _region_expr,
    "image_caption": _image_caption,
    "grounding_expr": _grounding_expr,
    "double_check": _double_check,
}


def _tokens(text: str) -> int:
    """A rough token count (4 characters a token), so usage totals look like a real backend's."""
    return (len(text) + 3) // 4


class OfflineClient:
    """The offline teacher. ``vlm_spec`` is accepted for symmetry with the real clients and unused.

    :param vlm_spec: the run's ``vlm`` spec section (ignored: nothing to configure offline).
    """

    name = "offline"
    structured_output = False  # it answers in the reference's text formats

    def __init__(self, vlm_spec: object | None = None) -> None:
        self.vlm_spec = vlm_spec

    def generate(self, request: VLMRequest) -> VLMResponse:
        answer = _STEPS.get(request.step)
        if answer is None:
            raise PermanentClientError(
                f"offline client: unknown step {request.step!r} (knows: {', '.join(_STEPS)})"
            )
        image = open_rgb(request.image)
        text = answer(image, request.hint or {})
        prompt_tokens = _tokens(request.prompt)
        completion_tokens = _tokens(text)
        return VLMResponse(
            text=text,
            model=MODEL,
            finish_reason="stop",
            usage={
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        )
