"""``producer export``: ``annotations.jsonl`` in the formats grounding and detection trainers read.

All boxes are in pixels of the original image. Which phrases: the records' ``expressions`` (the
step-3 survivors when step 3 ran, else step 2's); ``--phrases regions`` uses the step-0 region
descriptions instead (one phrase per box), for runs of steps 0-1 only.

``odvg`` (JSONL, one line per image; the format Grounding DINO trains on in TAO and mmdetection)::

    {"filename": "000007.png", "height": 375, "width": 1242,
     "grounding": {"caption": "the black cars. the cyclist on the left.",
                   "regions": [{"bbox": [x1, y1, x2, y2], "phrase": "the black cars",
                                "tokens_positive": [[0, 14]]}, ...],
                   "image_caption": "<the step-1 caption>"}}

  One region per box; a phrase with three boxes gives three regions with the same phrase.
  Images without any phrase have nothing to ground and are left out (the command says how many).
  ``caption`` is the image's phrases joined by ``". "``, so each region's ``tokens_positive``
  (character span of its phrase, which mmdetection's ODVG loader requires) points into it; the
  VLM's scene caption is kept as ``image_caption``. ``filename`` is relative to ``--image-root``
  (default: the directory all the images share); set it as the dataset's image prefix.

``refcoco`` (one JSON file): COCO-style ``images``, ``annotations`` (``bbox`` ``[x, y, w, h]``)
and ``categories``, plus ``refs``: one per expression, ``{ref_id, image_id, ann_id, ann_ids,
category_id, split, sentences: [{sent_id, sent, raw, tokens}], sent_ids}``. RefCOCO refers to one
object, so ``ann_id`` is the first object's; phrases about a group ("all the cars") list every
object in ``ann_ids`` (as gRefCOCO does).

``coco`` (one JSON file): COCO detection ``images``, ``annotations``, ``categories``; each
annotation carries ``attributes: {phrases, expression_ids, description, color, matched}`` (the
referring phrases that point at it, and its step-0 description).

Objects (COCO annotations) are the image's KITTI boxes, each under its KITTI type as category.
Step 3 may have tightened a box: the object takes the tightened box when every phrase that
refers to it agrees on it (if one phrase kept the KITTI box and another moved it, the KITTI box
stays). A model box that matched no KITTI box becomes its own object (category ``object``,
``matched: false``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer

from producer.exitcodes import user_errors
from worker.errors import ConfigError
from worker.layout import Layout
from worker.sinks import dumps
from worker.stepdefs import ALL_STEPS

FORMATS: tuple[str, ...] = ("odvg", "refcoco", "coco")
PHRASE_SOURCES = ("expressions", "regions")
UNMATCHED_CATEGORY = "object"
DEFAULT_NAMES = {"odvg": "odvg.jsonl", "refcoco": "refcoco.json", "coco": "coco.json"}


def _r(v: float) -> float:
    return round(float(v), 2)


# --------------------------------------------------------------------------- records -> objects


@dataclass
class Obj:
    """One object of an image: a box, a category, and the phrases that refer to it."""

    bbox: list[float]                       # x1, y1, x2, y2 pixels
    category: str
    description: str = ""
    color: str = ""
    matched: bool = True
    phrases: list[str] = field(default_factory=list)
    expression_ids: list[str] = field(default_factory=list)


@dataclass
class Referral:
    """One phrase and the objects (indexes into the image's objects) it refers to."""

    text: str
    expression_id: str
    objects: list[int]
    boxes: list[list[float]]                # the record's instance boxes, in order


def image_objects(rec: dict, phrases: str = "expressions") -> tuple[list[Obj], list[Referral]]:
    """The image's objects and its referrals, from one ``annotations.jsonl`` record."""
    kitti = rec.get("kitti_bboxes") or []
    regions = rec.get("regions") or []
    objs = [Obj([_r(v) for v in b[:4]], str(b[4])) for b in kitti]
    by_region: dict[int, int] = {}
    for ri, region in enumerate(regions):
        ki = region.get("kitti_index")
        if isinstance(ki, int) and 0 <= ki < len(objs):
            by_region[ri] = ki
        else:  # a record from elsewhere without kitti_index: its own object
            objs.append(Obj([_r(v) for v in region["bbox"]], str(region.get("type") or UNMATCHED_CATEGORY)))
            by_region[ri] = len(objs) - 1
        o = objs[by_region[ri]]
        o.description, o.color = str(region.get("description") or ""), str(region.get("color") or "")
    refs: list[Referral] = []
    if phrases == "regions":
        for ri, region in enumerate(regions):
            text = str(region.get("description") or "").strip()
            if text:
                oi = by_region[ri]
                refs.append(Referral(text, f"{rec['image_id']}/region_{ri}", [oi], [objs[oi].bbox]))
    else:
        loose: dict[tuple, int] = {}
        seen: dict[int, set[tuple]] = {}  # object -> the boxes its instances carry
        for expr in rec.get("expressions") or []:
            text = str(expr.get("text") or "").strip()
            members, boxes = [], []
            for inst in expr.get("instances") or []:
                box = [_r(v) for v in inst["bbox"]]
                ri = inst.get("region_index")
                if inst.get("matched", True) and isinstance(ri, int) and ri in by_region:
                    oi = by_region[ri]
                    seen.setdefault(oi, set()).add(tuple(box))
                else:
                    key = tuple(box)
                    if key not in loose:
                        objs.append(Obj(box, UNMATCHED_CATEGORY, matched=False))
                        loose[key] = len(objs) - 1
                    oi = loose[key]
                if oi not in members:
                    members.append(oi)
                boxes.append(box)
            if text and members:
                refs.append(Referral(text, str(expr.get("expression_id") or ""), members, boxes))
        for oi, boxes_seen in seen.items():
            if len(boxes_seen) == 1:  # step 3 moved it (and no phrase kept the old box): take the new box
                objs[oi].bbox = list(next(iter(boxes_seen)))
    for ref in refs:
        for oi in ref.objects:
            if ref.text not in objs[oi].phrases:
                objs[oi].phrases.append(ref.text)
                objs[oi].expression_ids.append(ref.expression_id)
    return objs, refs


# --------------------------------------------------------------------------- reading


def ensure_final(results_dir: Path) -> str | None:
    """Make sure ``annotations.jsonl`` exists: if it is missing, finalize it from the step sinks
    (returns a note saying so)."""
    layout = Layout(results_dir)
    if layout.final.exists():
        return None
    steps = [s for s in ALL_STEPS if layout.sink(s).path.exists()]
    if not steps or not layout.seed.path.exists():
        raise ConfigError(f"{results_dir}: no annotations.jsonl and no step results to build it from "
                          "(is this a refexp results_dir? has the run started?)")
    from producer.finalize import finalize

    rep = finalize(layout, steps)
    return (f"{layout.final.name} was missing: finalized it from the step sinks first (steps "
            f"{', '.join(map(str, steps))}: {rep.written} images, {rep.n_failed} failed, "
            f"{rep.n_missing} missing)")


def iter_final(results_dir: Path) -> Iterator[dict]:
    """The records of ``annotations.jsonl``, streamed."""
    path = Layout(results_dir).final
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except ValueError as exc:
                raise ConfigError(f"{path}:{lineno}: not JSON ({exc})") from None


def image_root(records: Iterable[dict]) -> Path:
    """The directory every image lives under (the seed's ``image_dir`` in practice)."""
    root: str | None = None
    for r in records:
        parent = str(Path(r["image_path"]).parent)
        root = parent if root is None else os.path.commonpath([root, parent])
    return Path(root) if root is not None else Path(".")


def _filename(rec: dict, root: Path | None) -> str:
    path = Path(rec["image_path"])
    if root is None:
        return str(path)
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------- formats


def odvg_lines(records: Iterable[dict], *, root: Path | None, phrases: str = "expressions") -> Iterator[dict]:
    for rec in records:
        _, refs = image_objects(rec, phrases)
        spans: dict[str, list[int]] = {}
        caption = ""
        for ref in refs:
            if ref.text not in spans:
                if caption:
                    caption += ". "
                spans[ref.text] = [len(caption), len(caption) + len(ref.text)]
                caption += ref.text
        if caption:
            caption += "."
        regions = [{"bbox": box, "phrase": ref.text, "tokens_positive": [spans[ref.text]]}
                   for ref in refs for box in ref.boxes]
        grounding: dict = {"caption": caption, "regions": regions}
        if rec.get("caption"):
            grounding["image_caption"] = rec["caption"]
        yield {"filename": _filename(rec, root), "height": int(rec["height"]), "width": int(rec["width"]),
               "grounding": grounding}


def _xywh(b: list[float]) -> list[float]:
    return [_r(b[0]), _r(b[1]), _r(b[2] - b[0]), _r(b[3] - b[1])]


@dataclass
class CocoCounts:
    images: int = 0
    objects: int = 0
    phrases: int = 0  # distinct phrases per image, summed (RefCOCO: refs)
    links: int = 0    # phrase-object links


def coco_items(records: Iterable[dict], cat_id: dict[str, int], *, root: Path | None,
               phrases: str = "expressions", with_refs: bool = False,
               counts: CocoCounts | None = None) -> Iterator[tuple[str, dict]]:
    """COCO ``images`` and ``annotations`` (and RefCOCO ``refs`` when asked) item by item, as
    ``(section, item)``, with category ids from ``cat_id`` (``coco_categories``)."""
    counts = counts if counts is not None else CocoCounts()
    ann_id = ref_id = 0
    for image_id, rec in enumerate(records, start=1):
        objs, referrals = image_objects(rec, phrases)
        file_name = _filename(rec, root)
        counts.images += 1
        yield "images", {"id": image_id, "file_name": file_name, "width": int(rec["width"]),
                         "height": int(rec["height"]), "image_key": rec["image_id"]}
        first_ann = ann_id + 1
        texts: set[str] = set()
        for o in objs:
            ann_id += 1
            box = _xywh(o.bbox)
            ann = {"id": ann_id, "image_id": image_id, "category_id": cat_id[o.category], "bbox": box,
                   "area": _r(box[2] * box[3]), "iscrowd": 0}
            if not with_refs:
                ann["attributes"] = {"phrases": o.phrases, "expression_ids": o.expression_ids,
                                     "description": o.description, "color": o.color, "matched": o.matched}
                counts.links += len(o.phrases)
                texts.update(o.phrases)
            counts.objects += 1
            yield "annotations", ann
        counts.phrases += len(texts)
        if with_refs:
            for ref in referrals:
                ref_id += 1
                ann_ids = [first_ann + oi for oi in ref.objects]
                counts.phrases += 1
                counts.links += len(ann_ids)
                yield "refs", {
                    "ref_id": ref_id, "image_id": image_id, "ann_id": ann_ids[0], "ann_ids": ann_ids,
                    "category_id": cat_id[objs[ref.objects[0]].category], "split": "train", "file_name": file_name,
                    "sentences": [{"sent_id": ref_id, "sent": ref.text, "raw": ref.text,
                                   "tokens": ref.text.split()}],
                    "sent_ids": [ref_id], "expression_id": ref.expression_id,
                }


def coco_categories(records: Iterable[dict], phrases: str = "expressions") -> dict[str, int]:
    """Category name -> id (names sorted), from a first pass over the records."""
    names = {o.category for rec in records for o in image_objects(rec, phrases)[0]}
    return {n: i + 1 for i, n in enumerate(sorted(names))}


def write_coco(path: Path, records: Callable[[], Iterable[dict]], *, root: Path | None,
               phrases: str = "expressions", with_refs: bool = False) -> CocoCounts:
    """Write a COCO (or RefCOCO) JSON file in bounded memory: two passes over ``records()`` (the
    category names, then the items), the images written as they come and the annotations and
    refs spooled to temp files beside ``path`` and appended after them. The bytes are those of
    ``json.dumps`` of the whole dataset (keys in the order info, images, annotations,
    categories, refs), which held every image, object and phrase of the run in memory."""
    cat_id = coco_categories(records(), phrases)
    info = {"description": "refexp export: referring expressions grounded on KITTI boxes", "phrases": phrases}
    counts = CocoCounts()
    spools = {name: path.with_name(f".{path.name}.{name}-{socket.gethostname()}-{os.getpid()}.tmp")
              for name in ("annotations", "refs")}
    try:
        with open(path, "w", encoding="utf-8") as out, open(spools["annotations"], "w", encoding="utf-8") as anns, \
                open(spools["refs"], "w", encoding="utf-8") as refs:
            sinks = {"images": out, "annotations": anns, "refs": refs}
            first = dict.fromkeys(sinks, True)
            out.write(f'{{"info": {json.dumps(info, ensure_ascii=False)}, "images": [')
            for section, item in coco_items(records(), cat_id, root=root, phrases=phrases, with_refs=with_refs,
                                            counts=counts):
                sinks[section].write(("" if first[section] else ", ") + json.dumps(item, ensure_ascii=False))
                first[section] = False
        with open(path, "a", encoding="utf-8") as out:
            out.write('], "annotations": [')
            _append(out, spools["annotations"])
            categories = [{"id": i, "name": n, "supercategory": n} for n, i in cat_id.items()]
            out.write(f'], "categories": {json.dumps(categories, ensure_ascii=False)}')
            if with_refs:
                out.write(', "refs": [')
                _append(out, spools["refs"])
                out.write("]")
            out.write("}\n")
    finally:
        for spool in spools.values():
            spool.unlink(missing_ok=True)
    return counts


def _append(out, spool: Path) -> None:
    with open(spool, encoding="utf-8") as f:
        shutil.copyfileobj(f, out, 1 << 20)


@dataclass
class ExportReport:
    """What an export wrote, each count named for what it is (the formats count different things:
    ODVG has one region per phrase and box, COCO one annotation per object with the phrases that
    point at it as attributes, RefCOCO one ref per phrase)."""

    path: Path
    fmt: str
    images: int
    phrases: int            # distinct phrases per image, summed: the same in every format
    links: int              # phrase-box pairs (ODVG regions; COCO/RefCOCO phrase-object links)
    objects: int = 0        # COCO/RefCOCO annotations: one per object (KITTI box or unmatched box)
    note: str | None = None
    root: Path | None = None

    def summary(self) -> str:
        """One line saying what each count is, e.g. for COCO "12 images, 48 objects (annotations),
        37 phrases, linked to objects 93 times (attributes.phrases)"."""
        head = f"{self.images} image{'s' if self.images != 1 else ''}"
        phrases = f"{self.phrases} phrase{'s' if self.phrases != 1 else ''}"
        if self.fmt == "odvg":
            return f"{head}, {phrases}, {self.links} regions (one per phrase and box)"
        objects = f"{self.objects} object{'s' if self.objects != 1 else ''} (annotations)"
        if self.fmt == "refcoco":
            return (f"{head}, {objects}, {self.phrases} refs (one per phrase), "
                    f"{self.links} phrase-object links (ann_ids)")
        return f"{head}, {objects}, {phrases}, linked to objects {self.links} times (attributes.phrases)"


def export(results_dir: str | Path, fmt: str, out: str | Path | None = None, *,
           phrases: str = "expressions", image_root_dir: str | Path | None = None,
           absolute_paths: bool = False) -> ExportReport:
    """Write ``results_dir``'s final records as ``fmt`` to ``out`` (default ``results_dir/export/``)."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if phrases not in PHRASE_SOURCES:
        raise ConfigError(f"--phrases must be one of {', '.join(PHRASE_SOURCES)}, not {phrases!r}")
    root_dir = Path(results_dir).expanduser().resolve()
    if not root_dir.is_dir():
        raise ConfigError(f"--results-dir: not a directory: {root_dir}")
    note = ensure_final(root_dir)
    if absolute_paths:
        root = None
    else:
        root = Path(image_root_dir).resolve() if image_root_dir else image_root(iter_final(root_dir))
    path = Path(out).expanduser().resolve() if out else root_dir / "export" / DEFAULT_NAMES[fmt]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")
    n_phrases = n_links = n_objects = 0
    n_images = 0
    try:
        if fmt == "odvg":
            n = 0  # images without a phrase: nothing to ground, and an empty caption is no sample
            with open(tmp, "w", encoding="utf-8") as f:
                for line in odvg_lines(iter_final(root_dir), root=root, phrases=phrases):
                    regions = line["grounding"]["regions"]
                    if not regions:
                        n += 1
                        continue
                    n_images += 1
                    n_links += len(regions)
                    n_phrases += len({r["phrase"] for r in regions})
                    f.write(dumps(line) + "\n")
            if n:
                skipped = f"{n} image{'s' if n != 1 else ''} without phrases left out (nothing to ground)"
                note = f"{note}; {skipped}" if note else skipped
        else:
            counts = write_coco(tmp, lambda: iter_final(root_dir), root=root, phrases=phrases,
                                with_refs=fmt == "refcoco")
            n_images, n_objects, n_phrases, n_links = counts.images, counts.objects, counts.phrases, counts.links
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # an export that failed midway leaves no half file behind
    return ExportReport(path=path, fmt=fmt, images=n_images, phrases=n_phrases, links=n_links, objects=n_objects,
                        note=note, root=root)


# --------------------------------------------------------------------------- command line


def register(app: typer.Typer) -> None:
    """Add ``producer export`` to ``app``."""

    @app.command("export")
    def export_cmd(
        results_dir: Annotated[Path, typer.Option("--results-dir", help="The run's results_dir.")],
        fmt: Annotated[str, typer.Option("--format", help="odvg | refcoco | coco")],
        out: Annotated[Path | None, typer.Option("--out", help="Output file (default RESULTS_DIR/export/...).")]
        = None,
        phrases: Annotated[str, typer.Option("--phrases", help="expressions (steps 2/3) | regions (step-0 "
                                                               "descriptions)")] = "expressions",
        image_root_dir: Annotated[Path | None, typer.Option("--image-root", help="Write file names relative to "
                                                            "this directory (default: the images' common one).")]
        = None,
        absolute_paths: Annotated[bool, typer.Option("--absolute-paths", help="Write absolute image paths.")]
        = False,
    ) -> None:
        """Export annotations.jsonl as ODVG (Grounding DINO), RefCOCO-style or COCO detection JSON."""
        with user_errors():
            rep = export(results_dir, fmt, out, phrases=phrases, image_root_dir=image_root_dir,
                         absolute_paths=absolute_paths)
        if rep.note:
            typer.echo(f"note: {rep.note}", err=True)
        typer.echo(f"wrote {rep.path} ({fmt}): {rep.summary()}")
        typer.echo(f"  image file names are relative to {rep.root}" if rep.root else "  image paths are absolute")
