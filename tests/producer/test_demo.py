"""The synthetic dataset: files, KITTI labels that parse and fit the image, fixed cases, determinism."""

from __future__ import annotations

from dataclasses import replace

import pytest
from PIL import Image, ImageChops, ImageStat

from producer.demo import (
    CX,
    DONTCARE_INDEX,
    DUSK_INDEX,
    FOCAL,
    HEIGHT,
    MISSING_LABEL_INDEX,
    NO_OBJECTS_INDEX,
    WIDTH,
    make_demo_dataset,
    plan_scene,
    render_scene,
)
from worker.images import read_size
from worker.kitti import parse_kitti

N = 8
TYPES = {"Car", "Van", "Truck", "Pedestrian", "Cyclist"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_images=N, seed=0)


def _stems(directory, suffixes):
    return sorted(p.stem for p in directory.iterdir() if p.suffix in suffixes)


def test_writes_images_and_labels(demo):
    images, labels = demo
    assert images.name == "images" and labels.name == "labels"
    assert _stems(images, {".png", ".jpg"}) == [f"demo_{i:06d}" for i in range(N)]
    assert _stems(labels, {".txt"}) == [f"demo_{i:06d}" for i in range(N) if i != MISSING_LABEL_INDEX]
    assert (images / f"demo_{MISSING_LABEL_INDEX:06d}.jpg").is_file()   # some images are JPEGs
    assert (images / "demo_000000.png").is_file()
    for path in images.iterdir():
        assert read_size(path) == (WIDTH, HEIGHT) == (1242, 375)


def test_labels_parse_and_fit_the_image(demo):
    _, labels = demo
    kinds = set()
    for label in sorted(labels.iterdir()):
        text = label.read_text(encoding="utf-8")
        parsed = parse_kitti(text, width=WIDTH, height=HEIGHT)
        assert parsed.skipped == []
        lines = text.splitlines()
        assert len(parsed.boxes) + parsed.ignored == len(lines)
        for line in lines:
            fields = line.split()
            assert len(fields) == 15, line
            x1, y1, x2, y2 = (float(v) for v in fields[4:8])
            assert 0 <= x1 < x2 <= WIDTH and 0 <= y1 < y2 <= HEIGHT, line
            if fields[0] == "DontCare":
                continue
            kinds.add(fields[0])
            truncated, occluded = float(fields[1]), int(fields[2])
            assert 0.0 <= truncated <= 0.5 and occluded in (0, 1, 2)
            # the 3D location projects into its 2D box, as in KITTI
            x, y, z = (float(v) for v in fields[11:14])
            assert y == 1.65 and z > 0
            if truncated == 0:
                u = CX + FOCAL * x / z
                assert x1 - 2 <= u <= x2 + 2, line
    assert kinds == TYPES


def test_fixed_cases(demo):
    _, labels = demo
    assert not (labels / f"demo_{MISSING_LABEL_INDEX:06d}.txt").exists()
    assert (labels / f"demo_{NO_OBJECTS_INDEX:06d}.txt").read_text() == ""
    dontcare = (labels / f"demo_{DONTCARE_INDEX:06d}.txt").read_text()
    assert sum(line.startswith("DontCare ") for line in dontcare.splitlines()) == 1
    parsed = parse_kitti(dontcare, width=WIDTH, height=HEIGHT)
    assert parsed.ignored == 1 and parsed.boxes
    for i in range(N):
        if i not in (NO_OBJECTS_INDEX, MISSING_LABEL_INDEX):
            assert (labels / f"demo_{i:06d}.txt").read_text().strip(), f"demo_{i:06d} has no objects"


def test_objects_are_drawn_where_the_labels_say():
    plan = plan_scene(0, seed=0)
    with_objects = render_scene(plan)
    without = render_scene(replace(plan, objects=[], crowd=[]))
    visible = [o for o in plan.objects if o.occluded == 0]
    assert visible
    for o in visible:
        box = tuple(round(v) for v in o.bbox)
        diff = ImageStat.Stat(ImageChops.difference(with_objects.crop(box), without.crop(box)).convert("L"))
        assert diff.mean[0] > 8, (o.kind, box)
    outside = (0, 0, 120, 60)  # top-left sky/facade corner, never an object
    assert ImageChops.difference(with_objects.crop(outside), without.crop(outside)).getbbox() is None


def test_same_seed_same_bytes(tmp_path):
    a_images, a_labels = make_demo_dataset(tmp_path / "a", n_images=5, seed=3)
    b_images, b_labels = make_demo_dataset(tmp_path / "b", n_images=5, seed=3)
    for a in sorted([*a_images.iterdir(), *a_labels.iterdir()]):
        b = (b_images if a.parent == a_images else b_labels) / a.name
        assert a.read_bytes() == b.read_bytes(), a.name
    c_images, c_labels = make_demo_dataset(tmp_path / "c", n_images=5, seed=4)
    assert (c_labels / "demo_000000.txt").read_text() != (a_labels / "demo_000000.txt").read_text()
    assert (c_images / "demo_000000.png").read_bytes() != (a_images / "demo_000000.png").read_bytes()


def test_rerun_over_an_old_dataset_keeps_the_cases(tmp_path):
    images, labels = make_demo_dataset(tmp_path, n_images=4, seed=1)
    (labels / f"demo_{MISSING_LABEL_INDEX:06d}.txt").write_text("Car 0 0 0 1 1 5 5 0 0 0 0 0 0 0\n")
    make_demo_dataset(tmp_path, n_images=4, seed=2)
    assert not (labels / f"demo_{MISSING_LABEL_INDEX:06d}.txt").exists()
    assert len(list(images.iterdir())) == 4


def test_a_dusk_scene_is_darker():
    day = ImageStat.Stat(render_scene(plan_scene(0, seed=0)).convert("L")).mean[0]
    dusk = ImageStat.Stat(render_scene(plan_scene(DUSK_INDEX, seed=0)).convert("L")).mean[0]
    assert dusk < 0.7 * day


def test_rejects_a_negative_count(tmp_path):
    with pytest.raises(ValueError, match="n_images"):
        make_demo_dataset(tmp_path, n_images=-1)


def test_images_open_as_rgb(demo):
    images, _ = demo
    for path in images.iterdir():
        with Image.open(path) as im:
            assert im.mode == "RGB"
