"""``producer preview``: each image's steps drawn as PNG panels, and a gallery that opens from disk.

TAO's pilot workflow is to run a handful of images and look before scaling up. For each chosen
image this writes, under ``--out`` (default ``<results_dir>/preview``):

- ``images/<id>_step0.png``: the step-0 regions, each box tagged with its number and type, and a
  legend under the image with each region's color and description;
- ``images/<id>_step2.png``: the step-2 groups, one color per phrase (a box in several groups
  is drawn nested, with one tag chip per group); dashed boxes did not match a step-0 region;
- ``images/<id>_step3.png``: step 3 against step 2, box by box: *kept* (solid), *removed*
  (dashed, crossed out) and *moved* (the old place dashed, the new one solid, joined by a line);
- a panel with nothing to draw (no regions, no phrases) is not written; an image without KITTI
  boxes (its label file missing or empty) gets one plain ``images/<id>_image.png`` instead of
  three empty panels, and a "no labels" badge rather than "clean";
- ``index.html``: the gallery. Relative links only, no script, no server: open it from disk. Per
  image: the caption, the phrases before and after step 3, the parse warnings (record ``meta``:
  repairs, invalid or invented boxes, KITTI boxes the model skipped) and the failures
  (``failures.jsonl``), and the tokens each call used.

Colors are the Okabe-Ito palette (distinguishable with the common color-vision deficiencies),
and nothing is told by color alone: tags carry numbers and words, statuses differ in line style.
Tags on small boxes go outside the box, on a filled background, and are moved so they do not
cover each other.
"""

from __future__ import annotations

import contextlib
import functools
import html
import itertools
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import typer
from PIL import Image, ImageDraw, ImageFont

from producer.exitcodes import user_errors
from producer.extsort import SortedPairs
from producer.seed import iter_seed
from worker.errors import ConfigError
from worker.geometry import iou
from worker.layout import Layout
from worker.sinks import write_atomic
from worker.stepdefs import STEP_NAMES
from worker.steps.records import PIPELINE_NAMES

Color = tuple[int, int, int]
Box = Sequence[float]

# Okabe & Ito (2008), "Color Universal Design": eight colors told apart with every common CVD.
OKABE_ITO: dict[str, Color] = {
    "orange": (230, 159, 0),
    "sky_blue": (86, 180, 233),
    "bluish_green": (0, 158, 115),
    "yellow": (240, 228, 66),
    "blue": (0, 114, 178),
    "vermillion": (213, 94, 0),
    "reddish_purple": (204, 121, 167),
    "black": (0, 0, 0),
}
# Boxes cycle through these (black is kept for outlines and text).
PALETTE: tuple[Color, ...] = tuple(OKABE_ITO[k] for k in (
    "orange", "sky_blue", "bluish_green", "yellow", "blue", "vermillion", "reddish_purple"))
KEPT, REMOVED, MOVED = OKABE_ITO["bluish_green"], OKABE_ITO["vermillion"], OKABE_ITO["blue"]
STATUS_COLORS = {"kept": KEPT, "removed": REMOVED, "moved": MOVED}

DEFAULT_SAMPLE = 20
PANEL_STEPS = (0, 2, 3)
FONT_SIZE = 15
LEGEND_FONT_SIZE = 15
LINE = 3            # box outline width, display pixels
PAD = 3             # padding inside a tag


# --------------------------------------------------------------------------- reading the run


@dataclass
class ImageView:
    """Everything the gallery shows about one image."""

    image_id: str
    seed: dict
    records: dict[int, dict] = field(default_factory=dict)      # step -> last record in its sink
    failures: list[dict] = field(default_factory=list)

    @property
    def latest(self) -> dict:
        """The most advanced record (the seed if no step finished)."""
        return self.records[max(self.records)] if self.records else self.seed

    @property
    def labelled(self) -> bool:
        """Whether the image was seeded with KITTI boxes (False: label file missing or empty)."""
        return bool(self.seed.get("kitti_bboxes"))

    @property
    def meta(self) -> dict:
        """Every step's meta, from all the records (later steps repeat earlier ones)."""
        out: dict = {}
        for s in sorted(self.records):
            out.update(self.records[s].get("meta") or {})
        return out


@contextlib.contextmanager
def seed_ids(layout: Layout) -> Iterator[SortedPairs]:
    """The seed's image ids, sorted in bounded memory (``(image_id, 0)`` pairs; ``.count`` is
    how many): a results dir of ten million images is not a list of ten million names."""
    if not layout.seed.path.exists():
        raise ConfigError(f"{layout.root}: no {layout.seed.path.name}; is this a refexp results_dir?")
    with SortedPairs((str(rec["image_id"]), 0) for _, rec in iter_seed(layout.seed)) as ids:
        yield ids


