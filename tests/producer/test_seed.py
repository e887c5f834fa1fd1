"""Seeding: image listing, KITTI labels, the JSONL resume path, and the streamed seed file."""

from __future__ import annotations

import hashlib
import json
import tempfile

import pytest
from PIL import Image

from producer.seed import (
    ORDINAL_TOP_FILE,
    SeedEntry,
    SeedReport,
    iter_seed,
    list_images,
    scan_image_dir,
    seed_from_images,
    write_seed,
)
from worker.constants import SEED_FILE, SEED_ORDINAL
from worker.errors import ConfigError
from worker.spec import load_spec
from worker.steps.records import SOURCE


def kitti_line(kind, x1, y1, x2, y2):
    return f"{kind} 0.00 0 0.00 {x1:.2f} {y1:.2f} {x2:.2f} {y2:.2f} 0.00 0.00 0.00 0.00 0.00 0.00 0.00\n"


def image(path, size=(64, 48), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (20, 40, 60)).save(path, format=fmt)
    return path


@pytest.fixture
def dirs(tmp_path):
    images, labels, results = tmp_path / "images", tmp_path / "labels", tmp_path / "results"
    images.mkdir()
    labels.mkdir()
    return images, labels, results


def spec_for(images, labels=None, **more):
    overrides = [f"image_referring_expression.data.image_dir={images}"]
    if labels is not None:
        overrides.append(f"image_referring_expression.data.kitti_label_dir={labels}")
    overrides += [f"{k}={v}" for k, v in more.items()]
    return load_spec(None, overrides)


def seed_all(spec):
    report = SeedReport()
    return list(seed_from_images(spec, report)), report


# --------------------------------------------------------------------------- listing


def test_list_images_sorted_any_case_other_files_ignored(dirs):
    images, _, _ = dirs
    for name in ("b.PNG", "a.jpg", "c.JPEG", "d.jpeg", "e.Jpg"):
        image(images / name, fmt="PNG")
    (images / "notes.txt").write_text("x")
    (images / "f.gif").write_bytes(b"GIF89a")
    (images / "g.bmp").write_bytes(b"BM")
    (images / "sub.jpg").mkdir()  # a directory with an image-like name
    (images / "nested").mkdir()
    image(images / "nested" / "z.jpg", fmt="PNG")  # not recursive
    assert list_images(images) == [("a", "a.jpg"), ("b", "b.PNG"), ("c", "c.JPEG"), ("d", "d.jpeg"), ("e", "e.Jpg")]


def test_list_images_empty_dir(dirs):
    assert list_images(dirs[0]) == []


def test_duplicate_stems_name_both_files(dirs):
    images, _, _ = dirs
    image(images / "a.jpg", fmt="JPEG")
    image(images / "a.png")
    image(images / "b.png")
    with pytest.raises(ConfigError) as exc:
        list_images(images)
    msg = str(exc.value)
    assert str(images / "a.jpg") in msg
    assert str(images / "a.png") in msg
    assert "'a'" in msg


def test_duplicate_stems_differing_in_extension_case(dirs):
    images, _, _ = dirs
    image(images / "x.PNG")
    image(images / "x.png")
    with pytest.raises(ConfigError) as exc:
        list_images(images)
    assert "x.PNG" in str(exc.value) and "x.png" in str(exc.value)


# --------------------------------------------------------------------------- seed records


def test_seed_record_schema_and_kitti_rows(dirs):
    images, labels, _ = dirs
    image(images / "000001.png", size=(1000, 500))
    (labels / "000001.txt").write_text(kitti_line("Car", 100, 200, 300, 400) + kitti_line("Pedestrian", 50, 60, 70, 90))
    records, report = seed_all(spec_for(images, labels))
    assert records == [{
        "image_id": "000001",
        "image_path": str((images / "000001.png").resolve()),
        "width": 1000,
        "height": 500,
        "kitti_bboxes": [[100.0, 200.0, 300.0, 400.0, "Car"], [50.0, 60.0, 70.0, 90.0, "Pedestrian"]],
        "source": SOURCE,
        "pipeline_steps": [],
    }]
    assert report.images == 1 and report.boxes == 2
    assert report.problems == [] and report.failures == []


