"""Seeding: one record per image, streamed to ``seed_annotations.jsonl``.

The producer never calls the VLM; it lists images, reads each header (not the pixels), parses
its KITTI label and writes the record. Only the sorted file names are held in memory, never
the records. Every line we could not use is counted and reported with file and line number.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from worker.constants import SEED_FILE
from worker.errors import ConfigError, InputError
from worker.images import IMAGE_SUFFIXES, read_size
from worker.kitti import decode_label_bytes, parse_kitti
from worker.sinks import dumps
from worker.spec import Spec
from worker.steps.records import SOURCE

REQUIRED_FIELDS = ("image_id", "image_path")
MAX_REPORTED = 50


@dataclass
class SeedReport:
    """What seeding saw: counts for the summary, and the first problems in full."""

    images: int = 0
    boxes: int = 0
    ignored_boxes: int = 0
    skipped_lines: int = 0
    missing_labels: int = 0
    unreadable_images: int = 0
    problems: list[str] = field(default_factory=list)
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (image_id, path, message)

    def note(self, message: str) -> None:
        if len(self.problems) < MAX_REPORTED:
            self.problems.append(message)


@dataclass(frozen=True)
class SeedEntry:
    """One seeded image: its id and the byte offset of its line in the seed file."""

    image_id: str
    offset: int


def list_images(image_dir: Path) -> list[tuple[str, str]]:
    """``(stem, file name)`` of every jpg/jpeg/png (any case), sorted; duplicate stems are an error."""
    names = []
    with os.scandir(image_dir) as it:
        for entry in it:
            if entry.name.lower().endswith(IMAGE_SUFFIXES) and entry.is_file():
                names.append((os.path.splitext(entry.name)[0], entry.name))
    names.sort()
    for (stem_a, name_a), (stem_b, name_b) in itertools.pairwise(names):
        if stem_a == stem_b:
            raise ConfigError(
                f"two images share the id '{stem_a}': {image_dir / name_a} and {image_dir / name_b} "
                "(image_id is the file stem; rename or remove one)"
            )
    return names


def _kitti_rows(boxes: list[dict]) -> list[list]:
    return [[*b["bbox"], b["type"]] for b in boxes]


def seed_from_images(spec: Spec, report: SeedReport) -> Iterator[dict]:
    """Seed records from ``data.image_dir`` and ``data.kitti_label_dir``."""
    data = spec.ire.data
    image_dir = Path(data.image_dir).resolve()
    label_dir = Path(data.kitti_label_dir).resolve() if data.kitti_label_dir else None
    max_pixels = spec.ire.vlm.max_image_pixels
    for stem, name in list_images(image_dir):
        path = image_dir / name
        try:
            width, height = read_size(path, max_pixels=max_pixels)
        except InputError as exc:
            report.unreadable_images += 1
            report.failures.append((stem, str(path), str(exc)))
            report.note(str(exc))
            continue
        boxes: list[dict] = []
        if label_dir is not None:
            label_path = label_dir / f"{stem}.txt"
            try:
                text = decode_label_bytes(label_path.read_bytes())
            except FileNotFoundError:
                report.missing_labels += 1
                report.note(f"{label_path}: no label file; {path.name} is seeded with no boxes")
                text = ""
            parsed = parse_kitti(text, width=width, height=height, ignore_types=data.ignore_types)
            boxes = parsed.boxes
            report.ignored_boxes += parsed.ignored
            report.skipped_lines += len(parsed.skipped)
            for s in parsed.skipped:
                report.note(f"{label_path}:{s.line}: skipped ({s.reason}): {s.text!r}")
        report.images += 1
        report.boxes += len(boxes)
        yield {
            "image_id": stem,
            "image_path": str(path),
            "width": width,
            "height": height,
            "kitti_bboxes": _kitti_rows(boxes),
            "source": SOURCE,
            "pipeline_steps": [],
        }


def seed_from_jsonl(spec: Spec, report: SeedReport) -> Iterator[dict]:
    """Seed records from ``data.input_annotations_jsonl`` (TAO's resume schema)."""
    path = Path(spec.ire.data.input_annotations_jsonl)
    seen: dict[str, int] = {}
    max_pixels = spec.ire.vlm.max_image_pixels
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise ConfigError(f"{path}:{lineno}: not a JSON object ({exc.args[0]})") from None
            if not isinstance(rec, dict):
                raise ConfigError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            missing = [k for k in REQUIRED_FIELDS if not rec.get(k)]
            if missing:
                raise ConfigError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}")
            image_id = str(rec["image_id"])
            if image_id in seen:
                raise ConfigError(f"{path}:{lineno}: image_id '{image_id}' already seeded on line {seen[image_id]}")
            seen[image_id] = lineno
            kitti = rec.get("kitti_bboxes") or []
            if not isinstance(kitti, list) or not all(_valid_row(b) for b in kitti):
                raise ConfigError(f"{path}:{lineno}: kitti_bboxes must be a list of [x1, y1, x2, y2, type] "
                                  "with numeric coordinates and a string type")
            width, height = rec.get("width") or 0, rec.get("height") or 0
            if not _positive_int(width) or not _positive_int(height):
                if width or height:
                    raise ConfigError(f"{path}:{lineno}: width and height must be positive integers "
                                      f"(got {width!r} x {height!r}); leave them out to read them from the image")
                try:
                    width, height = read_size(rec["image_path"], max_pixels=max_pixels)
                except InputError as exc:
                    report.unreadable_images += 1
                    report.failures.append((image_id, str(rec["image_path"]), str(exc)))
                    report.note(f"{path}:{lineno}: {exc}")
                    continue
            report.images += 1
            report.boxes += len(kitti)
            steps = rec.get("pipeline_steps") or []
            rec.update(image_id=image_id, width=int(width), height=int(height), kitti_bboxes=kitti,
                       pipeline_steps=list(steps) if isinstance(steps, list) else [str(steps)])
            rec.setdefault("source", SOURCE)
            yield rec


def _positive_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _valid_row(b: object) -> bool:
    if not isinstance(b, list) or len(b) != 5 or not isinstance(b[4], str):
        return False
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in b[:4])


def write_seed(
    spec: Spec, results_dir: Path, report: SeedReport, on_record: Callable[[SeedEntry], None] | None = None
) -> Path:
    """Stream the seed records to ``results_dir/seed_annotations.jsonl`` (atomically replaced)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    final = results_dir / SEED_FILE
    tmp = results_dir / f".{SEED_FILE}.{os.getpid()}.tmp"
    source = seed_from_jsonl if spec.ire.data.input_annotations_jsonl else seed_from_images
    offset = 0
    with open(tmp, "wb") as f:
        for rec in source(spec, report):
            line = (dumps(rec) + "\n").encode("utf-8")
            f.write(line)
            if on_record is not None:
                on_record(SeedEntry(rec["image_id"], offset))
            offset += len(line)
    os.replace(tmp, final)
    return final


def iter_seed(path: Path) -> Iterator[tuple[int, dict]]:
    """``(offset, record)`` for every line of a seed file."""
    offset = 0
    with open(path, "rb") as f:
        for line in f:
            yield offset, json.loads(line)
            offset += len(line)