def choose_ids(all_ids: Iterable[str], images: Iterable[str] | None = None, sample: int = DEFAULT_SAMPLE, *,
               count: int | None = None) -> list[str]:
    """The ids asked for (all must exist), else ``sample`` ids spread evenly (0 = all), sorted.

    ``all_ids`` is sorted and read once, as a stream (``count`` says how many when it is not a
    sequence): only the chosen ids are held."""
    if images:
        wanted = sorted(dict.fromkeys(i.strip() for i in images if i.strip()))
        missing, first = set(wanted), None
        for image_id in all_ids:
            first = image_id if first is None else first
            missing.discard(image_id)
        unknown = [i for i in wanted if i in missing]
        if unknown:
            raise ConfigError(f"--images: no image with id {', '.join(unknown[:10])} in this run "
                              f"(ids are file stems, e.g. {first if first is not None else 'none seeded'})")
        return wanted
    n = count if count is not None else len(all_ids)  # type: ignore[arg-type]
    picks = iter(spread_indices(n, sample))
    want, out = next(picks, None), []
    for i, image_id in enumerate(all_ids):
        if i == want:
            out.append(image_id)
            want = next(picks, None)
        if want is None:
            break
    return sorted(set(out))


def spread_indices(n: int, sample: int) -> list[int]:
    """``sample`` positions spread evenly over ``n`` (all of them when ``sample`` is 0 or
    covers ``n``), first and last included."""
    if sample <= 0 or sample >= n:
        return list(range(n))
    if sample == 1:
        return [0]
    return sorted({round(i * (n - 1) / (sample - 1)) for i in range(sample)})


def load_views(layout: Layout, ids: list[str]) -> list[ImageView]:
    """Seed, step records (last line per image wins) and failures of the chosen images."""
    wanted = set(ids)
    views: dict[str, ImageView] = {}
    for _, rec in iter_seed(layout.seed):
        if rec["image_id"] in wanted:
            views[rec["image_id"]] = ImageView(rec["image_id"], rec)
    for step in STEP_NAMES:
        for _, rec in layout.sink(step).scan():
            view = views.get(rec["image_id"])
            if view is not None:
                view.records[step] = rec
    for _, rec in layout.failures.scan():
        view = views.get(rec["image_id"])
        if view is not None:
            view.failures.append(rec)
    for view in views.values():
        # a failure later fixed by a retry is history, not a problem
        view.failures = [f for f in view.failures if not (isinstance(f.get("step"), int) and f["step"] in view.records)]
    return [views[i] for i in ids if i in views]


# --------------------------------------------------------------------------- drawing helpers


FONT_FILES = ("DejaVuSans.ttf", "LiberationSans-Regular.ttf", "NotoSans-Regular.ttf", "Arial.ttf")


@functools.cache
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """A system sans font with wide coverage (accents, symbols) when there is one; else Pillow's
    bundled scalable font (ASCII only); else its bitmap font (Pillow without FreeType)."""
    for name in FONT_FILES:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # pragma: no cover - Pillow without FreeType
        return ImageFont.load_default()


def _luminance(c: Color) -> float:
    def lin(v: int) -> float:
        x = v / 255
        return x / 12.92 if x <= 0.03928 else ((x + 0.055) / 1.055) ** 2.4
    return 0.2126 * lin(c[0]) + 0.7152 * lin(c[1]) + 0.0722 * lin(c[2])


def text_color(background: Color) -> Color:
    """Black or white, whichever contrasts more with ``background`` (WCAG contrast ratio)."""
    lum = _luminance(background)
    return (0, 0, 0) if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else (255, 255, 255)


_CONTROL = {c: f"\\x{c:02x}" for c in [*range(32), 127]} | {10: "\\n", 13: "\\r", 9: " "}


def printable(text: str) -> str:
    """``text`` on one line, control characters written as escapes: file names and model answers
    can hold a newline, and Pillow's text layout (raqm) refuses it in a single-line draw."""
    return str(text).translate(_CONTROL)