def test_seed_records_in_sorted_order(dirs):
    images, labels, _ = dirs
    for stem in ("c", "a", "b"):
        image(images / f"{stem}.png")
        (labels / f"{stem}.txt").write_text(kitti_line("Car", 1, 2, 30, 40))
    records, _ = seed_all(spec_for(images, labels))
    assert [r["image_id"] for r in records] == ["a", "b", "c"]


def test_missing_label_gives_record_without_boxes_and_a_problem(dirs):
    images, labels, _ = dirs
    image(images / "a.png")
    image(images / "b.png")
    (labels / "a.txt").write_text(kitti_line("Car", 1, 2, 30, 40))
    records, report = seed_all(spec_for(images, labels))
    assert [(r["image_id"], len(r["kitti_bboxes"])) for r in records] == [("a", 1), ("b", 0)]
    assert report.missing_labels == 1
    assert any(str(labels.resolve() / "b.txt") in p for p in report.problems)
    assert report.failures == []


def test_no_label_dir_gives_no_boxes_and_no_problems(dirs):
    images, _, _ = dirs
    image(images / "a.png")
    records, report = seed_all(spec_for(images))
    assert records[0]["kitti_bboxes"] == []
    assert report.missing_labels == 0 and report.problems == []


def test_skipped_lines_reported_as_path_line(dirs):
    images, labels, _ = dirs
    image(images / "a.png", size=(100, 100))
    (labels / "a.txt").write_text(
        kitti_line("Car", 1, 2, 30, 40) + "Car 0.0 0\n" + kitti_line("DontCare", 0, 0, 5, 5)
        + "Van 0 0 0 nan 1 2 3 0 0 0 0 0 0 0\n" + kitti_line("Truck", 200, 200, 300, 300)
    )
    records, report = seed_all(spec_for(images, labels))
    assert records[0]["kitti_bboxes"] == [[1.0, 2.0, 30.0, 40.0, "Car"]]
    assert report.skipped_lines == 3
    assert report.ignored_boxes == 1
    label = labels.resolve() / "a.txt"
    for line in (2, 4, 5):
        assert any(p.startswith(f"{label}:{line}:") for p in report.problems), report.problems


def test_boxes_clipped_to_image_size_from_header(dirs):
    images, labels, _ = dirs
    image(images / "a.png", size=(64, 48))
    (labels / "a.txt").write_text(kitti_line("Car", -5, -5, 100, 100))
    records, _ = seed_all(spec_for(images, labels))
    assert records[0]["kitti_bboxes"] == [[0.0, 0.0, 64.0, 48.0, "Car"]]


def test_latin1_label_file(dirs):
    images, labels, _ = dirs
    image(images / "a.png")
    (labels / "a.txt").write_bytes("Caf\xe9 0 0 0 1 2 30 40 0 0 0 0 0 0 0\n".encode("latin-1"))
    records, _ = seed_all(spec_for(images, labels))
    assert records[0]["kitti_bboxes"] == [[1.0, 2.0, 30.0, 40.0, "Café"]]


def test_unreadable_image_is_a_seed_failure_not_a_crash(dirs):
    images, labels, _ = dirs
    image(images / "a.png")
    (images / "b.jpg").write_text("not really a jpeg")
    (images / "c.png").write_bytes(b"")
    image(images / "d.png")
    records, report = seed_all(spec_for(images, labels))
    assert [r["image_id"] for r in records] == ["a", "d"]
    assert report.unreadable_images == 2
    assert [f[0] for f in report.failures] == ["b", "c"]
    assert report.failures[0][1] == str((images / "b.jpg").resolve())
    assert str((images / "b.jpg").resolve()) in report.failures[0][2]
    assert report.images == 2


def test_image_over_pixel_limit_is_a_seed_failure(dirs):
    images, _, _ = dirs
    image(images / "a.png", size=(64, 48))
    records, report = seed_all(spec_for(images, **{"image_referring_expression.vlm.max_image_pixels": 100}))
    assert records == []
    assert report.failures and report.failures[0][0] == "a"


# --------------------------------------------------------------------------- write_seed / iter_seed


