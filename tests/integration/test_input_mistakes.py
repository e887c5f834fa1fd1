"""Inputs and answers that are wrong in ordinary ways (issue 13: items 7, 8, 9, 9b, 10, 19),
through the real ``producer`` entry point, the real SDK client and the fake endpoint.

Each test builds what a user really has on disk (a symlink loop, a .bmp, a camera subfolder, a
label saved with a BOM, a label path that is a directory, a 100k-box label, a file name with a
newline, an image replaced after seeding) or an endpoint that answers like a misconfigured or
sloppy one (HTML from a proxy, another step's JSON, a 5 MB caption, a step-0 answer cut off
with a clean stop), and checks what the user gets: the message, the counts, the records.
"""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from tests.support.fake_vlm import default_answer
from tests.support.fleet import producer, wait_until
from worker.sinks import JsonlSink

pytestmark = pytest.mark.integration

W, H = 200, 100
KEY_VARS = ("GOOGLE_API_KEY", "GEMINI_API_KEY", "OPENAI_API_KEY", "NVIDIA_API_KEY", "REDIS_URL",
            "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND")
CAPTION_PROMPT = "You are an AI visual assistant that specializes"
STEP0_TEXT_PROMPT = "Objects in the image at [x1, y1, x2, y2]:"


def kitti(kind: str, x1: float, y1: float, x2: float, y2: float) -> str:
    return f"{kind} 0.00 0 0.00 {x1:.2f} {y1:.2f} {x2:.2f} {y2:.2f} 1.50 1.60 3.90 1.00 1.50 20.00 0.00\n"


THREE_CARS = kitti("Car", 5, 10, 55, 60) + kitti("Car", 75, 20, 125, 70) + kitti("Car", 145, 30, 195, 90)