def _text_size(font, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(printable(text))
    return int(right - left), int(bottom - top)


def _overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _contains(outer: Box, inner: Box) -> bool:
    """``outer`` holds ``inner`` entirely (a tag may sit inside the big box around a small one)."""
    return outer[0] <= inner[0] and outer[1] <= inner[1] and outer[2] >= inner[2] and outer[3] >= inner[3]


def _key(box: Box) -> tuple[float, float, float, float]:
    """A box rounded to 0.1 px: the identity of a drawn box (shared boxes are drawn nested)."""
    return (round(box[0], 1), round(box[1], 1), round(box[2], 1), round(box[3], 1))


def _dashed_line(draw: ImageDraw.ImageDraw, p: tuple[float, float], q: tuple[float, float], color: Color,
                 width: int, dash: int = 9, gap: int = 6) -> None:
    length = max(abs(q[0] - p[0]), abs(q[1] - p[1]))
    if length <= 0:
        return
    t = 0.0
    while t < length:
        a, b = t / length, min(t + dash, length) / length
        draw.line([(p[0] + (q[0] - p[0]) * a, p[1] + (q[1] - p[1]) * a),
                   (p[0] + (q[0] - p[0]) * b, p[1] + (q[1] - p[1]) * b)], fill=color, width=width)
        t += dash + gap


def draw_box(draw: ImageDraw.ImageDraw, box: Box, color: Color, *, dashed: bool = False, width: int = LINE) -> None:
    """A box outline with a thin dark halo, so it shows on bright and dark pixels alike."""
    x1, y1, x2, y2 = box
    if dashed:
        corners = [(x1, y1), (x2, y1), (x2, y2), (x1, y2), (x1, y1)]
        for p, q in itertools.pairwise(corners):
            _dashed_line(draw, p, q, (0, 0, 0), width + 2)
        for p, q in itertools.pairwise(corners):
            _dashed_line(draw, p, q, color, width)
        return
    draw.rectangle([x1 - 1, y1 - 1, x2 + 1, y2 + 1], outline=(0, 0, 0), width=width + 2)
    draw.rectangle([x1, y1, x2, y2], outline=color, width=width)


@dataclass
class Tag:
    """A label for one box: chips of (text, background color) drawn side by side."""

    box: tuple[float, float, float, float]
    chips: list[tuple[str, Color]]


class TagPlacer:
    """Puts tags next to their boxes without covering each other.

    A tag goes inside the box's top-left corner only when the box is large enough to hold it with
    room to spare; otherwise outside (above, below, left, right), on a filled background. When
    every spot is taken it is stacked above, joined to its box by a thin line.
    """

    def __init__(self, width: int, height: int, font):
        self.width, self.height, self.font = width, height, font
        self.placed: list[tuple[float, float, float, float]] = []

    def size(self, tag: Tag) -> tuple[int, int]:
        widths = [_text_size(self.font, t)[0] + 2 * PAD for t, _ in tag.chips]
        h = _text_size(self.font, "Ag0")[1] + 2 * PAD + 2
        return sum(widths) + max(0, len(widths) - 1), h

    def _fit(self, x: float, y: float, w: int, h: int) -> tuple[float, float, float, float]:
        x = min(max(x, 0), self.width - w)
        y = min(max(y, 0), self.height - h)
        return (x, y, x + w, y + h)

    def place(self, tag: Tag, others: Sequence[Box] = ()) -> tuple[tuple[float, float, float, float], bool]:
        """Where to draw ``tag``, and whether it is detached from its box (needs a leader line)."""
        w, h = self.size(tag)
        x1, y1, x2, y2 = tag.box
        big = (x2 - x1) >= w + 12 and (y2 - y1) >= 3 * h
        near = [(x1, y1 - h - 1), (x1, y2 + 1), (x2 - w, y1 - h - 1), (x2 - w, y2 + 1),
                (x1 - w - 1, y1), (x2 + 1, y1)]
        if big:
            near.insert(0, (x1 + LINE, y1 + LINE))
        far = [(x1, y1 - 2 * h - 8), (x1, y2 + h + 8), (x1 - w // 2, y1 - 3 * h - 12), (x1 - w // 2, y2 + 2 * h + 12)]
        spots = [(x, y, False) for x, y in near] + [(x, y, True) for x, y in far]
        mine = _key(tag.box)
        blocking = [o for o in map(_key, others) if o != mine and not _contains(o, mine)]
        for sx, sy, detached in spots:
            rect = self._fit(sx, sy, w, h)
            if (rect[0], rect[1]) != (sx, sy) and not big:
                continue  # pushed off the image edge: try the next spot
            if any(_overlaps(rect, p) for p in self.placed):
                continue
            if any(_overlaps(rect, o) for o in blocking):
                continue
            self.placed.append(rect)
            return rect, detached
        for sx, sy in near:  # relax: may cover other boxes, never other tags
            rect = self._fit(sx, sy, w, h)
            if not any(_overlaps(rect, p) for p in self.placed):
                self.placed.append(rect)
                return rect, False
        y = y1 - h - 1
        rect = self._fit(x1, y, w, h)
        while any(_overlaps(rect, p) for p in self.placed) and rect[1] > 0:
            y -= h + 1
            rect = self._fit(x1, y, w, h)
        self.placed.append(rect)
        return rect, True


def draw_tag(draw: ImageDraw.ImageDraw, placer: TagPlacer, tag: Tag, others: Sequence[Box] = ()) -> None:
    rect, detached = placer.place(tag, others)
    if detached:  # a leader line from the tag's centre to the nearest point of its box, under the tag
        c = ((rect[0] + rect[2]) / 2, (rect[1] + rect[3]) / 2)
        q = (min(max(c[0], tag.box[0]), tag.box[2]), min(max(c[1], tag.box[1]), tag.box[3]))
        draw.line([c, q], fill=(0, 0, 0), width=4)
        draw.line([c, q], fill=tag.chips[0][1], width=2)
    x = rect[0]
    for raw, color in tag.chips:
        text = printable(raw)
        w = _text_size(placer.font, text)[0] + 2 * PAD
        draw.rectangle([x, rect[1], x + w, rect[3]], fill=color, outline=(0, 0, 0), width=1)
        left, top, _, _ = placer.font.getbbox(text)
        draw.text((x + PAD - left, rect[1] + PAD + 1 - top), text, fill=text_color(color), font=placer.font)
        x += w + 1


# --------------------------------------------------------------------------- panels


def display_scale(width: int) -> float:
    """Large images are shrunk to 1600 px wide, small ones enlarged (at most 2x) to ~1000 px."""
    if width > 1600:
        return 1600 / width
    if width < 1000:
        return min(2.0, 1000 / width)
    return 1.0


def _base_image(view: ImageView) -> tuple[Image.Image, float, str | None]:
    rec = view.seed
    w, h = int(rec.get("width") or 640), int(rec.get("height") or 480)
    scale = display_scale(w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    try:
        with Image.open(rec["image_path"]) as im:
            img = im.convert("RGB")
        if img.size != size:
            img = img.resize(size, Image.Resampling.LANCZOS)
        return img, scale, None
    except (OSError, ValueError) as exc:
        return Image.new("RGB", size, (90, 90, 90)), scale, f"image not readable: {exc}"


def _scaled(box: Box, scale: float) -> tuple[float, float, float, float]:
    return (box[0] * scale, box[1] * scale, box[2] * scale, box[3] * scale)


@dataclass
class LegendRow:
    text: str
    color: Color | None = None
    style: str = "solid"        # solid | dashed | removed | moved


def _compose(title: str, img: Image.Image, rows: list[LegendRow], note: str | None = None) -> Image.Image:
    """Title bar, the drawn image, and the legend rows under it, as one PNG."""
    font = _font(LEGEND_FONT_SIZE)
    title_font = _font(FONT_SIZE + 2)
    title, note = printable(title), printable(note) if note else note
    line_h = _text_size(font, "Ag0")[1] + 8
    width = max(img.width, 640)
    wrapped: list[tuple[LegendRow, list[str]]] = []
    for row in rows:
        wrapped.append((row, _wrap(font, printable(row.text), width - 56)))
    extra = [note] if note else []
    legend_h = sum(len(lines) for _, lines in wrapped) * line_h + len(extra) * line_h + (10 if rows or extra else 0)
    title_h = _text_size(title_font, "Ag0")[1] + 14
    out = Image.new("RGB", (width, title_h + img.height + legend_h), (250, 250, 248))
    draw = ImageDraw.Draw(out)
    draw.rectangle([0, 0, width, title_h - 1], fill=(34, 34, 34))
    left, top, _, _ = title_font.getbbox(title)
    draw.text((8 - left, 7 - top), title, fill=(255, 255, 255), font=title_font)
    out.paste(img, (0, title_h))
    y = title_h + img.height + 6
    for text in extra:
        draw.text((10, y), text, fill=(160, 30, 0), font=font)
        y += line_h
    for row, lines in wrapped:
        if row.color is not None:
            sw = (10, y + 2, 40, y + line_h - 6)
            if row.style == "solid":
                draw.rectangle(sw, fill=row.color, outline=(0, 0, 0))
            else:
                draw_box(draw, sw, row.color, dashed=row.style in ("dashed", "removed"), width=2)
                if row.style == "removed":
                    draw.line([(sw[0], sw[1]), (sw[2], sw[3])], fill=row.color, width=2)
        for i, line in enumerate(lines):
            draw.text((50, y + i * line_h), line, fill=(20, 20, 20), font=font)
        y += len(lines) * line_h
    return out


def _wrap(font, text: str, width: int) -> list[str]:
    words, lines, cur = text.split(" "), [], ""
    for word in words:
        trial = f"{cur} {word}".strip()
        if cur and _text_size(font, trial)[0] > width:
            lines.append(cur)
            cur = word
        else:
            cur = trial
    return [*lines, cur] if cur or not lines else lines


def _expr_number(expr: dict, fallback: int) -> int:
    eid = str(expr.get("expression_id", ""))
    tail = eid.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else fallback


def panel_step0(view: ImageView) -> Image.Image:
    rec = view.records[0]
    img, scale, problem = _base_image(view)
    draw = ImageDraw.Draw(img)
    regions = rec.get("regions") or []
    boxes = [_scaled(r["bbox"], scale) for r in regions]
    for k, box in enumerate(boxes):
        draw_box(draw, box, PALETTE[k % len(PALETTE)])
    placer = TagPlacer(img.width, img.height, _font(FONT_SIZE))
    for k, (r, box) in sorted(enumerate(zip(regions, boxes, strict=True)), key=lambda kv: _area(kv[1][1])):
        draw_tag(draw, placer, Tag(box, [(f"{k} {r.get('type', '')}".strip(), PALETTE[k % len(PALETTE)])]), boxes)
    rows = [LegendRow(f"{k}  {r.get('type', '')} · {r.get('color', '')}: "
                      f"{r.get('description', '') or '(no description)'}", PALETTE[k % len(PALETTE)])
            for k, r in enumerate(regions)]
    missed = (rec.get("meta", {}).get(PIPELINE_NAMES[0]) or {}).get("missed_kitti") or []
    kitti = view.seed.get("kitti_bboxes") or []
    for i in missed:
        if i < len(kitti):
            box = _scaled(kitti[i][:4], scale)
            draw_box(draw, box, (255, 255, 255), dashed=True, width=2)
            draw_tag(draw, placer, Tag(box, [(f"K{i} skipped", (255, 255, 255))]), boxes)
    if missed:
        rows.append(LegendRow(f"K<n>  KITTI boxes the model did not describe: {len(missed)}",
                              (255, 255, 255), "dashed"))
    title = f"{view.image_id} · step 0 region_expr · {len(regions)} of {len(kitti)} KITTI boxes described"
    note = problem or ("no boxes: no call was made" if not kitti else None)
    return _compose(title, img, rows, note)


def _area(box: Box) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def panel_step2(view: ImageView) -> Image.Image:
    rec = view.records[2]
    img, scale, problem = _base_image(view)
    draw = ImageDraw.Draw(img)
    exprs = rec.get("expressions") or []
    nested: dict[tuple, int] = {}
    chips: dict[tuple, list[tuple[str, Color]]] = {}
    all_boxes = []
    for k, expr in enumerate(exprs):
        n = _expr_number(expr, k)
        color = PALETTE[n % len(PALETTE)]
        for inst in expr.get("instances", []):
            box = _scaled(inst["bbox"], scale)
            key = _key(box)
            depth = nested.get(key, 0)
            nested[key] = depth + 1
            inset = depth * (LINE + 1)
            draw_box(draw, (box[0] + inset, box[1] + inset, box[2] - inset, box[3] - inset), color,
                     dashed=not inst.get("matched", True))
            chips.setdefault(key, []).append((f"E{n}", color))
            all_boxes.append(box)
    placer = TagPlacer(img.width, img.height, _font(FONT_SIZE))
    for key in sorted(chips, key=_area):
        draw_tag(draw, placer, Tag(key, chips[key]), all_boxes)
    rows = []
    for k, expr in enumerate(exprs):
        n = _expr_number(expr, k)
        inst = expr.get("instances", [])
        unmatched = sum(1 for i in inst if not i.get("matched", True))
        extra = f", {unmatched} unmatched (dashed)" if unmatched else ""
        rows.append(LegendRow(f"E{n}  {expr.get('text', '')}  ({len(inst)} box{'es' if len(inst) != 1 else ''}{extra})",
                              PALETTE[n % len(PALETTE)]))
    title = f"{view.image_id} · step 2 grounding_expr · {len(exprs)} phrase{'s' if len(exprs) != 1 else ''}"
    note = problem or (None if exprs else "no phrases")
    return _compose(title, img, rows, note)


def step3_changes(before: dict, after: dict) -> list[dict]:
    """Box by box, what step 3 did to step 2's instances: kept, removed or moved.

    Each item: ``{expr (number), text, bbox_id, status, old (pixels), new (pixels or None)}``.
    Matching is by ``bbox_id``, which step 3 keeps for kept and moved boxes.
    """
    kept_by_id = {}
    for expr in after.get("expressions") or []:
        for inst in expr.get("instances", []):
            kept_by_id[inst["bbox_id"]] = inst
    out = []
    for k, expr in enumerate(before.get("expressions") or []):
        n = _expr_number(expr, k)
        for inst in expr.get("instances", []):
            new = kept_by_id.get(inst["bbox_id"])
            if new is None:
                status = "removed"
            elif new.get("updated") or list(new["bbox"]) != list(inst["bbox"]):
                status = "moved"
            else:
                status = "kept"
            out.append({"expr": n, "text": expr.get("text", ""), "bbox_id": inst["bbox_id"], "status": status,
                        "old": list(inst["bbox"]), "new": list(new["bbox"]) if new else None})
    return out


def panel_step3(view: ImageView) -> Image.Image:
    after = view.records[3]
    before = view.records.get(2) or {}
    img, scale, problem = _base_image(view)
    draw = ImageDraw.Draw(img)
    changes = step3_changes(before, after)
    nested: dict[tuple, int] = {}
    by_status: dict[tuple, dict[str, list[int]]] = {}
    all_boxes = []
    order = {"removed": 0, "moved": 1, "kept": 2}
    survivors = {_key(_scaled(c["new"], scale)) for c in changes if c["status"] != "removed"}
    for ch in sorted(changes, key=lambda c: order[c["status"]]):
        color = STATUS_COLORS[ch["status"]]
        old = _scaled(ch["old"], scale)
        shown = _scaled(ch["new"], scale) if ch["status"] == "moved" else old
        key = _key(shown)
        depth = nested.get(key, 0)
        nested[key] = depth + 1
        inset = depth * (LINE + 1)
        box = (shown[0] + inset, shown[1] + inset, shown[2] - inset, shown[3] - inset)
        if ch["status"] == "removed":
            draw_box(draw, box, color, dashed=True)
            if not any(iou(box, k) >= 0.5 for k in survivors):  # crossed out when no phrase keeps it
                draw.line([(box[0], box[1]), (box[2], box[3])], fill=color, width=2)
                draw.line([(box[0], box[3]), (box[2], box[1])], fill=color, width=2)
        elif ch["status"] == "moved":
            draw_box(draw, old, OKABE_ITO["sky_blue"], dashed=True, width=2)
            c_old = ((old[0] + old[2]) / 2, (old[1] + old[3]) / 2)
            c_new = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
            draw.line([c_old, c_new], fill=(0, 0, 0), width=4)
            draw.line([c_old, c_new], fill=OKABE_ITO["sky_blue"], width=2)
            draw_box(draw, box, color)
        else:
            draw_box(draw, box, color)
        by_status.setdefault(key, {}).setdefault(ch["status"], []).append(ch["expr"])
        all_boxes.append(shown)
    placer = TagPlacer(img.width, img.height, _font(FONT_SIZE))
    for key in sorted(by_status, key=_area):
        chips = [(",".join(f"E{n}" for n in sorted(set(nums))) + f" {status}", STATUS_COLORS[status])
                 for status, nums in sorted(by_status[key].items(), key=lambda kv: order[kv[0]])]
        draw_tag(draw, placer, Tag(key, chips), all_boxes)
    counts = {s: sum(1 for c in changes if c["status"] == s) for s in ("kept", "removed", "moved")}
    rows = [LegendRow(f"kept: {counts['kept']}", KEPT),
            LegendRow(f"removed: {counts['removed']} (dashed; crossed out when no phrase keeps the box)", REMOVED,
                      "removed"),
            LegendRow(f"moved: {counts['moved']} (old place dashed light blue, new place solid)", MOVED)]
    surviving = {e.get("expression_id") for e in after.get("expressions") or []}
    for k, expr in enumerate(before.get("expressions") or []):
        n = _expr_number(expr, k)
        mine = [c for c in changes if c["expr"] == n]
        summary = ", ".join(f"{sum(1 for c in mine if c['status'] == s)} {s}" for s in ("kept", "removed", "moved")
                            if any(c["status"] == s for c in mine))
        dropped = " (phrase dropped)" if expr.get("expression_id") not in surviving else ""
        rows.append(LegendRow(f"E{n}  {expr.get('text', '')}: {summary}{dropped}"))
    title = f"{view.image_id} · step 3 double_check · kept {counts['kept']}, removed {counts['removed']}, " \
            f"moved {counts['moved']}"
    note = problem or (None if before else "no step-2 record to compare with")
    return _compose(title, img, rows, note)


PANELS = {0: panel_step0, 2: panel_step2, 3: panel_step3}

NO_LABELS = "no KITTI boxes (label file missing or empty): steps 0, 2 and 3 had nothing to ask about"


def panel_image(view: ImageView) -> Image.Image:
    """The plain image, for an image without KITTI boxes: what there is to see, and why nothing
    is drawn on it (a missing label file on a street full of cars shows here)."""
    img, _, problem = _base_image(view)
    return _compose(f"{view.image_id} · no labels", img, [], problem or NO_LABELS)


def has_marks(view: ImageView, step: int) -> bool:
    """Whether ``step``'s panel would draw anything: a panel with no box on it is not written."""
    rec = view.records.get(step)
    if rec is None:
        return False
    if step == 0:
        missed = (rec.get("meta", {}).get(PIPELINE_NAMES[0]) or {}).get("missed_kitti")
        return bool(rec.get("regions") or missed)
    if step == 2:
        return any(e.get("instances") for e in rec.get("expressions") or [])
    before = view.records.get(2) or {}
    return any(e.get("instances") for e in [*(before.get("expressions") or []), *(rec.get("expressions") or [])])


def panels_of(view: ImageView) -> list[tuple[str, str, Callable[[ImageView], Image.Image]]]:
    """``(file suffix, figure caption, drawer)`` for each panel worth drawing for ``view``."""
    if not view.labelled:
        return [("image", "the image, no labels", panel_image)]
    return [(f"step{step}", f"step {step} · {STEP_NAMES[step]}", PANELS[step])
            for step in PANEL_STEPS if has_marks(view, step)]


def skipped_panels(view: ImageView) -> list[str]:
    """Finished steps whose panel was left out because it had nothing to draw (labelled images)."""
    if not view.labelled:
        return []
    why = {0: "no regions", 2: "no phrases", 3: "no boxes before or after"}
    return [f"step {step} ({why[step]})" for step in PANEL_STEPS
            if step in view.records and not has_marks(view, step)]


# --------------------------------------------------------------------------- the gallery

WARNING_COUNTS = {
    "invalid_boxes": "boxes the parser could not use",
    "invented": "boxes matching no KITTI box (dropped)",
    "unmatched_boxes": "boxes matching no step-0 region (kept, dashed)",
    "added_dropped": "boxes the model added (dropped)",
}


def warnings_of(view: ImageView) -> list[str]:
    """Parse repairs and dropped or unmatched boxes, per step, from the records' meta."""
    out = []
    for step, name in PIPELINE_NAMES.items():
        m = view.meta.get(name)
        if not isinstance(m, dict):
            continue
        for r in m.get("repairs") or []:
            out.append(f"step {step}: answer repaired ({r})")
        for key, what in WARNING_COUNTS.items():
            if m.get(key):
                out.append(f"step {step}: {what}: {m[key]}")
        if m.get("missed_kitti"):
            out.append(f"step {step}: KITTI boxes not described: {', '.join(map(str, m['missed_kitti']))}")
    return out


def _esc(v: object) -> str:
    return html.escape(str(v), quote=True)


CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f4f4f1;color:#1a1a1a}
header{background:#222;color:#fff;padding:14px 24px}header h1{margin:0 0 4px;font-size:22px}
header p{margin:2px 0;color:#ddd}header a{color:#9fd3f5}
nav{padding:10px 24px;background:#e8e8e3;line-height:2}nav a{margin-right:12px;color:#0b4f7c}
main{padding:8px 24px 40px}
section{background:#fff;border:1px solid #d6d6d0;border-radius:6px;margin:18px 0;padding:14px 18px}
section h2{margin:0 0 6px;font-size:19px}.dim{color:#666;font-weight:normal;font-size:14px}
.badge{display:inline-block;border-radius:10px;padding:0 9px;font-size:13px;margin-left:6px;font-weight:600}
.warn{background:#f0e442;color:#000}.fail{background:#d55e00;color:#fff}.ok{background:#009e73;color:#fff}
.nolabel{background:#5a5a5a;color:#fff}
figure{margin:10px 0}figure img{max-width:100%;height:auto;border:1px solid #ccc}
figcaption{font-size:13px;color:#555}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f0f0ec}.gone{text-decoration:line-through;color:#8a3b00}
ul{margin:4px 0 4px 20px;padding:0}.failures li{color:#8a2a00}.tokens{font-size:13px;color:#444}
"""


def _phrase_table(view: ImageView) -> str:
    before = view.records.get(2)
    after = view.records.get(3)
    if before is None and after is None:
        return ""
    rows = []
    changes = step3_changes(before, after) if before and after else []
    surviving = {e.get("expression_id") for e in (after or {}).get("expressions") or []}
    for k, expr in enumerate((before or after or {}).get("expressions") or []):
        n = _expr_number(expr, k)
        boxes = len(expr.get("instances", []))
        if after is not None and before is not None:
            mine = [c for c in changes if c["expr"] == n]
            result = ", ".join(f"{sum(1 for c in mine if c['status'] == s)} {s}" for s in ("kept", "removed", "moved")
                               if any(c["status"] == s for c in mine))
            gone = expr.get("expression_id") not in surviving
            text = f'<span class="gone">{_esc(expr.get("text", ""))}</span> (dropped)' if gone \
                else _esc(expr.get("text", ""))
        else:
            result, text = "", _esc(expr.get("text", ""))
        rows.append(f"<tr><td>E{n}</td><td>{text}</td><td>{boxes}</td><td>{_esc(result)}</td></tr>")
    head = "<tr><th></th><th>phrase (step 2)</th><th>boxes</th><th>step 3</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>" if rows else "<p>No phrases.</p>"


def _tokens_line(view: ImageView) -> str:
    parts = []
    for step, name in PIPELINE_NAMES.items():
        call = (view.meta.get(name) or {}).get("call") if isinstance(view.meta.get(name), dict) else None
        if call:
            lat = f", {call['latency_s']:.2f} s" if "latency_s" in call else ""
            parts.append(f"step {step}: {call.get('input_tokens', 0):,} in / {call.get('output_tokens', 0):,} out{lat}")
    if not parts:
        return ""
    model = next((c.get("model") for c in ((view.meta.get(n) or {}).get("call") for n in PIPELINE_NAMES.values())
                  if isinstance(c, dict) and c.get("model")), "")
    return f'<p class="tokens">Tokens{f" ({_esc(model)})" if model else ""}: {_esc("; ".join(parts))}</p>'


def _card(view: ImageView, panels: list[tuple[str, str]]) -> str:
    rec = view.latest
    warnings = warnings_of(view)
    badges = []
    if view.failures:
        badges.append(f'<span class="badge fail">{len(view.failures)} failed</span>')
    if warnings:
        badges.append(f'<span class="badge warn">{len(warnings)} warning{"s" if len(warnings) != 1 else ""}</span>')
    if not view.labelled:
        badges.append('<span class="badge nolabel" title="no KITTI boxes: label file missing or empty">'
                      'no labels</span>')
    if not badges:
        badges.append('<span class="badge ok">clean</span>')
    n_boxes = len(view.seed.get("kitti_bboxes") or [])
    done = ", ".join(str(s) for s in sorted(view.records)) or "none"
    parts = [f'<section id="{_esc(view.image_id)}">',
             f'<h2>{_esc(view.image_id)} <span class="dim">{_esc(rec.get("width"))}×{_esc(rec.get("height"))} · '
             f'{n_boxes} KITTI box{"es" if n_boxes != 1 else ""} · steps done: {done}</span>{"".join(badges)}</h2>']
    caption = (view.records.get(1) or rec).get("caption")
    parts.append(f'<p class="caption"><b>Caption:</b> {_esc(caption)}</p>' if caption
                 else '<p class="caption dim">No caption.</p>')
    if view.failures:
        items = "".join(
            f"<li>step {_esc(f.get('step'))}: <b>{_esc(f.get('error', ''))}</b> {_esc(f.get('message', ''))}"
            f" (after {_esc(f.get('attempts', '?'))} attempt{'s' if f.get('attempts') != 1 else ''})</li>"
            for f in view.failures)
        parts.append(f'<p><b>Failures</b></p><ul class="failures">{items}</ul>')
    if warnings:
        parts.append("<p><b>Parse warnings</b></p><ul>" + "".join(f"<li>{_esc(w)}</li>" for w in warnings) + "</ul>")
    if not view.labelled:
        parts.append(f'<p class="dim">No labels: {_esc(NO_LABELS)}, so there are no regions or phrases '
                     "to draw.</p>")
    else:
        parts.append(_phrase_table(view))
    parts.append(_tokens_line(view))
    skipped = skipped_panels(view)
    if skipped:
        parts.append(f'<p class="dim">Not drawn, nothing to show: {_esc(", ".join(skipped))}.</p>')
    for caption_text, src in panels:
        parts.append(f'<figure><img src="{_esc(src)}" alt="{_esc(view.image_id)} {_esc(caption_text)}">'
                     f"<figcaption>{_esc(caption_text)}</figcaption></figure>")
    parts.append("</section>")
    return "\n".join(p for p in parts if p)


def render_index(root: Path, views: list[ImageView], panels: dict[str, list[tuple[str, str]]], total: int) -> str:
    failed = sum(1 for v in views if v.failures)
    warned = sum(1 for v in views if warnings_of(v))
    unlabelled = sum(1 for v in views if not v.labelled)
    nav = " ".join(
        f'<a href="#{quote(v.image_id)}">{_esc(v.image_id)}{" ⚠" if v.failures or warnings_of(v) else ""}</a>'
        for v in views)
    cards = "\n".join(_card(v, panels.get(v.image_id, [])) for v in views)
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>refexp preview · {len(views)} images</title><style>{CSS}</style></head><body>\n"
        f"<header><h1>refexp preview</h1><p>{_esc(root)} · {len(views)} of {total} images shown · "
        f"{failed} with failures · {warned} with parse warnings · {unlabelled} without labels</p>"
        "<p>Step 0: numbered regions and their descriptions. Step 2: one color per phrase (E<i>n</i>). "
        "Step 3: kept (solid green), removed (dashed vermillion; crossed out if no phrase keeps the box), "
        "moved (old place dashed, new place solid blue).</p></header>\n"
        f"<nav>{nav}</nav>\n<main>\n{cards}\n</main></body></html>\n"
    )


@dataclass
class PreviewReport:
    index: Path
    images: int
    panels: int
    total: int


def build_preview(results_dir: str | Path, out: str | Path | None = None, *,
                  images: Iterable[str] | None = None, sample: int = DEFAULT_SAMPLE) -> PreviewReport:
    """Draw the panels of the chosen images and write ``index.html``; returns where it went."""
    root = Path(results_dir).expanduser().resolve()
    if not root.is_dir():
        raise ConfigError(f"--results-dir: not a directory: {root}")
    layout = Layout(root)
    with seed_ids(layout) as pairs:
        total = pairs.count
        ids = choose_ids((image_id for image_id, _ in pairs), images, sample, count=total)
    views = load_views(layout, ids)
    out_dir = Path(out).expanduser().resolve() if out else root / "preview"
    img_dir = out_dir / "images"
    if img_dir.exists():
        shutil.rmtree(img_dir)
    img_dir.mkdir(parents=True)
    panels: dict[str, list[tuple[str, str]]] = {}
    n = 0
    for view in views:
        for suffix, caption, draw in panels_of(view):
            name = f"{view.image_id}_{suffix}.png"
            draw(view).save(img_dir / name, format="PNG", optimize=False)
            panels.setdefault(view.image_id, []).append((caption, "images/" + quote(name)))
            n += 1
    index = out_dir / "index.html"
    write_atomic(index, render_index(root, views, panels, total))
    return PreviewReport(index=index, images=len(views), panels=n, total=total)


# --------------------------------------------------------------------------- command line


def register(app: typer.Typer) -> None:
    """Add ``producer preview`` to ``app``."""

    @app.command()
    def preview(
        results_dir: Annotated[Path, typer.Option("--results-dir", help="The run's results_dir.")],
        images: Annotated[str | None, typer.Option("--images", help="Image ids to show, comma separated.")] = None,
        sample: Annotated[int, typer.Option("--sample", min=0,
                                            help="Show this many images, spread over the run (0 = all).")]
        = DEFAULT_SAMPLE,
        out: Annotated[Path | None, typer.Option("--out", help="Gallery directory (default RESULTS_DIR/preview).")]
        = None,
    ) -> None:
        """Draw each image's steps as PNG panels and write an index.html gallery (opens from disk)."""
        with user_errors():
            rep = build_preview(results_dir, out, images=images.split(",") if images else None, sample=sample)
        typer.echo(f"wrote {rep.panels} panels for {rep.images} of {rep.total} images; open {rep.index.as_uri()}")


__all__ = ["OKABE_ITO", "PALETTE", "build_preview", "choose_ids", "register", "step3_changes", "text_color"]
