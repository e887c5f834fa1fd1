"""Exports: write each format, read it back with a plain JSON reader, compare boxes and phrases
with the records of ``annotations.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from producer.export import export, image_objects, register
from tests.producer.test_preview import BOXES, make_run
from worker.errors import ConfigError
from worker.layout import Layout


@pytest.fixture
def run(tmp_path) -> Layout:
    return make_run(tmp_path)


def final_records(layout: Layout) -> list[dict]:
    return [json.loads(line) for line in layout.final.read_text(encoding="utf-8").splitlines()]


def expected_pairs(records: list[dict]) -> dict[str, list[tuple[str, list[float]]]]:
    """image_id -> sorted (phrase, pixel box) of every expression instance."""
    return {r["image_id"]: sorted((e["text"], [round(v, 2) for v in i["bbox"]])
                                  for e in r.get("expressions", []) for i in e["instances"]) for r in records}


def xyxy(b: list[float]) -> list[float]:
    return [round(b[0], 2), round(b[1], 2), round(b[0] + b[2], 2), round(b[1] + b[3], 2)]


def test_odvg_round_trip(run, tmp_path):
    rep = export(run.root, "odvg", tmp_path / "train.odvg.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "train.odvg.jsonl").read_text().splitlines()]
    records = {r["image_id"]: r for r in final_records(run)}
    want = expected_pairs(records.values())
    assert [line["filename"] for line in lines] == ["a.png"]          # b has no phrase: left out
    assert rep.images == 1 and "1 image without phrases left out" in rep.note
    assert rep.root == Path(records["a"]["image_path"]).parent
    line = lines[0]
    assert (line["width"], line["height"]) == (records["a"]["width"], records["a"]["height"])
    g = line["grounding"]
    got = sorted((r["phrase"], r["bbox"]) for r in g["regions"])
    assert got == want["a"]
    for r in g["regions"]:
        (start, end), = r["tokens_positive"]
        assert g["caption"][start:end] == r["phrase"]
        x1, y1, x2, y2 = r["bbox"]
        assert 0 <= x1 < x2 <= line["width"] and 0 <= y1 < y2 <= line["height"]
    assert g["image_caption"] == records["a"]["caption"]
    # the moved box is exported where step 3 put it
    assert ("the pedestrian in blue", [362.0, 86.0, 382.0, 148.0]) in got


def test_refcoco_round_trip(run, tmp_path):
    export(run.root, "refcoco", tmp_path / "refs.json")
    data = json.loads((tmp_path / "refs.json").read_text())
    anns = {a["id"]: a for a in data["annotations"]}
    images = {i["id"]: i for i in data["images"]}
    cats = {c["id"]: c["name"] for c in data["categories"]}
    records = final_records(run)
    want = expected_pairs(records)
    got: dict[str, list] = {r["image_id"]: [] for r in records}
    for ref in data["refs"]:
        assert set(ref) >= {"ref_id", "image_id", "ann_id", "sentences"}
        assert ref["ann_id"] == ref["ann_ids"][0]
        key = images[ref["image_id"]]["image_key"]
        for aid in ref["ann_ids"]:
            assert anns[aid]["image_id"] == ref["image_id"]
            got[key].append((ref["sentences"][0]["sent"], xyxy(anns[aid]["bbox"])))
    assert {k: sorted(v) for k, v in got.items()} == want
    assert len({r["ref_id"] for r in data["refs"]}) == len(data["refs"])
    # every KITTI box is an annotation, under its KITTI type; b has none, c failed and is not exported
    a_anns = [a for a in data["annotations"] if images[a["image_id"]]["image_key"] == "a"]
    assert sorted(cats[a["category_id"]] for a in a_anns) == ["Car", "Car", "Pedestrian"]
    for a in a_anns:
        assert a["area"] == pytest.approx(a["bbox"][2] * a["bbox"][3], abs=0.01)
    assert sorted(i["image_key"] for i in data["images"]) == ["a", "b"]


def test_coco_round_trip(run, tmp_path):
    export(run.root, "coco", tmp_path / "coco.json")
    data = json.loads((tmp_path / "coco.json").read_text())
    images = {i["id"]: i for i in data["images"]}
    cats = {c["id"]: c["name"] for c in data["categories"]}
    by_box = {}
    for a in data["annotations"]:
        assert images[a["image_id"]]["image_key"] == "a"
        by_box[tuple(xyxy(a["bbox"]))] = a
    kitti = {tuple(b[:4]) for b in BOXES[:2]}
    assert kitti <= set(by_box)
    big = by_box[(40.0, 60.0, 200.0, 200.0)]
    assert cats[big["category_id"]] == "Car"
    assert big["attributes"]["phrases"] == ["the red cars"]   # "everything on the road" was dropped by step 3
    assert big["attributes"]["description"] == "red car number 0"
    small = by_box[(300.0, 110.0, 312.0, 120.0)]
    assert small["attributes"]["phrases"] == []                 # removed from its phrase by step 3
    ped = by_box[(362.0, 86.0, 382.0, 148.0)]                  # the moved box replaces the KITTI one
    assert ped["attributes"]["phrases"] == ["the pedestrian in blue"]
    records = final_records(run)
    want = expected_pairs(records)["a"]
    got = sorted((p, xyxy(a["bbox"])) for a in data["annotations"] for p in a["attributes"]["phrases"])
    assert got == want


def test_phrases_from_regions(run, tmp_path):
    rep = export(run.root, "odvg", tmp_path / "r.jsonl", phrases="regions")
    line = json.loads((tmp_path / "r.jsonl").read_text().splitlines()[0])
    got = sorted((r["phrase"], r["bbox"]) for r in line["grounding"]["regions"])
    assert got == sorted((f"{c} {b[4].lower()} number {i}", b[:4])
                         for i, (b, c) in enumerate(zip(BOXES, ["red", "red", "blue"], strict=True)))
    assert rep.links == 3 and rep.phrases == 3


def test_unmatched_box_is_its_own_object(run):
    rec = final_records(run)[0]
    objs, refs = image_objects(rec)
    assert [o.matched for o in objs] == [True, True, True]  # the unmatched box's phrase was dropped
    rec2 = json.loads(json.dumps(run.sink(2).latest()["a"]))
    objs, refs = image_objects(rec2)
    assert [(o.category, o.matched) for o in objs][-1] == ("object", False)
    assert [len(r.objects) for r in refs] == [2, 1, 4]


def test_missing_final_is_finalized_first(run, tmp_path):
    run.final.unlink()
    rep = export(run.root, "coco", tmp_path / "c.json")
    assert "was missing: finalized it" in rep.note
    assert run.final.exists() and rep.images == 2


def test_paths_and_errors(run, tmp_path):
    rep = export(run.root, "odvg", absolute_paths=True)
    assert rep.path == run.root / "export" / "odvg.jsonl"
    assert json.loads(rep.path.read_text().splitlines()[0])["filename"].startswith("/")
    rep = export(run.root, "odvg", tmp_path / "o.jsonl", image_root_dir=tmp_path)
    assert json.loads((tmp_path / "o.jsonl").read_text().splitlines()[0])["filename"] == "images/a.png"
    with pytest.raises(ConfigError, match="--format"):
        export(run.root, "yolo")
    with pytest.raises(ConfigError, match="not a directory"):
        export(tmp_path / "nope", "coco")
    with pytest.raises(ConfigError, match=r"no annotations\.jsonl"):
        (tmp_path / "empty").mkdir()
        export(tmp_path / "empty", "coco")


def test_command(run, tmp_path):
    app = typer.Typer()
    register(app)
    out = tmp_path / "x.json"
    res = CliRunner().invoke(app, ["--results-dir", str(run.root), "--format", "refcoco", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert f"wrote {out}" in res.output and json.loads(out.read_text())["refs"]
    res = CliRunner().invoke(app, ["--results-dir", str(run.root), "--format", "voc"])
    assert res.exit_code == 2 and "--format must be one of" in res.output


def offline_run(tmp_path: Path, n_images: int = 6) -> Layout:
    """The real step functions and the offline teacher on demo scenes, without Redis or Celery."""
    from producer.demo import make_demo_dataset
    from producer.finalize import finalize
    from worker.clients.offline import OfflineClient
    from worker.kitti import parse_kitti
    from worker.sinks import dumps
    from worker.steps import input_record, run_step
    from worker.steps.prompts import PROMPT_TEMPLATES
    from worker.steps.records import SOURCE

    images, labels = make_demo_dataset(tmp_path / "data", n_images=n_images, seed=5)
    layout = Layout(tmp_path / "results")
    layout.root.mkdir()
    client = OfflineClient()
    with open(layout.seed.path, "w", encoding="utf-8") as f:
        for p in sorted(images.iterdir()):
            label = labels / f"{p.stem}.txt"
            boxes = parse_kitti(label.read_text() if label.exists() else "", width=1242, height=375).boxes
            seed = {"image_id": p.stem, "image_path": str(p), "width": 1242, "height": 375,
                    "kitti_bboxes": [[*b["bbox"], b["type"]] for b in boxes], "source": SOURCE,
                    "pipeline_steps": []}
            f.write(dumps(seed) + "\n")
            done: dict[int, dict] = {}
            for step in (0, 1, 2, 3):
                done[step] = run_step(step, input_record(step, seed, done), client, PROMPT_TEMPLATES).record
                layout.sink(step).append(done[step])
    finalize(layout, [0, 1, 2, 3])
    return layout


@pytest.mark.parametrize("fmt", ["odvg", "refcoco", "coco"])
def test_round_trip_on_a_real_offline_run(tmp_path, fmt):
    layout = offline_run(tmp_path)
    records = final_records(layout)
    want = {k: v for k, v in expected_pairs(records).items() if v}
    assert len(want) >= 3
    rep = export(layout.root, fmt, tmp_path / f"out.{fmt}")
    text = (tmp_path / f"out.{fmt}").read_text()
    got: dict[str, list] = {}
    if fmt == "odvg":
        by_file = {Path(r["image_path"]).name: r["image_id"] for r in records}
        for line in map(json.loads, text.splitlines()):
            got[by_file[line["filename"]]] = sorted((r["phrase"], r["bbox"]) for r in line["grounding"]["regions"])
    else:
        data = json.loads(text)
        # written streamed, yet byte for byte what json.dumps of the whole dataset gives
        assert text == json.dumps(data, ensure_ascii=False) + "\n"
        assert list(data) == ["info", "images", "annotations", "categories", *(["refs"] if fmt == "refcoco" else [])]
        assert not list(tmp_path.glob(".*.tmp"))  # the spools are gone
        anns = {a["id"]: a for a in data["annotations"]}
        keys = {i["id"]: i["image_key"] for i in data["images"]}
        if fmt == "refcoco":
            for ref in data["refs"]:
                for aid in ref["ann_ids"]:
                    got.setdefault(keys[ref["image_id"]], []).append((ref["sentences"][0]["sent"],
                                                                       xyxy(anns[aid]["bbox"])))
        else:
            for a in data["annotations"]:
                for phrase in a["attributes"]["phrases"]:
                    got.setdefault(keys[a["image_id"]], []).append((phrase, xyxy(a["bbox"])))
            n_kitti = sum(len(r["kitti_bboxes"]) for r in records)
            assert len(data["annotations"]) >= n_kitti   # every KITTI box is a detection
    got = {k: sorted(v) for k, v in got.items()}
    if fmt == "odvg":
        assert got == want
    else:
        # a box two phrases share is one object: compare the set of (phrase, box) pairs
        def pairs(d):
            return {k: {(t, tuple(b)) for t, b in v} for k, v in d.items()}

        assert pairs(got) == pairs(want)
    assert rep.images >= len(want)


def test_object_keeps_the_kitti_box_when_phrases_disagree(run):
    rec = json.loads(json.dumps(final_records(run)[0]))
    moved = [44.0, 64.0, 196.0, 196.0]
    rec["expressions"].append({"expression_id": "a/expr_9", "text": "the big car",
                               "instances": [{**rec["expressions"][0]["instances"][0], "bbox": moved,
                                              "updated": True}]})
    objs, _ = image_objects(rec)
    assert objs[0].bbox == BOXES[0][:4]                      # E0 kept the KITTI box, E9 moved it
    assert objs[0].phrases == ["the red cars", "the big car"]
    rec["expressions"] = rec["expressions"][-1:]
    objs, _ = image_objects(rec)
    assert objs[0].bbox == moved                              # only the moved box remains: it wins


def test_summaries_agree_and_name_each_count(tmp_path):
    """Through the real ``producer`` command: every format reports the same number of phrases, and
    the bigger number COCO used to call "phrases" is named for what it is (phrase-object links)."""
    import os
    import re

    from tests.support.fleet import producer

    layout = offline_run(tmp_path)
    env = dict(os.environ)
    lines = {}
    for fmt in ("odvg", "refcoco", "coco"):
        res = producer(env, "export", "--results-dir", str(layout.root), "--format", fmt,
                       "--out", str(tmp_path / f"x.{fmt}"))
        lines[fmt] = next(ln for ln in res.stdout.splitlines() if ln.startswith("wrote "))
        assert "image file names are relative to" in res.stdout
    phrases = {fmt: int(re.search(r"(\d+) (?:phrases|refs \(one per phrase\))", ln)[1]) for fmt, ln in lines.items()}
    assert len(set(phrases.values())) == 1, lines
    links = {
        "odvg": int(re.search(r"(\d+) regions \(one per phrase and box\)", lines["odvg"])[1]),
        "refcoco": int(re.search(r"(\d+) phrase-object links \(ann_ids\)", lines["refcoco"])[1]),
        "coco": int(re.search(r"linked to objects (\d+) times \(attributes\.phrases\)", lines["coco"])[1]),
    }
    assert len(set(links.values())) == 1 and links["coco"] > phrases["coco"], lines  # groups: more links
    objects = {fmt: int(re.search(r"(\d+) objects \(annotations\)", lines[fmt])[1]) for fmt in ("refcoco", "coco")}
    data = json.loads((tmp_path / "x.coco").read_text())
    assert objects["coco"] == objects["refcoco"] == len(data["annotations"])
    assert links["coco"] == sum(len(a["attributes"]["phrases"]) for a in data["annotations"])
    refs = json.loads((tmp_path / "x.refcoco").read_text())["refs"]
    assert phrases["refcoco"] == len(refs)


def test_an_export_that_fails_midway_leaves_nothing_behind(run, tmp_path):
    """A bad line in annotations.jsonl is an error naming it, and no half file or spool stays."""
    with open(run.final, "a", encoding="utf-8") as f:
        f.write("{not json\n")
    out = tmp_path / "out"
    out.mkdir()
    for fmt in ("coco", "refcoco", "odvg"):
        with pytest.raises(ConfigError, match=r"annotations\.jsonl:\d+: not JSON"):
            export(run.root, fmt, out / f"x.{fmt}")
        assert list(out.iterdir()) == []