def test_write_seed_offsets_point_at_the_right_lines(dirs):
    images, labels, results = dirs
    for stem in ("b", "a", "c"):
        image(images / f"{stem}.png")
        (labels / f"{stem}.txt").write_text(kitti_line("Car", 1, 2, 30, 40))
    entries: list[SeedEntry] = []
    path = write_seed(spec_for(images, labels), results, SeedReport(), entries.append)
    assert path == results / SEED_FILE
    lines = list(iter_seed(path))
    assert [e.image_id for e in entries] == ["a", "b", "c"]
    assert [e.offset for e in entries] == [off for off, _ in lines]
    raw = path.read_bytes()
    for e in entries:
        line = raw[e.offset:].split(b"\n", 1)[0]
        assert json.loads(line)["image_id"] == e.image_id
    assert [r["image_id"] for _, r in lines] == ["a", "b", "c"]
    assert not any(p.name.endswith(".tmp") for p in results.iterdir())


def test_write_seed_replaces_an_old_file(dirs):
    images, _, results = dirs
    results.mkdir()
    (results / SEED_FILE).write_text('{"image_id": "old"}\n')
    image(images / "new.png")
    write_seed(spec_for(images), results, SeedReport())
    assert [r["image_id"] for _, r in iter_seed(results / SEED_FILE)] == ["new"]


# --------------------------------------------------------------------------- input_annotations_jsonl


def jsonl_spec(path):
    return load_spec(None, [f"image_referring_expression.data.input_annotations_jsonl={path}"])


def test_seed_from_input_jsonl(tmp_path):
    img = image(tmp_path / "x.png", size=(30, 20))
    src = tmp_path / "in.jsonl"
    src.write_text(
        json.dumps({"image_id": "x", "image_path": str(img), "kitti_bboxes": [[1, 2, 3, 4, "Car"]]}) + "\n\n"
        + json.dumps({"image_id": "y", "image_path": str(img), "width": 640, "height": 480,
                      "pipeline_steps": ["step0_region_expr"], "caption": "kept"}) + "\n"
    )
    results = tmp_path / "results"
    report = SeedReport()
    entries: list[SeedEntry] = []
    path = write_seed(jsonl_spec(src), results, report, entries.append)
    got = [r for _, r in iter_seed(path)]
    assert [r["image_id"] for r in got] == ["x", "y"]
    assert (got[0]["width"], got[0]["height"]) == (30, 20)  # read from the header when absent
    assert got[0]["kitti_bboxes"] == [[1, 2, 3, 4, "Car"]]
    assert got[0]["source"] == SOURCE
    assert got[0]["pipeline_steps"] == []
    assert (got[1]["width"], got[1]["height"]) == (640, 480)
    assert got[1]["caption"] == "kept"
    assert got[1]["kitti_bboxes"] == []
    assert [e.offset for e in entries] == [off for off, _ in iter_seed(path)]
    assert report.images == 2 and report.boxes == 1


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        pytest.param('{"image_id": "b", "image_path": ', "not a JSON object", id="cut-json"),
        pytest.param("[1, 2]", "expected a JSON object", id="not-an-object"),
        pytest.param('{"image_path": "/x.png"}', "image_id", id="no-image-id"),
        pytest.param('{"image_id": "a", "image_path": "/x.png", "width": 1, "height": 1}', "already seeded",
                     id="duplicate-id"),
        pytest.param('{"image_id": "b", "image_path": "/x.png", "width": 1, "height": 1, '
                     '"kitti_bboxes": [[1, 2, 3, 4]]}', "kitti_bboxes", id="kitti-row-short"),
        pytest.param('{"image_id": "b", "image_path": "/x.png", "width": 1, "height": 1, '
                     '"kitti_bboxes": [["x", 2, 3, 4, "Car"]]}', "kitti_bboxes", id="kitti-row-non-numeric"),
        pytest.param('{"image_id": "b", "image_path": "/x.png", "width": "wide", "height": 1}', "width",
                     id="width-not-a-number"),
        pytest.param('{"image_id": "b", "image_path": "/x.png", "width": -640, "height": 480}', "width",
                     id="width-negative"),
    ],
)
def test_malformed_input_line_names_path_and_line(tmp_path, bad, words):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"image_id": "a", "image_path": "/x.png", "width": 1, "height": 1}) + "\n" + bad + "\n")
    with pytest.raises(ConfigError) as exc:
        write_seed(jsonl_spec(src), tmp_path / "results", SeedReport())
    assert f"{src}:2" in str(exc.value)
    assert words in str(exc.value)


