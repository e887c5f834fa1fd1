"""Seeding: one record per image, streamed to ``seed_annotations.jsonl``.

The producer never calls the VLM; it lists images, reads each header (not the pixels), parses
its KITTI label and writes the record. Memory is bounded at any number of images: the file
names are sorted externally (``producer.extsort``), and duplicate ids in an input jsonl are
found by sorting its ids the same way, not with a map of every id. Every line we could not use
is counted and reported with file and line number.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from producer.extsort import Cursor, SortedPairs
from worker.constants import SEED_FILE, SEED_ORDINAL, seed_ordinal
from worker.errors import ConfigError, InputError
from worker.images import IMAGE_SUFFIXES, UNSUPPORTED_SUFFIXES, read_size
from worker.kitti import cap_boxes, decode_label_bytes, parse_kitti
from worker.sinks import JsonlSink, dumps, write_atomic
from worker.spec import Spec
from worker.steps.records import SOURCE

REQUIRED_FIELDS = ("image_id", "image_path")
MAX_REPORTED = 50
MAX_FOLDERS_DESCRIBED = 5  # subfolders whose contents the summary counts (each costs a listing)


@dataclass
class SeedReport:
    """What seeding saw: counts for the summary, and the first problems in full."""

    images: int = 0
    boxes: int = 0
    ignored_boxes: int = 0
    skipped_lines: int = 0
    missing_labels: int = 0
    orphan_labels: int = 0  # label files with no image of their stem (ignored)
    unreadable_images: int = 0
    outside_root: int = 0  # input_annotations_jsonl images outside the allowed root (not seeded)
    unreadable_labels: int = 0  # label paths that are directories or cannot be read (image not seeded)
    unsupported_images: int = 0  # image files of a format we do not send (.bmp, .gif, ...)
    subfolders: int = 0  # folders inside data.image_dir (not searched)
    capped_boxes: int = 0  # boxes dropped by data.max_boxes_per_image
    problems: list[str] = field(default_factory=list)
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (image_id, path, message)
    sha256: str = ""  # of the seed file written (run.json records it: did the inputs' content change?)
    # The seed was numbered afresh although ordinals were given before (the seed file deleted):
    # done bits the run holds may be other images' now (producer.submit.register reindexes).
    renumbered: bool = False

    def note(self, message: str) -> None:
        if len(self.problems) < MAX_REPORTED:
            self.problems.append(message)

    def summary(self) -> str:
        """One line for the user; the counts that are usually 0 appear only when they are not."""
        extra = [(self.outside_root, "images outside the allowed root"),
                 (self.unreadable_labels, "label files unreadable (images not seeded)"),
                 (self.unsupported_images, "image files of an unsupported type skipped"),
                 (self.subfolders, "subfolders of data.image_dir not searched"),
                 (self.capped_boxes, "boxes over data.max_boxes_per_image dropped")]
        return (f"seeded {self.images} images, {self.boxes} boxes ({self.ignored_boxes} ignored by type, "
                f"{self.skipped_lines} label lines skipped, {self.missing_labels} label files missing, "
                f"{self.unreadable_images} images unreadable, {self.orphan_labels} label files without an image"
                + "".join(f", {n} {what}" for n, what in extra if n) + ")")


@dataclass(frozen=True)
class SeedEntry:
    """One seeded image: its id and the byte offset of its line in the seed file."""

    image_id: str
    offset: int


@dataclass
class ImageListing:
    """What ``data.image_dir`` holds, sorted: the images to seed, and what was left out and why."""

    images: Iterable[tuple[str, str]] = ()  # (stem, file name), sorted (a SortedPairs: close() it)
    broken: list[tuple[str, str, str]] = field(default_factory=list)  # (stem, file name, reason)
    unsupported: dict[str, list[str]] = field(default_factory=dict)  # format -> file names
    subfolders: list[str] = field(default_factory=list)  # folder names
    other: dict[str, int] = field(default_factory=dict)  # suffix of non-image files -> count

    def skipped_stems(self) -> dict[str, str]:
        """Stem -> why its image file was not seeded (for label files of those stems)."""
        out = {stem: f"{name}: {why}" for stem, name, why in self.broken}
        for fmt, names in self.unsupported.items():
            for name in names:
                out.setdefault(os.path.splitext(name)[0], f"{name}: {fmt} is not a supported image type")
        return out


def _entry_kind(entry: os.DirEntry) -> tuple[str, str]:
    """("file" | "dir" | "broken", reason): symlink loops, dangling links and unreadable
    entries are "broken" with the OS's word for it, instead of an OSError out of enqueue."""
    error: OSError | None = None
    try:
        if entry.is_dir():
            return "dir", ""
        if entry.is_file():
            return "file", ""
    except OSError as exc:  # ELOOP, EACCES: is_dir() only swallows FileNotFoundError
        error = exc
    try:
        link = entry.is_symlink()
        if link and error is None:
            os.stat(entry.path)
    except OSError as exc:
        error = exc
    reason = (error.strerror or str(error)) if error is not None else ""
    if link:
        return "broken", f"a symbolic link that leads nowhere ({reason or 'not a file'})"
    return "broken", f"cannot be read ({reason})" if reason else "not a regular file"


