"""A corpus of bad input, generated into a directory: broken images, messy KITTI labels, an
``input_annotations_jsonl`` with bad paths, and VLM answers that are huge, deeply nested or not
UTF-8 (served by ``vlm_answer`` through ``FakeVLM.answer_fn``).

Every case says what the pipeline must make of it: a seed failure (``SEED_FAILS``), a per-image
failure at a step (``WORKER_FAILS``), or an image that is handled and finishes (``DONE``). The
expected seed counts are in ``EXPECTED_SEED``.
"""

from __future__ import annotations

import io
import json
import random
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from tests.support.fake_vlm import default_answer

W, H = 64, 48
# One KITTI line: type, truncated, occluded, alpha, left top right bottom, dims, location, ry.
TAIL = "1.50 1.60 3.90 1.00 1.50 20.00 0.00"


def kitti(kind: str, box: str, sep: str = " ") -> str:
    return sep.join([kind, "0.00", "0", "0.00", *box.split(), *TAIL.split()])


GOOD_LABEL = kitti("Car", "5 5 30 30") + "\n"

# labels_messy: one good line, one partially outside (clipped, kept), five skipped, one ignored.
MESSY_LABEL = "\n".join([
    kitti("Car", "5.0 5.0 30.0 30.0"),
    kitti("Car", "nan 5.0 30.0 30.0"),           # NaN
    kitti("Van", "40 40 10 10"),                  # inverted
    kitti("Truck", "100 100 200 200"),            # entirely outside the 64x48 image
    kitti("Pedestrian", "50 30 90 60"),           # partly outside: clipped to 50 30 64 48
    kitti("Cyclist", "abc 5 30 30"),              # non-numeric
    "Car 0.00 0",                                 # too few fields
    kitti("DontCare", "1 1 5 5"),                 # ignored by type
]) + "\n"
MESSY_SKIPPED = 5

# Seed records the pipeline must refuse, with a word their message must hold.
SEED_FAILS = {
    "zero_byte": "zero_byte.jpg",
    "text_as_jpg": "text_as_jpg.jpg",
    "huge_header": "20000x20000",
}
# Images that seed but cannot be decoded: steps 0 and 1 fail naming the file, 2 and 3 are blocked.
WORKER_FAILS = {"trunc_png": "trunc_png.png", "trunc_jpg": "trunc_jpg.jpg"}
# Images whose *answers* are bad (see vlm_answer).
VLM_CASES = ("vlm_huge", "vlm_nested", "vlm_badutf8")
HUGE_ANSWER_CHARS = 3_000_000
NESTING = 50_000  # far past the recursion limits of json (~1000) and ast (200)
DONE = ("ok_plain", "cmyk", "png16", "palette", "exif_rotated", "labels_messy", "labels_crlf_tabs",
        "labels_latin1", "empty_label", "no_label")

EXPECTED_SEED = {
    "images": len(DONE) + len(WORKER_FAILS) + len(VLM_CASES),
    # ok_plain, cmyk, png16, palette, exif_rotated, trunc x2, vlm x3 (1 each); messy 2, crlf 2, latin1 1
    "boxes": 10 + 2 + 2 + 1,
    "ignored": 1,
    "skipped": MESSY_SKIPPED,
    "missing": 1,  # no_label
    "unreadable": len(SEED_FAILS),
    "orphans": 1,  # labels/no_such_image.txt
}