def scene(path: Path, seed: int, size: tuple[int, int] = (W, H), fmt: str | None = None) -> bytes:
    """A gray road with three colored cars; ``seed`` makes each image's bytes unique."""
    rng = random.Random(seed)
    im = Image.new("RGB", size, (110 + seed % 20, 110, 110))
    draw = ImageDraw.Draw(im)
    for box in ((5, 10, 55, 60), (75, 20, 125, 70), (145, 30, 195, 90)):
        draw.rectangle(box, fill=(rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    im.save(path, format=fmt)
    return path.read_bytes()


def openai_args(fake, image_dir: Path, label_dir: Path, results: Path, *extra: str) -> list[str]:
    return ["image_referring_expression.vlm.backend=openai",
            f"image_referring_expression.vlm.openai.base_url={fake.openai_base_url}",
            "image_referring_expression.vlm.openai.model_name=fake-vl",
            "image_referring_expression.vlm.openai.timeout=20",
            "image_referring_expression.vlm.max_retries=2", *extra,
            "--image-dir", str(image_dir), "--label-dir", str(label_dir), "--results-dir", str(results)]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def by_id(path: Path) -> dict[str, dict]:
    return {r["image_id"]: r for r in read_jsonl(path)}


@pytest.fixture
def local_env() -> dict[str, str]:
    """``producer run`` needs no server and no key (the fake endpoint takes none)."""
    env = {k: v for k, v in os.environ.items() if k not in KEY_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(env: dict[str, str], *args: str):
    """The producer as a user runs it. Runs with failed images may exit non-zero (the exit-code
    policy is not this file's subject); a crash never may."""
    proc = producer(env, *args, check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


# --------------------------------------------------------------------------- items 7, 8, 9b


def test_image_dir_and_label_mistakes_are_named_and_the_rest_runs(local_env, fake_vlm, tmp_path):
    images, labels, results = tmp_path / "images", tmp_path / "labels", tmp_path / "results"
    images.mkdir()
    labels.mkdir()
    scene(images / "ok.png", 1)
    # item 8 / 9b: saved by a Windows editor (BOM), DontCare in other cases
    (labels / "ok.txt").write_bytes("\ufeff".encode() + (kitti("dontcare", 1, 1, 4, 4) + kitti("Car", 5, 10, 55, 60)
                                                        + kitti("DONTCARE", 2, 2, 6, 6)).encode())
    webp = scene(images / "w.webp", 2, fmt="WEBP")
    (labels / "w.txt").write_text(THREE_CARS)
    scene(images / "b.bmp", 3, fmt="BMP")
    (labels / "b.txt").write_text(THREE_CARS)
    (images / "loop.jpg").symlink_to(images / "loop.jpg")
    (images / "gone.png").symlink_to(tmp_path / "elsewhere.png")
    (images / "image_02").mkdir()
    scene(images / "image_02" / "000001.png", 4)
    scene(images / "new\nline.png", 5)
    (labels / "new\nline.txt").write_text(THREE_CARS)
    scene(images / "labdir.png", 6)
    (labels / "labdir.txt").mkdir()
    scene(images / "many.png", 7)
    rng = random.Random(0)
    rows = []
    for _ in range(100_000):
        x, y = rng.uniform(0, W - 10), rng.uniform(0, H - 10)
        rows.append(kitti("Car", x, y, x + rng.uniform(1, 10), y + rng.uniform(1, 10)))
    (labels / "many.txt").write_text("".join(rows))

    run = run_cli(local_env, "run", *openai_args(fake_vlm, images, labels, results))
    err = run.stderr
    assert ("seeded 4 images, 207 boxes (2 ignored by type, 0 label lines skipped, 0 label files missing, "
            "2 images unreadable, 0 label files without an image, 1 label files unreadable (images not seeded), "
            "1 image files of an unsupported type skipped, 1 subfolders of data.image_dir not searched, "
            "99800 boxes over data.max_boxes_per_image dropped)") in err
    root_i, root_l = images.resolve(), labels.resolve()
    for line in (
        f"{root_i}: 1 BMP file skipped (b.bmp): BMP is not sent to the VLM APIs; convert to PNG, JPEG or WebP",
        f"{root_i / 'image_02'}/: a subfolder (1 image file), not searched: only files directly in "
        "data.image_dir are seeded",
        f"{root_i / 'loop.jpg'}: a symbolic link that leads nowhere (Too many levels of symbolic links); not seeded",
        f"{root_i / 'gone.png'}: a symbolic link that leads nowhere (No such file or directory); not seeded",
        f"{root_l / 'b.txt'}: ignored, since its image was skipped (b.bmp: BMP is not a supported image type)",
        f"{root_l / 'labdir.txt'}: the label path is a directory, not a file; labdir.png is not seeded",
        f"{root_l / 'many.txt'}: 100000 boxes, more than data.max_boxes_per_image = 200; kept the 200 largest, "
        "dropped 99800",
    ):
        assert f"  warning: {line}" in err, (line, err)
    assert "label file with no image" not in err

    fails = {(f["image_id"], f["step"]): f for f in read_jsonl(results / "failures.jsonl")}
    assert sorted(fails) == [("gone", "seed"), ("labdir", "seed"), ("loop", "seed")], fails
    assert "the label path is a directory" in fails[("labdir", "seed")]["message"]

    final = by_id(results / "annotations.jsonl")
    assert sorted(final) == ["many", "new\nline", "ok", "w"]
    assert final["ok"]["kitti_bboxes"] == [[5.0, 10.0, 55.0, 60.0, "Car"]]  # no dontcare, no \ufeff
    assert len(final["many"]["kitti_bboxes"]) == 200 and len(final["many"]["regions"]) == 200
    assert len(final["w"]["regions"]) == 3 and final["w"]["image_path"].endswith("w.webp")
    assert all(r["caption"] and r["expressions"] for r in final.values())
    sent = {(r.image_mime, r.image == webp) for r in fake_vlm.requests}
    assert ("image/webp", True) in sent

    # 9b: a file name with a newline no longer takes the whole gallery down
    shown = run_cli(local_env, "preview", "--results-dir", str(results), "--sample", "0")
    assert shown.returncode == 0 and "wrote 12 panels for 4 of 4 images" in shown.stdout, shown.stderr
    assert (results / "preview" / "images" / "new\nline_step0.png").is_file()


# --------------------------------------------------------------------------- items 10 and 19


class Sloppy:
    """``FakeVLM.answer_fn``: the literal answer, except where an image is set up to get a 5 MB
    caption, another step's JSON for its first caption, or a step-0 answer cut mid-object."""

    def __init__(self):
        self.case: dict[bytes, str] = {}
        self.seen: dict[tuple[str, str], int] = {}

    def __call__(self, prompt: str, image: bytes | None, protocol: str) -> str:
        normal = default_answer(prompt, image, protocol)
        case = self.case.get(image or b"", "")
        kind = "caption" if prompt.startswith(CAPTION_PROMPT) else "step0" if STEP0_TEXT_PROMPT in prompt else ""
        n = self.seen[(case, kind)] = self.seen.get((case, kind), 0) + 1
        if case == "huge" and kind == "caption":
            return " ".join(f"Detail {i}: a thing of size {i * 7919 % 10007} at spot {i * 31 % 977}."
                            for i in range(90_000))  # ~5 MB that never repeats itself
        if case == "json" and kind == "caption" and n == 1:
            return json.dumps({"regions": [{"bbox_2d": [25, 100, 275, 600], "type": "Car", "color": "red",
                                            "description": "red car on the left"}]})
        if case == "cut" and kind == "step0" and n == 1:
            return normal[: normal.index('"description"', normal.index('"bbox_2d"', normal.index("bbox_2d") + 1))]
        return normal


def test_answers_too_long_of_the_wrong_shape_or_cut_off(local_env, fake_vlm, tmp_path):
    images, labels, results = tmp_path / "images", tmp_path / "labels", tmp_path / "results"
    images.mkdir()
    labels.mkdir()
    sloppy = Sloppy()
    for seed, name in enumerate(("huge", "json", "cut", "plain")):
        sloppy.case[scene(images / f"{name}.png", seed)] = name
        (labels / f"{name}.txt").write_text(THREE_CARS)
    fake_vlm.answer_fn = sloppy

    run = run_cli(local_env, "run", *openai_args(fake_vlm, images, labels, results,
                                                 "image_referring_expression.vlm.structured_output='off'"))
    assert read_jsonl(results / "failures.jsonl") == [], run.stderr
    assert (results / "annotations.jsonl").exists(), run.stdout + run.stderr
    final = by_id(results / "annotations.jsonl")
    assert sorted(final) == ["cut", "huge", "json", "plain"]
    caps = JsonlSink(results / "step_1_image_caption" / "annotations.jsonl").latest()  # main file and parts

    # 10: a 5 MB caption is cut to a few KB, at a sentence, and the cut is counted
    assert 3_000 < len(final["huge"]["caption"]) <= 6_000 and final["huge"]["caption"].endswith(".")
    assert caps["huge"]["meta"]["step1_image_caption"]["quality"]["answers_cut"] == 1
    assert (results / "annotations.jsonl").stat().st_size < 100_000
    # 10: another step's JSON is not a caption: asked again, and the prose answer kept
    assert sloppy.seen[("json", "caption")] == 2
    assert final["json"]["caption"].startswith("A road scene") and "regions" not in final["json"]["caption"]
    # 19: text mode, a step-0 answer cut mid-object with finish "stop": the skipped boxes re-asked
    q0 = JsonlSink(results / "step_0_region_expr" / "annotations.jsonl").latest()["cut"]["meta"]["step0_region_expr"]
    assert sloppy.seen[("cut", "step0")] == 2
    assert [r["kitti_index"] for r in final["cut"]["regions"]] == [0, 1, 2]
    assert q0["missed_kitti"] == [] and q0["quality"]["reasks"] == 1 and q0["quality"]["mode"] == "text"
    assert final["plain"]["caption"] and len(final["plain"]["regions"]) == 3


def test_an_html_page_instead_of_the_api_is_said_to_be_one(local_env, fake_vlm, tmp_path):
    images, labels, results = tmp_path / "images", tmp_path / "labels", tmp_path / "results"
    images.mkdir()
    labels.mkdir()
    scene(images / "a.png", 1)
    (labels / "a.txt").write_text(THREE_CARS)
    fake_vlm.raw_next(2, "<!doctype html><html><head><title>Sign in</title></head><body>proxy</body></html>")

    run = run_cli(local_env, "run", *openai_args(fake_vlm, images, labels, results))
    fails = {f["step"]: f for f in read_jsonl(results / "failures.jsonl")}
    assert sorted(fails) == [0, 1], run.stderr
    for f in fails.values():
        assert f["error"] == "PermanentClientError" and f["attempts"] == 1
        assert (f"{fake_vlm.openai_base_url} answered HTTP 200 with an HTML page ('Sign in'), not a chat "
                "completion: a proxy or login page answered, or the base_url is wrong") in f["message"]
    assert fake_vlm.calls == 2, "an HTML page is not worth a retry"


# --------------------------------------------------------------------------- item 9


def test_an_image_replaced_after_seeding_fails_with_the_reason(fleet, fleet_env, fake_vlm, tmp_path):
    images, labels, results = tmp_path / "images", tmp_path / "labels", tmp_path / "results"
    images.mkdir()
    labels.mkdir()
    scene(images / "a.png", 1)
    scene(images / "b.png", 2)
    for stem in ("a", "b"):
        (labels / f"{stem}.txt").write_text(THREE_CARS)
    producer(fleet_env, "enqueue", *openai_args(fake_vlm, images, labels, results))  # no worker yet
    scene(images / "b.png", 3, size=(2 * W, 2 * H))  # the user re-exports b at another size
    fleet.start(1, concurrency=4)
    wait_until(lambda: len(read_jsonl(results / "failures.jsonl")) >= 2, 60, "b's steps 0 and 1 to fail")
    run_cli(fleet_env, "wait", "--results-dir", str(results), "--timeout", "60")

    fails = {(f["image_id"], f["step"]): f for f in read_jsonl(results / "failures.jsonl")}
    assert sorted(fails) == [("b", 0), ("b", 1)]
    for f in fails.values():
        assert f["error"] == "InputError" and f["attempts"] == 1
        assert f["message"].startswith(f"{images.resolve() / 'b.png'}: the image is 400x200 now but was 200x100 "
                                       "when seeded (replaced since?): its boxes are for the old size.")
    assert not any(r.image and Image.open(io.BytesIO(r.image)).size == (2 * W, 2 * H)
                   for r in fake_vlm.requests), "no call was made with the new image and the old boxes"
    assert sorted(by_id(results / "annotations.jsonl")) == ["a"]