def _folder_contents(path: str) -> str:
    """What a subfolder holds, in a few words (one level: camera folders hold images directly)."""
    try:
        with os.scandir(path) as it:
            names = [e.name for e in it]
    except OSError as exc:
        return f"cannot be listed: {exc.strerror or exc}"
    n = sum(1 for name in names if name.lower().endswith(IMAGE_SUFFIXES))
    return f"{n} image file{'s' if n != 1 else ''}" if n else "no image files"


def _sort_entry(entry: os.DirEntry, listing: ImageListing) -> tuple[str, str] | None:
    """File the entry in ``listing``; an image to seed is returned, ``(stem, file name)``."""
    kind, why = _entry_kind(entry)
    stem, suffix = os.path.splitext(entry.name)
    suffix = suffix.lower()
    if kind == "dir":
        listing.subfolders.append(entry.name)
    elif suffix in IMAGE_SUFFIXES:
        if kind == "file":
            return stem, entry.name
        listing.broken.append((stem, entry.name, why))
    elif suffix in UNSUPPORTED_SUFFIXES:
        listing.unsupported.setdefault(UNSUPPORTED_SUFFIXES[suffix], []).append(entry.name)
    else:
        key = suffix or "(no suffix)"
        listing.other[key] = listing.other.get(key, 0) + 1
    return None


def scan_image_dir(image_dir: Path) -> ImageListing:
    """Sort the entries of ``image_dir`` into images to seed and what is skipped, with reasons.

    Only the files directly in it are images (jpg/jpeg/png/webp, any case): subfolders are
    reported, not searched, since camera folders (``image_02/``, ``image_03/``) share file stems
    and ``image_id`` is the stem (invariant 1). Duplicate stems are a ``ConfigError``.
    ``listing.images`` is sorted externally (a ``SortedPairs``; the caller closes it), so a
    folder of ten million images costs a chunk of names in memory, not all of them.
    """
    listing = ImageListing()

    def images() -> Iterator[tuple[str, str]]:
        with os.scandir(image_dir) as it:
            for entry in it:  # not sorted as DirEntry objects: a million of them would not be small
                image = _sort_entry(entry, listing)
                if image is not None:
                    yield image

    try:
        names = SortedPairs(images())
    except OSError as exc:
        raise ConfigError(f"data.image_dir: cannot list {image_dir} ({exc.strerror or exc})") from None
    listing.broken.sort()
    listing.subfolders.sort()
    for unsupported in listing.unsupported.values():
        unsupported.sort()
    prev: tuple[str, str] | None = None
    for pair in names:
        if prev is not None and prev[0] == pair[0]:
            names.close()
            raise ConfigError(
                f"two images share the id '{prev[0]}': {image_dir / prev[1]} and {image_dir / pair[1]} "
                "(image_id is the file stem; rename or remove one)"
            )
        prev = pair
    listing.images = names
    return listing


