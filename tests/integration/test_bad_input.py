"""A generated corpus of bad input through the whole fleet: every case is handled (and counted)
or a per-image failure naming the file; the run finishes; no worker dies.

See tests/support/badinput.py for the corpus and what each case must become.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from tests.support import badinput
from tests.support.fleet import producer
from worker.sinks import JsonlSink

pytestmark = pytest.mark.integration


def vlm_args(fake, *extra: str) -> list[str]:
    return [
        "image_referring_expression.vlm.backend=openai",
        f"image_referring_expression.vlm.openai.base_url={fake.openai_base_url}",
        "image_referring_expression.vlm.openai.model_name=fake-vl",
        "image_referring_expression.vlm.openai.timeout=30",
        "image_referring_expression.vlm.max_retries=1",
        "image_referring_expression.workflow.output_format=both",
        *extra,
    ]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def seed_summary(stderr: str) -> dict[str, int]:
    m = re.search(r"seeded (\d+) images, (\d+) boxes \((\d+) ignored by type, (\d+) label lines skipped, "
                  r"(\d+) label files missing, (\d+) images unreadable, (\d+) label files without an image",
                  stderr)
    assert m, stderr
    return dict(zip(("images", "boxes", "ignored", "skipped", "missing", "unreadable", "orphans"),
                    map(int, m.groups()), strict=True))


def by_image_step(fails: list[dict]) -> dict[tuple[str, object], dict]:
    return {(f["image_id"], f["step"]): f for f in fails}


def test_bad_images_labels_and_answers(fleet, fleet_env, fake_vlm, tmp_path):
    corpus = badinput.make_corpus(tmp_path / "corpus")
    fake_vlm.answer_fn = corpus.vlm_answer
    workers = fleet.start(2, concurrency=4)
    results = tmp_path / "results"
    run = producer(fleet_env, "enqueue", *vlm_args(fake_vlm), "--image-dir", str(corpus.image_dir),
                   "--label-dir", str(corpus.label_dir), "--results-dir", str(results), "--wait", "--timeout", "120",
                   check=False)
    assert run.returncode == 3, f"some images failed: exit 3\n{run.stderr[-3000:]}"

    # -- seeding: counted, and every skipped line / unreadable image / stray label named.
    assert seed_summary(run.stderr) == badinput.EXPECTED_SEED
    assert "no_such_image.txt: label file with no image 'no_such_image'" in run.stderr
    for lineno in (2, 3, 4, 6, 7):
        assert f"labels_messy.txt:{lineno}: skipped" in run.stderr
    seeds = {r["image_id"]: r for r in read_jsonl(results / "seed_annotations.jsonl")}
    assert seeds["labels_messy"]["kitti_bboxes"] == [[5.0, 5.0, 30.0, 30.0, "Car"], [50.0, 30.0, 64.0, 48.0,
                                                                                    "Pedestrian"]]
    assert [b[4] for b in seeds["labels_crlf_tabs"]["kitti_bboxes"]] == ["Car", "Van"]
    assert seeds["labels_latin1"]["kitti_bboxes"][0][4] == "Café"
    assert seeds["empty_label"]["kitti_bboxes"] == [] == seeds["no_label"]["kitti_bboxes"]

    # -- failures.jsonl: one line per failed image-step, each naming its file.
    fails = by_image_step(read_jsonl(results / "failures.jsonl"))
    for stem, word in badinput.SEED_FAILS.items():
        f = fails.pop((stem, "seed"))
        assert word in f["message"] and f["image_path"].endswith(stem + Path(f["image_path"]).suffix), f
    for stem, name in badinput.WORKER_FAILS.items():
        for step in (0, 1):
            f = fails.pop((stem, step))
            assert f["error"] == "InputError" and name in f["message"] and "truncated" in f["message"], f
            assert f["attempts"] == 1, "an unreadable image is not worth a retry"
    nested = fails.pop(("vlm_nested", 0))
    assert nested["error"] == "ParseError" and nested["attempts"] == 2, nested
    assert nested["raw"].startswith("[[[") and len(nested["raw"]) <= 4000
    nested = fails.pop(("vlm_nested", 1))  # brackets are not a caption either (issue 13, item 10)
    assert nested["error"] == "ParseError" and "not a caption" in nested["message"], nested
    assert fails == {}, f"unexpected failures: {fails}"

    # -- the run finished; what could not be done is failed or blocked, everything else is done.
    st = json.loads(producer(fleet_env, "status", "--results-dir", str(results), "--json").stdout)
    assert st["finished"] and st["seed_failed"] == len(badinput.SEED_FAILS)
    blocked = len(badinput.WORKER_FAILS) + 1  # + vlm_nested, whose step 0 failed
    assert st["steps"]["2"]["blocked"] == blocked == st["steps"]["3"]["blocked"]
    final = {r["image_id"]: r for r in read_jsonl(results / "annotations.jsonl")}
    assert sorted(final) == sorted([*badinput.DONE, "vlm_huge", "vlm_badutf8"])
    assert "3 failed" in run.stdout  # trunc_png, trunc_jpg, vlm_nested

    # -- the answer that was not UTF-8 is kept, with U+FFFD where the bad bytes were.
    bad_text = json.dumps(final["vlm_badutf8"], ensure_ascii=False)
    assert "\ufffd" in bad_text
    # -- the huge answer was cut to size before parsing; the image finished.
    assert final["vlm_huge"]["regions"] and final["vlm_huge"]["expressions"]
    caption_len = len(final["vlm_huge"]["caption"])
    # -- odd but valid images were sent in a form a provider decodes; 16-bit grey kept its tones.
    sent = [Image.open(io.BytesIO(r.image)) for r in fake_vlm.requests if r.image]
    rgb = [im.convert("RGB").tobytes() for im in sent if im.format == "PNG" and im.size == (badinput.W, badinput.H)]
    grey = [px[0::3] for px in rgb if px[0::3] == px[1::3] == px[2::3]]
    assert grey, "the 16-bit PNG was never sent"
    assert all(len(set(g)) > 16 for g in grey), "16-bit grey was flattened (all white)"
    assert all(r.image_mime in ("image/png", "image/jpeg") for r in fake_vlm.requests if r.image)
    assert final["exif_rotated"]["width"] == badinput.W and final["exif_rotated"]["height"] == badinput.H

    # -- every sink line is whole JSON, and no worker died.
    for step_dir in sorted(results.glob("step_*")):
        for _, path in JsonlSink(step_dir / "annotations.jsonl").files():  # the main file and every part
            read_jsonl(path)
    assert all(w.proc.poll() is None for w in workers), fleet.logs()
    print(f"huge answer: caption kept {caption_len} characters")


def test_input_annotations_jsonl_with_missing_and_outside_paths(fleet, fleet_env, fake_vlm, tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (badinput.W, badinput.H), (200, 40, 40)).save(good)
    jsonl, expect = badinput.make_jsonl_corpus(tmp_path / "dataset", good)
    workers = fleet.start(2, concurrency=4)
    results = tmp_path / "results"
    run = producer(fleet_env, "enqueue", *vlm_args(fake_vlm, f"image_referring_expression.data."
                                                             f"input_annotations_jsonl={jsonl}"),
                   "--results-dir", str(results), "--wait", "--timeout", "60", check=False)
    assert run.returncode == 3, f"some images failed: exit 3\n{run.stderr[-3000:]}"

    seeds = {r["image_id"]: r for r in read_jsonl(results / "seed_annotations.jsonl")}
    assert sorted(seeds) == ["inside", "missing_sized", "relative"]
    assert seeds["relative"]["image_path"] == str(jsonl.parent / "images" / "inside.png")
    fails = by_image_step(read_jsonl(results / "failures.jsonl"))
    f = fails.pop(("missing", "seed"))
    assert expect["missing"] in f["message"] and "image file not found" in f["message"], f
    for image_id in ("outside", "dotdot"):
        f = fails.pop((image_id, "seed"))
        assert expect[image_id] in f["message"] and "outside the allowed root" in f["message"], f
        assert f"{jsonl}:" in f["message"], "the message names the jsonl file and line"
    for step in (0, 1):  # its size was given, so only the worker finds it missing
        f = fails.pop(("missing_sized", step))
        assert f["error"] == "InputError" and "missing_sized.png" in f["message"], f
    assert fails == {}
    assert re.search(r"outside the allowed root .*dataset", run.stderr)
    final = [r["image_id"] for r in read_jsonl(results / "annotations.jsonl")]
    assert final == ["inside", "relative"]
    assert all(w.proc.poll() is None for w in workers), fleet.logs()