def test_input_jsonl_unreadable_image_is_a_seed_failure(tmp_path):
    src = tmp_path / "in.jsonl"
    missing = tmp_path / "missing.png"
    src.write_text(json.dumps({"image_id": "m", "image_path": str(missing)}) + "\n")
    report = SeedReport()
    path = write_seed(jsonl_spec(src), tmp_path / "results", report)
    assert list(iter_seed(path)) == []
    assert report.failures[0][0] == "m"
    assert str(missing) in report.failures[0][2]
    assert any(f"{src}:1" in p for p in report.problems)


def test_input_jsonl_numeric_image_id_becomes_a_string(tmp_path):
    # image_id is a str in the schema (and finalize sorts ids): a TAO file with numeric ids must not
    # leak ints into the seed file.
    img = image(tmp_path / "7.png")
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"image_id": 7, "image_path": str(img)}) + "\n"
                   + json.dumps({"image_id": "a", "image_path": str(img)}) + "\n")
    path = write_seed(jsonl_spec(src), tmp_path / "results", SeedReport())
    assert [r["image_id"] for _, r in iter_seed(path)] == ["7", "a"]


# --------------------------------------------------------------------------- what is skipped and why (issue 13)


def test_scan_sorts_every_entry_into_images_or_a_reason(dirs):
    images, _, _ = dirs
    image(images / "a.png")
    image(images / "w.webp", fmt="WEBP")
    image(images / "b.bmp", fmt="BMP")
    image(images / "c.BMP", fmt="BMP")
    image(images / "g.gif", fmt="GIF")
    (images / "loop.jpg").symlink_to(images / "loop.jpg")       # ELOOP
    (images / "gone.png").symlink_to(images / "nowhere.png")    # dangling
    image(images / "image_02" / "000001.png")
    image(images / "image_02" / "000002.png")
    (images / "notes.txt").write_text("x")
    (images / "Makefile").write_text("x")
    listing = scan_image_dir(images)
    assert list(listing.images) == [("a", "a.png"), ("w", "w.webp")]
    listing.images.close()
    broken = {name: why for _, name, why in listing.broken}
    assert set(broken) == {"loop.jpg", "gone.png"}
    assert "symbolic link" in broken["loop.jpg"] and "Too many levels of symbolic links" in broken["loop.jpg"]
    assert "symbolic link" in broken["gone.png"]
    assert listing.unsupported == {"BMP": ["b.bmp", "c.BMP"], "GIF": ["g.gif"]}
    assert listing.subfolders == ["image_02"]
    assert listing.other == {".txt": 1, "(no suffix)": 1}


def test_skipped_files_are_reported_with_their_reason_and_labels_not_called_orphans(dirs):
    images, labels, _ = dirs
    image(images / "a.png")
    image(images / "b.bmp", fmt="BMP")
    (images / "loop.jpg").symlink_to(images / "loop.jpg")
    image(images / "image_02" / "x.png")
    for stem in ("a", "b", "loop", "x"):
        (labels / f"{stem}.txt").write_text(kitti_line("Car", 1, 2, 30, 40))
    records, report = seed_all(spec_for(images, labels))
    assert [r["image_id"] for r in records] == ["a"]
    problems = "\n".join(report.problems)
    assert "1 BMP file skipped (b.bmp): BMP is not sent to the VLM APIs; convert to PNG, JPEG or WebP" in problems
    assert f"{images.resolve() / 'image_02'}/: a subfolder (1 image file), not searched" in problems
    assert f"{images.resolve() / 'loop.jpg'}: a symbolic link that leads nowhere" in problems
    assert f"{labels.resolve() / 'b.txt'}: ignored, since its image was skipped (b.bmp: BMP is not" in problems
    assert "label file with no image 'x' in data.image_dir; ignored (images in subfolders are not searched)" \
        in problems
    assert report.orphan_labels == 1 and report.unsupported_images == 1 and report.subfolders == 1
    assert [(f[0], "symbolic link" in f[2]) for f in report.failures] == [("loop", True)]
    assert report.unreadable_images == 1
    summary = report.summary()
    assert summary.startswith("seeded 1 images, 1 boxes (")
    assert "1 image files of an unsupported type skipped, 1 subfolders of data.image_dir not searched" in summary