def list_images(image_dir: Path) -> list[tuple[str, str]]:
    """``(stem, file name)`` of every jpg/jpeg/png/webp (any case), sorted; duplicate stems are an
    error. A list, for small folders (a sample, the tests); seeding streams ``scan_image_dir``."""
    with scan_image_dir(image_dir).images as images:  # type: ignore[union-attr]
        return list(images)


def _report_listing(listing: ImageListing, image_dir: Path, report: SeedReport) -> None:
    """Say what ``data.image_dir`` held that will not be seeded, and why."""
    for stem, name, why in listing.broken:
        message = f"{image_dir / name}: {why}; not seeded"
        report.unreadable_images += 1
        report.failures.append((stem, str(image_dir / name), message))
        report.note(message)
    for fmt, names in listing.unsupported.items():
        report.unsupported_images += len(names)
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        report.note(f"{image_dir}: {len(names)} {fmt} file{'s' if len(names) != 1 else ''} skipped ({shown}): "
                    f"{fmt} is not sent to the VLM APIs; convert to PNG, JPEG or WebP")
    report.subfolders += len(listing.subfolders)
    for name in listing.subfolders[:MAX_FOLDERS_DESCRIBED]:
        report.note(f"{image_dir / name}/: a subfolder ({_folder_contents(str(image_dir / name))}), not searched: "
                    "only files directly in data.image_dir are seeded (point data.image_dir at the folder; "
                    "one run per folder, since camera folders share file names)")
    if len(listing.subfolders) > MAX_FOLDERS_DESCRIBED:
        report.note(f"{image_dir}: {len(listing.subfolders) - MAX_FOLDERS_DESCRIBED} more subfolders, not searched")
    if listing.other:
        kinds = ", ".join(f"{n} {ext}" for ext, n in sorted(listing.other.items()))
        report.note(f"{image_dir}: {sum(listing.other.values())} files that are not images skipped ({kinds})")


def _kitti_rows(boxes: list[dict]) -> list[list]:
    return [[*b["bbox"], b["type"]] for b in boxes]


def read_label(label_path: Path) -> str | None:
    """The text of a label file, or None when there is none; InputError when the path cannot
    be read as a file (a directory, a symlink loop, no permission) — that image's problem alone."""
    try:
        return decode_label_bytes(label_path.read_bytes())
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise InputError(f"{label_path}: the label path is a directory, not a file") from None
    except OSError as exc:
        raise InputError(f"{label_path}: cannot read the label file ({exc.strerror or exc})") from None


def _cap(rows: list, limit: int, where: str, report: SeedReport) -> list:
    kept, dropped = cap_boxes(rows, limit)
    if dropped:
        report.capped_boxes += dropped
        report.note(f"{where}: {len(rows)} boxes, more than data.max_boxes_per_image = {limit}; kept the "
                    f"{limit} largest, dropped {dropped} (one prompt cannot carry them all; raise the limit "
                    "if the model's output budget allows)")
    return kept


def seed_from_images(spec: Spec, report: SeedReport) -> Iterator[dict]:
    """Seed records from ``data.image_dir`` and ``data.kitti_label_dir``."""
    data = spec.ire.data
    image_dir = Path(data.image_dir).resolve()
    label_dir = Path(data.kitti_label_dir).resolve() if data.kitti_label_dir else None
    listing = scan_image_dir(image_dir)
    try:
        _report_listing(listing, image_dir, report)
        if label_dir is not None:
            _count_orphan_labels(label_dir, listing, report)
        yield from _image_records(spec, image_dir, label_dir, listing.images, report)
    finally:
        listing.images.close()  # type: ignore[attr-defined]


def _image_records(spec: Spec, image_dir: Path, label_dir: Path | None, images: Iterable[tuple[str, str]],
                   report: SeedReport) -> Iterator[dict]:
    data = spec.ire.data
    max_pixels = spec.ire.vlm.max_image_pixels
    for stem, name in images:
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
                text = read_label(label_path)
            except InputError as exc:
                message = f"{exc}; {path.name} is not seeded"
                report.unreadable_labels += 1
                report.failures.append((stem, str(path), message))
                report.note(message)
                continue
            if text is None:
                report.missing_labels += 1
                report.note(f"{label_path}: no label file; {path.name} is seeded with no boxes")
                text = ""
            parsed = parse_kitti(text, width=width, height=height, ignore_types=data.ignore_types)
            boxes = _cap(parsed.boxes, data.max_boxes_per_image, str(label_path), report)
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