@dataclass
class Corpus:
    root: Path
    image_dir: Path
    label_dir: Path
    # bytes of the image file (as the worker sends it) -> the bad-answer case it triggers
    answer_cases: dict[bytes, str] = field(default_factory=dict)

    def vlm_answer(self, prompt: str, image: bytes | None, protocol: str) -> str:
        """``FakeVLM.answer_fn``: the normal answer, except for the VLM_CASES images."""
        normal = default_answer(prompt, image, protocol)
        case = self.answer_cases.get(image or b"")
        if case == "vlm_huge":
            # The real answer first, then megabytes of rambling.
            return normal + "\n" + ("and so on " * (HUGE_ANSWER_CHARS // 10))
        if case == "vlm_nested":
            return "[" * NESTING + "]" * NESTING
        if case == "vlm_badutf8":
            # Bytes that are not UTF-8, as Python sees them after a lenient decode: lone surrogates.
            return normal.replace("e", "\udce9", 3) + " caf\udce9 \udcff\udcfe"
        return normal


def _noise(seed: int, mode: str = "RGB") -> Image.Image:
    rng = random.Random(seed)
    im = Image.new("RGB", (W, H))
    im.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(W * H)])
    return im.convert(mode) if mode != "RGB" else im


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int) -> bytes:
    """A well-formed PNG signature and IHDR declaring ``width x height``, with a token IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


def _encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def make_corpus(root: Path) -> Corpus:
    root = Path(root)
    image_dir, label_dir = root / "images", root / "labels"
    image_dir.mkdir(parents=True)
    label_dir.mkdir(parents=True)
    c = Corpus(root, image_dir, label_dir)

    def image(name: str, data: bytes, label: str | bytes | None = GOOD_LABEL) -> None:
        (image_dir / name).write_bytes(data)
        stem = name.rsplit(".", 1)[0]
        if label is not None:
            (label_dir / f"{stem}.txt").write_bytes(label.encode() if isinstance(label, str) else label)

    # Images that cannot be seeded.
    image("zero_byte.jpg", b"")
    image("text_as_jpg.jpg", b"this is a text file, not a JPEG\n")
    image("huge_header.png", png_header_only(20000, 20000))
    # Images whose header reads but whose pixels are cut off.
    full_png = _encoded(_noise(1), "PNG")
    image("trunc_png.png", full_png[: len(full_png) * 6 // 10])
    full_jpg = _encoded(_noise(2), "JPEG", quality=95)
    image("trunc_jpg.jpg", full_jpg[: len(full_jpg) * 6 // 10])
    # Odd but valid images: re-encoded or sent as they are.
    image("ok_plain.jpg", _encoded(_noise(3), "JPEG", quality=90))
    image("cmyk.jpg", _encoded(_noise(4, "CMYK"), "JPEG", quality=90))
    im16 = Image.new("I;16", (W, H))
    im16.putdata([(x * 1000 + y * 300) % 65536 for y in range(H) for x in range(W)])
    image("png16.png", _encoded(im16, "PNG"))
    image("palette.png", _encoded(_noise(5).convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG"))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    image("exif_rotated.jpg", _encoded(_noise(6), "JPEG", quality=90, exif=exif.tobytes()))
    # Messy labels on good images.
    image("labels_messy.png", _encoded(_noise(7), "PNG"), MESSY_LABEL)
    crlf_tabs = "\r\n".join([kitti("Car", "5 5 30 30", "\t"), kitti("Van", "35 10 60 40", "\t")]) + "\r\n"
    image("labels_crlf_tabs.png", _encoded(_noise(8), "PNG"), crlf_tabs)
    image("labels_latin1.png", _encoded(_noise(9), "PNG"), kitti("Café", "5 5 30 30").encode("latin-1") + b"\n")
    image("empty_label.png", _encoded(_noise(10), "PNG"), b"")
    image("no_label.png", _encoded(_noise(11), "PNG"), None)
    (label_dir / "no_such_image.txt").write_text(GOOD_LABEL)  # a label without its image
    # Good images whose answers are bad.
    for seed, stem in enumerate(VLM_CASES, start=20):
        data = _encoded(_noise(seed), "PNG")
        image(f"{stem}.png", data)
        c.answer_cases[data] = stem
    return c


def make_jsonl_corpus(root: Path, good_image: Path) -> tuple[Path, dict[str, str]]:
    """An ``input_annotations_jsonl`` (in ``root``) with a good record, a missing image, an image
    outside the allowed roots, and a relative path; returns the file and, per image_id, what
    its seed outcome must mention ("" = seeds fine)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    images = root / "images"
    images.mkdir()
    inside = images / "inside.png"
    inside.write_bytes(good_image.read_bytes())
    outside_dir = root.parent / f"{root.name}-elsewhere"
    outside_dir.mkdir()
    outside = outside_dir / "outside.png"
    outside.write_bytes(good_image.read_bytes())
    box = [5, 5, 30, 30, "Car"]
    records = [
        {"image_id": "inside", "image_path": str(inside), "kitti_bboxes": [box]},
        {"image_id": "relative", "image_path": "images/inside.png", "kitti_bboxes": [box]},
        {"image_id": "missing", "image_path": str(images / "missing.png"), "kitti_bboxes": [box]},
        {"image_id": "missing_sized", "image_path": str(images / "missing_sized.png"), "width": W, "height": H,
         "kitti_bboxes": [box]},
        {"image_id": "outside", "image_path": str(outside), "kitti_bboxes": [box]},
        {"image_id": "dotdot", "image_path": str(images / ".." / ".." / outside_dir.name / "outside.png"),
         "kitti_bboxes": [box]},
    ]
    path = root / "input.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    expect = {"inside": "", "relative": "", "missing": "missing.png", "missing_sized": "missing_sized.png",
              "outside": "outside.png", "dotdot": "outside.png"}
    return path, expect