def test_label_path_that_is_a_directory_fails_that_image_only(dirs):
    images, labels, _ = dirs
    image(images / "a.png")
    image(images / "b.png")
    (labels / "a.txt").mkdir()
    (labels / "b.txt").write_text(kitti_line("Car", 1, 2, 30, 40))
    records, report = seed_all(spec_for(images, labels))
    assert [r["image_id"] for r in records] == ["b"]
    ((image_id, path, message),) = report.failures
    assert image_id == "a" and path.endswith("a.png")
    assert message == f"{labels.resolve() / 'a.txt'}: the label path is a directory, not a file; a.png is not seeded"
    assert report.unreadable_labels == 1 and "1 label files unreadable (images not seeded)" in report.summary()


def test_label_with_a_bom_and_lower_case_ignore_types(dirs):
    images, labels, _ = dirs
    image(images / "a.png")
    (labels / "a.txt").write_bytes(b"\xef\xbb\xbf" + (kitti_line("DontCare", 1, 1, 5, 5)
                                                      + kitti_line("Car", 1, 2, 30, 40)
                                                      + kitti_line("DONTCARE", 2, 2, 6, 6)).encode())
    records, report = seed_all(spec_for(images, labels, **{"image_referring_expression.data.ignore_types":
                                                           "[dontcare]"}))
    assert records[0]["kitti_bboxes"] == [[1.0, 2.0, 30.0, 40.0, "Car"]]
    assert report.ignored_boxes == 2


def test_label_with_more_boxes_than_the_cap_keeps_the_largest(dirs):
    images, labels, _ = dirs
    image(images / "a.png", size=(1000, 1000))
    lines = [kitti_line("Car", 0, 0, 1 + i % 50, 1 + i % 50) for i in range(10_000)]
    lines[7] = kitti_line("Truck", 0, 0, 900, 900)
    (labels / "a.txt").write_text("".join(lines))
    records, report = seed_all(spec_for(images, labels, **{"image_referring_expression.data.max_boxes_per_image":
                                                           "5"}))
    boxes = records[0]["kitti_bboxes"]
    assert len(boxes) == 5 and boxes[0] == [0.0, 0.0, 900.0, 900.0, "Truck"]
    assert all(b[2] == 50.0 for b in boxes[1:])
    assert report.boxes == 5 and report.capped_boxes == 9_995
    assert (f"{labels.resolve() / 'a.txt'}: 10000 boxes, more than data.max_boxes_per_image = 5; kept the 5 "
            "largest, dropped 9995") in report.problems[0]
    assert "9995 boxes over data.max_boxes_per_image dropped" in report.summary()


def test_default_cap_is_two_hundred_boxes(dirs):
    images, labels, _ = dirs
    image(images / "a.png")
    (labels / "a.txt").write_text(kitti_line("Car", 1, 2, 30, 40) * 100_000)
    records, report = seed_all(spec_for(images, labels))
    assert len(records[0]["kitti_bboxes"]) == 200 and report.capped_boxes == 99_800


def test_input_jsonl_boxes_are_capped_too(tmp_path):
    img = image(tmp_path / "x.png")
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"image_id": "x", "image_path": str(img),
                               "kitti_bboxes": [[1, 2, 3 + i, 4 + i, "Car"] for i in range(4)]}) + "\n")
    spec = load_spec(None, [f"image_referring_expression.data.input_annotations_jsonl={src}",
                            "image_referring_expression.data.max_boxes_per_image=2"])
    report = SeedReport()
    path = write_seed(spec, tmp_path / "results", report)
    (rec,) = [r for _, r in iter_seed(path)]
    assert rec["kitti_bboxes"] == [[1, 2, 5, 6, "Car"], [1, 2, 6, 7, "Car"]]
    assert report.capped_boxes == 2 and f"{src}:1: 4 boxes" in report.problems[0]


def test_a_seed_file_is_read_as_every_sink_is_a_blank_or_torn_line_is_skipped(tmp_path):
    """Issue 14: the seed was read four ways, and ``iter_seed`` crashed on a blank line."""
    from producer.seed import iter_seed
    from worker.layout import Layout

    layout = Layout(tmp_path)
    layout.seed.path.write_text('{"image_id":"a"}\n\n{"image_id":"b"}\n{"image_id":"c', encoding="utf-8")
    got = list(iter_seed(layout.seed))
    assert [(off, rec["image_id"]) for off, rec in got] == [(0, "a"), (18, "b")]
    assert layout.seed.read_at(18)["image_id"] == "b"


# --------------------------------------------------------------------------- bounded memory