def _count_orphan_labels(label_dir: Path, listing: ImageListing, report: SeedReport) -> None:
    """Label files whose image does not exist are ignored, but counted and named; a label whose
    image was skipped (an unsupported type, a broken link) says so instead. The label stems are
    sorted externally and walked beside the sorted images (no set of every stem)."""
    skipped = listing.skipped_stems()
    hint = " (images in subfolders are not searched)" if listing.subfolders else ""

    def labels() -> Iterator[tuple[str, str]]:
        with os.scandir(label_dir) as it:
            for entry in it:
                stem, ext = os.path.splitext(entry.name)
                if ext == ".txt":
                    yield stem, entry.name

    images = Cursor(listing.images)
    with SortedPairs(labels()) as sorted_labels:
        for stem, name in sorted_labels:
            if images.take(stem):
                continue
            path = label_dir / name
            try:
                is_file = stat.S_ISREG(os.stat(path).st_mode)
            except FileNotFoundError:
                is_file = False  # a link that leads nowhere
            except OSError:
                is_file = True  # a broken entry is reported when its image asks for it, or here
            if not is_file:
                continue
            if stem in skipped:
                report.note(f"{path}: ignored, since its image was skipped ({skipped[stem]})")
                continue
            report.orphan_labels += 1
            report.note(f"{path}: label file with no image '{stem}' in data.image_dir; ignored{hint}")


def allowed_root(spec: Spec) -> Path:
    """Where ``input_annotations_jsonl`` image paths must lie: ``data.image_dir`` when set, else
    the jsonl file's directory. Relative image paths are resolved against it."""
    data = spec.ire.data
    if data.image_dir and data.image_dir != "???":
        return Path(os.path.abspath(data.image_dir))
    return Path(os.path.abspath(data.input_annotations_jsonl)).parent


def why_nothing_seeded(spec: Spec, report: SeedReport) -> str:
    """Why a seed came out empty, in one sentence naming the input (the details are the
    report's problems, printed before it, and ``failures.jsonl``)."""
    data = spec.ire.data
    source = data.input_annotations_jsonl or data.image_dir
    reasons = [(report.outside_root, f"image paths outside the allowed root {allowed_root(spec)} (data.image_dir, "
                                     "or the jsonl file's directory when image_dir is unset)"),
               (report.unreadable_images, "images unreadable"),
               (report.unreadable_labels, "label paths that are not readable files"),
               (report.unsupported_images, "image files of an unsupported type (convert them to PNG, JPEG or WebP)"),
               (report.subfolders, "subfolders, not searched (point data.image_dir at the folder holding the "
                                   "images)")]
    found = [f"{n} {what}" for n, what in reasons if n]
    if not found:
        found = (["the file holds no record"] if data.input_annotations_jsonl
                 else ["it holds no .jpg, .jpeg, .png or .webp file"])
    return f"nothing could be seeded from {source}: {'; '.join(found)}"


class _Inside:
    """Whether image paths lie under ``root`` (as written, or once symlinks are resolved): the
    absolute, normalised path if so, else None. ``..`` cannot climb out: the check is on the
    normalised path. Built once per input file: the common case (a path under the root as
    written) is string work only; symlinks are resolved only for a path that is not."""

    def __init__(self, root: Path):
        self.root = root
        self.real_root = root.resolve()
        self._under = tuple({_prefix(root), _prefix(self.real_root)})

    def __call__(self, image_path: str) -> str | None:
        norm = os.path.normpath(os.path.join(self.root, os.path.expanduser(image_path)))
        if norm.startswith(self._under) or norm + os.sep in self._under:
            return norm
        return norm if Path(norm).resolve().is_relative_to(self.real_root) else None


def _prefix(root: Path) -> str:
    """``root`` normalised, with one trailing separator: the prefix of every path under it."""
    text = os.path.normpath(root)
    return text if text.endswith(os.sep) else text + os.sep


def seed_from_jsonl(spec: Spec, report: SeedReport) -> Iterator[dict]:
    """Seed records from ``data.input_annotations_jsonl`` (TAO's resume schema)."""
    path = Path(spec.ire.data.input_annotations_jsonl)
    root = allowed_root(spec)
    with SortedPairs() as seen:  # (image_id, line): duplicates are found once the file is read
        yield from _jsonl_records(spec, path, root, seen, report)
        prev: tuple[str, int] | None = None
        for image_id, lineno in seen:
            if prev is not None and prev[0] == image_id:
                raise ConfigError(f"{path}:{lineno}: image_id '{image_id}' already seeded on line {prev[1]}")
            prev = (image_id, lineno)


def _jsonl_records(spec: Spec, path: Path, root: Path, seen: SortedPairs, report: SeedReport) -> Iterator[dict]:
    max_pixels = spec.ire.vlm.max_image_pixels
    inside = _Inside(root)
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
            seen.add((image_id, lineno))
            kitti = rec.get("kitti_bboxes") or []
            if not isinstance(kitti, list) or not all(_valid_row(b) for b in kitti):
                raise ConfigError(f"{path}:{lineno}: kitti_bboxes must be a list of [x1, y1, x2, y2, type] "
                                  "with numeric coordinates and a string type")
            width, height = rec.get("width") or 0, rec.get("height") or 0
            if (width or height) and not (_positive_int(width) and _positive_int(height)):
                raise ConfigError(f"{path}:{lineno}: width and height must be positive integers "
                                  f"(got {width!r} x {height!r}); leave them out to read them from the image")
            image_path = inside(str(rec["image_path"]))
            if image_path is None:
                message = (f"{path}:{lineno}: image {rec['image_path']} is outside the allowed root {root} "
                           "(data.image_dir, or the jsonl file's directory when image_dir is unset); not seeded")
                report.outside_root += 1
                report.failures.append((image_id, str(rec["image_path"]), message))
                report.note(message)
                continue
            rec["image_path"] = image_path
            if not width:
                try:
                    width, height = read_size(rec["image_path"], max_pixels=max_pixels)
                except InputError as exc:
                    report.unreadable_images += 1
                    report.failures.append((image_id, str(rec["image_path"]), str(exc)))
                    report.note(f"{path}:{lineno}: {exc}")
                    continue
            kitti = _cap(kitti, spec.ire.data.max_boxes_per_image, f"{path}:{lineno}", report)
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
    """Stream the seed records to ``results_dir/seed_annotations.jsonl``.

    The records go to a temp file that replaces the seed in one ``rename`` once complete, so
    readers (workers reading their image's line) see the old seed or the new one, never a part.
    The producer calls this only while it holds the results dir (``producer.guard``), after the
    inputs were checked against the ones the dir is bound to. ``report.sha256`` is the digest.

    Each line carries the image's ``ordinal`` (``SEED_ORDINAL``). A first seeding numbers the lines
    0, 1, 2, ... as it writes them. A re-seed (a seed file is there already) carries each kept
    image's ordinal over and gives images new to the seed ordinals above every ordinal any
    seed of the dir gave (a removed image's is never reused, its done bits may still be set):
    ``_carry_ordinals``, in bounded memory. The highest ordinal given is kept beside the seed
    (``ORDINAL_TOP_FILE``), since the image that had it may have left the seed since.
    ``on_record`` is called as each record is written; on a re-seed the offset it is given is
    the line's before its ordinal is joined in (a progress count, not the final address).
    """
    results_dir.mkdir(parents=True, exist_ok=True)
    final = results_dir / SEED_FILE
    tmp = results_dir / f".{SEED_FILE}.{os.getpid()}.tmp"
    source = seed_from_jsonl if spec.ire.data.input_annotations_jsonl else seed_from_images
    offset = 0
    digest = hashlib.sha256()
    reseed = _has_ordinals(final)
    given = _ordinal_top(results_dir)
    base = given + 1 if not reseed and given is not None else 0  # a seed gone, its bits maybe not
    report.renumbered = base > 0
    ids: SortedPairs | None = SortedPairs() if reseed else None
    n = -1
    try:
        with open(tmp, "wb") as f:
            for n, rec in enumerate(source(spec, report)):
                if ids is None:
                    rec[SEED_ORDINAL] = base + n
                else:  # numbered once the old seed's ordinals are joined in (_carry_ordinals)
                    rec.pop(SEED_ORDINAL, None)
                    ids.add((str(rec["image_id"]), n))
                line = (dumps(rec) + "\n").encode("utf-8")
                f.write(line)
                digest.update(line)
                if on_record is not None:
                    on_record(SeedEntry(rec["image_id"], offset))
                offset += len(line)
        if ids is not None:
            digest, top = _carry_ordinals(final, tmp, ids, given)
        else:
            top = base + n
        if top >= 0 and top != given:  # before the seed that uses it: a crash between leaves a gap only
            _write_ordinal_top(results_dir, top)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed seed leaves the old one, and no half file
        raise
    finally:
        if ids is not None:
            ids.close()
    os.replace(tmp, final)
    report.sha256 = digest.hexdigest()
    return final