def test_listing_sorted_in_spilled_chunks_gives_the_same_seed(dirs, monkeypatch):
    """Names sorted in many runs on disk (as at ten million images) seed the same records, in
    the same order, with the same orphan labels, as one sort in memory."""
    import producer.extsort

    images, labels, _ = dirs
    for i in range(23):
        image(images / f"{(i * 7) % 23:03d}.png", size=(8, 8))
        (labels / f"{i:03d}.txt").write_text(kitti_line("Car", 1, 1, 5, 5))
    for stem in ("zz_orphan", "00_orphan"):
        (labels / f"{stem}.txt").write_text("")
    spec = spec_for(images, labels)
    one, report_one = seed_all(spec)
    monkeypatch.setattr(producer.extsort, "CHUNK", 4)
    scratch = images.parent / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the sorted runs go
    spilled, report_spilled = seed_all(spec)
    assert spilled == one and [r["image_id"] for r in one] == [f"{i:03d}" for i in range(23)]
    assert report_spilled.orphan_labels == report_one.orphan_labels == 2
    assert report_spilled.problems == report_one.problems
    assert list(scratch.iterdir()) == []  # the runs were there, and were removed


def test_duplicate_stems_found_across_spilled_chunks(dirs, monkeypatch):
    import producer.extsort

    images, _, _ = dirs
    for i in range(10):
        image(images / f"{i:02d}.png", size=(4, 4))
    image(images / "05.jpg", size=(4, 4))
    monkeypatch.setattr(producer.extsort, "CHUNK", 3)
    with pytest.raises(ConfigError, match="two images share the id '05'"):
        list_images(images)


def test_duplicate_ids_in_a_large_jsonl_are_found_by_sorting(tmp_path, monkeypatch):
    """No map of every id: the ids are sorted (spilled here) and a repeat names both lines."""
    import producer.extsort

    monkeypatch.setattr(producer.extsort, "CHUNK", 5)
    src = tmp_path / "in.jsonl"
    lines = [json.dumps({"image_id": f"i{n:02d}", "image_path": "/x.png", "width": 1, "height": 1}) for n in range(30)]
    lines.insert(20, lines[3])  # i03 again on line 21
    src.write_text("\n".join(lines) + "\n")
    results = tmp_path / "results"
    with pytest.raises(ConfigError) as exc:
        write_seed(jsonl_spec(src), results, SeedReport())
    assert f"{src}:21: image_id 'i03' already seeded on line 4" in str(exc.value)
    assert not (results / SEED_FILE).exists()


def test_a_listing_that_fails_after_spilling_leaves_no_sort_folder(tmp_path):
    from producer.extsort import SortedPairs

    def names():
        for i in range(10):
            yield (f"{i:03d}", f"{i:03d}.png")
        raise OSError(5, "Input/output error")  # the folder's listing fails midway

    with pytest.raises(OSError):
        SortedPairs(names(), tmp_path, chunk=3)  # three runs spilled by then
    assert list(tmp_path.iterdir()) == []


def test_image_paths_are_inside_the_root_by_component_not_by_string_prefix(tmp_path):
    """The jsonl path check: under the root as written or once resolved; a sibling whose name
    merely starts with the root's (``images2``) is outside, and ``..`` cannot climb out."""
    from producer.seed import _Inside

    real = tmp_path / "real"
    (real / "sub").mkdir(parents=True)
    (tmp_path / "images2").mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)                                   # the root given through a symlink
    (tmp_path / "way_in").symlink_to(real / "sub")           # outside as written, inside once resolved
    inside = _Inside(link)
    assert inside("a.png") == str(link / "a.png")
    assert inside("sub/../b.png") == str(link / "b.png")
    assert inside(str(real / "c.png")) == str(real / "c.png")  # the root's real path
    assert inside(str(tmp_path / "way_in" / "d.png")) == str(tmp_path / "way_in" / "d.png")
    assert inside("../images2/e.png") is None
    assert inside(str(tmp_path / "real2" / "f.png")) is None  # a string prefix of the real root
    assert inside(str(tmp_path / "linkx" / "g.png")) is None  # and of the root as written
    assert inside("../../etc/passwd") is None


# --------------------------------------------------------------------------- ordinals


def ordinals(results) -> dict[str, int]:
    return {r["image_id"]: r[SEED_ORDINAL] for _, r in iter_seed(results / SEED_FILE)}