def _has_ordinals(seed: Path) -> bool:
    """Whether ``seed`` exists and numbers its images (a seed written before ordinals did not:
    no done bit was ever set by its lines, so a re-seed may number afresh). Its first readable
    line says (``iter_seed`` skips a torn one)."""
    if not seed.exists():
        return False
    first = next(iter_seed(seed), None)
    return first is not None and seed_ordinal(first[1]) is not None


#: Beside the seed: the highest ordinal a seed of this results dir has given.
ORDINAL_TOP_FILE = ".seed_ordinal_top"


def _ordinal_top(results_dir: Path) -> int | None:
    """The highest ordinal given in this results dir (None: no record of one)."""
    try:
        return int((results_dir / ORDINAL_TOP_FILE).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _write_ordinal_top(results_dir: Path, top: int) -> None:
    write_atomic(results_dir / ORDINAL_TOP_FILE, f"{top}\n")  # a full disk leaves no temp file


def _carry_ordinals(old_seed: Path, new_seed: Path, ids: SortedPairs, given: int | None = None):
    """Number the lines of ``new_seed`` (written without ordinals; ``ids`` holds its
    ``(image_id, line number)``) with the ordinals ``old_seed`` gave the same images, and
    numbers above the old maximum (and ``given``, the highest any seed gave) for the others, in
    the new images' id order. Three streamed passes (the old seed's ids sorted, the join, the
    rewrite by line number), so memory is a sort chunk whatever the seed's size. Returns the
    new file's sha256 and the highest ordinal given now."""
    top = -1 if given is None else given
    with SortedPairs() as old:
        for _, rec in iter_seed(old_seed):
            o = seed_ordinal(rec)
            if o is not None:
                old.add((str(rec["image_id"]), o))
                top = max(top, o)
        kept = Cursor(old)
        with SortedPairs() as by_line:
            for image_id, line in ids:
                have = kept.take(image_id)
                if have:
                    o = have[-1]
                else:
                    top += 1
                    o = top
                by_line.add((f"{line:012d}", o))
            digest = hashlib.sha256()
            out = new_seed.with_name(new_seed.name + ".n")
            try:
                with open(new_seed, "rb") as src, open(out, "wb") as dst:
                    for (_, o), line in zip(by_line, src, strict=True):
                        numbered = line.rstrip(b"\n")[:-1] + f',"{SEED_ORDINAL}":{o}}}\n'.encode()
                        dst.write(numbered)
                        digest.update(numbered)
                os.replace(out, new_seed)
            except BaseException:
                out.unlink(missing_ok=True)
                raise
    return digest, top


def iter_seed(seed: JsonlSink | Path) -> Iterator[tuple[int, dict]]:
    """``(offset, record)`` for every record of a seed file, read as every sink is read
    (``JsonlSink.scan``: a blank, torn or foreign line is skipped, not a crash)."""
    sink = seed if isinstance(seed, JsonlSink) else JsonlSink(seed)
    yield from sink.scan()