def test_a_first_seeding_numbers_the_lines(dirs):
    images, _, results = dirs
    for stem in ("c", "a", "b"):
        image(images / f"{stem}.png")
    write_seed(spec_for(images), results, SeedReport())
    assert ordinals(results) == {"a": 0, "b": 1, "c": 2}


def test_a_re_seed_keeps_every_kept_image_s_ordinal_and_never_reuses_a_removed_one(dirs, monkeypatch):
    """Images added before, between and after the old ones, one removed: the kept images keep
    their ordinals (their done bits), the new ones get numbers above every old one. The sorts
    spill to disk (chunks of 2), so the join is the bounded-memory one."""
    import producer.extsort as extsort

    monkeypatch.setattr(extsort, "CHUNK", 2)
    images, _, results = dirs
    for stem in ("b", "d", "f", "h"):
        image(images / f"{stem}.png")
    write_seed(spec_for(images), results, SeedReport())
    first = ordinals(results)
    assert first == {"b": 0, "d": 1, "f": 2, "h": 3}
    (images / "f.png").unlink()
    for stem in ("a", "e", "z"):
        image(images / f"{stem}.png")
    report = SeedReport()
    write_seed(spec_for(images), results, report)
    second = ordinals(results)
    assert {i: second[i] for i in ("b", "d", "h")} == {"b": 0, "d": 1, "h": 3}
    assert sorted(second[i] for i in ("a", "e", "z")) == [4, 5, 6], "new ordinals above the old maximum"
    assert [r["image_id"] for _, r in iter_seed(results / SEED_FILE)] == ["a", "b", "d", "e", "h", "z"]
    assert report.sha256 == hashlib.sha256((results / SEED_FILE).read_bytes()).hexdigest()
    # The same inputs again: the same file, byte for byte.
    before = (results / SEED_FILE).read_bytes()
    write_seed(spec_for(images), results, SeedReport())
    assert (results / SEED_FILE).read_bytes() == before
    assert not [p for p in results.iterdir() if p.name not in (SEED_FILE, ORDINAL_TOP_FILE)]


def test_a_re_seed_from_an_input_jsonl_in_another_order_keeps_the_ordinals(tmp_path):
    img = image(tmp_path / "x.png", size=(30, 20))
    src = tmp_path / "in.jsonl"
    results = tmp_path / "results"

    def write(ids):
        src.write_text("".join(json.dumps({"image_id": i, "image_path": str(img), SEED_ORDINAL: 99, "ordinal": "mine"})
                               + "\n" for i in ids))
        write_seed(jsonl_spec(src), results, SeedReport())

    write(["q", "p", "r"])
    assert ordinals(results) == {"q": 0, "p": 1, "r": 2}, "an input's own ordinal field is not taken"
    kept = {r["ordinal"] for _, r in iter_seed(results / SEED_FILE)}
    assert kept == {"mine"}, "the user's field named ordinal is kept"
    write(["s", "r", "q"])
    assert ordinals(results) == {"s": 3, "r": 2, "q": 0}


def test_the_ordinal_never_reaches_a_step_s_input():
    from worker.steps import input_record

    seed = {"image_id": "a", "image_path": "/x.png", "width": 3, "height": 2, "kitti_bboxes": [], SEED_ORDINAL: 7}
    assert SEED_ORDINAL not in input_record(0, seed, {})
    assert SEED_ORDINAL in seed


def test_an_ordinal_freed_by_a_removed_image_is_not_reused_by_a_later_re_seed(dirs):
    """The image with the highest ordinal removed, then an image added in a later re-seed: the
    new image must not take the removed one's ordinal (its done bits are still set, so the new
    image would be counted done and never sent)."""
    images, _, results = dirs
    for stem in ("a", "b", "c"):
        image(images / f"{stem}.png")
    write_seed(spec_for(images), results, SeedReport())
    assert ordinals(results) == {"a": 0, "b": 1, "c": 2}
    (images / "c.png").unlink()
    write_seed(spec_for(images), results, SeedReport())
    assert ordinals(results) == {"a": 0, "b": 1}
    image(images / "d.png")
    write_seed(spec_for(images), results, SeedReport())
    assert ordinals(results) == {"a": 0, "b": 1, "d": 3}
    # The seed file deleted (the run's bits still in Redis): a seeding afresh numbers above them.
    (results / SEED_FILE).unlink()
    write_seed(spec_for(images), results, SeedReport())
    assert ordinals(results) == {"a": 4, "b": 5, "d": 6}
