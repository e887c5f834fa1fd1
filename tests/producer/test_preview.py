"""The preview gallery: panels drawn from the step sinks, the index that opens from disk, and the
helpers it rests on (sampling, label placement, contrast, step-3 diff).

``make_run`` builds a small results_dir by hand (drawn images, records in the real schema, a
failure), reused by the export and browser tests.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageStat

from producer.finalize import finalize
from producer.preview import (
    OKABE_ITO,
    PALETTE,
    Tag,
    TagPlacer,
    _compose,
    _font,
    build_preview,
    choose_ids,
    printable,
    register,
    step3_changes,
    text_color,
)
from worker.errors import ConfigError
from worker.layout import Layout
from worker.sinks import dumps
from worker.steps.records import SOURCE
from worker.steps.region_expr import prompt_box as to_norm  # the 0-1000 box the model sees

W, H = 480, 240
BOXES = [
    [40.0, 60.0, 200.0, 200.0, "Car"],
    [300.0, 110.0, 312.0, 120.0, "Car"],          # 12 x 10 pixels: its tags must go outside
    [360.0, 80.0, 384.0, 150.0, "Pedestrian"],
]


def _draw(path: Path, boxes: list[list]) -> None:
    img = Image.new("RGB", (W, H), (120, 130, 140))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 150, W, H], fill=(70, 70, 72))
    for b in boxes:
        d.rectangle(b[:4], fill=(200, 30, 30) if b[4] == "Car" else (30, 60, 200))
    img.save(path)


def _call(i: int, o: int) -> dict:
    return {"model": "fake-vl", "input_tokens": i, "output_tokens": o, "latency_s": 0.5}


def _inst(image_id: str, k: int, box: list, ri: int | None, *, matched: bool = True, **extra) -> dict:
    return {"bbox_id": f"{image_id}/box_{k}", "bbox": [float(v) for v in box[:4]], "bbox_2d": to_norm(box[:4], W, H),
            "bbox_score": 0.9, "region_index": ri, "matched": matched, **extra}


def make_run(root: Path) -> Layout:
    """Three images: ``a`` (boxes; step 3 keeps, removes and moves; a phrase dropped; a parse
    repair and an unmatched box), ``b`` (no boxes, no calls), ``c`` (step 2 failed)."""
    images = root / "images"
    images.mkdir(parents=True)
    layout = Layout(root / "results")
    layout.root.mkdir()
    seeds = {}
    for image_id, boxes in (("a", BOXES), ("b", []), ("c", BOXES[:1])):
        _draw(images / f"{image_id}.png", boxes)
        seeds[image_id] = {"image_id": image_id, "image_path": str(images / f"{image_id}.png"), "width": W,
                           "height": H, "kitti_bboxes": boxes, "source": SOURCE, "pipeline_steps": []}
    with open(layout.seed.path, "w", encoding="utf-8") as f:
        for rec in seeds.values():
            f.write(dumps(rec) + "\n")
    layout.run_file.write_text('{"run_id": "test"}\n')

    def regions(boxes):
        colors = ["red", "red", "blue"]
        return [{"bbox": b[:4], "bbox_2d": to_norm(b[:4], W, H), "type": b[4].lower(), "color": colors[i],
                 "description": f"{colors[i]} {b[4].lower()} number {i}", "kitti_index": i}
                for i, b in enumerate(boxes)]

    m0 = {"repairs": ["code_fence"], "invalid_boxes": 0, "invented": 0, "missed_kitti": [], "call": _call(300, 120)}
    m1 = {"call": _call(90, 40)}
    m2 = {"repairs": [], "invalid_boxes": 0, "unmatched_boxes": 1, "call": _call(400, 60)}
    m3 = {"repairs": [], "removed": 4, "updated": 1, "added_dropped": 0, "invalid_boxes": 0,
          "dropped_expressions": 1, "call": _call(350, 50)}
    # image a
    a = dict(seeds["a"])
    r0 = {**a, "regions": regions(BOXES), "pipeline_steps": ["step0_region_expr"],
          "meta": {"step0_region_expr": m0}}
    r1 = {**a, "caption": "A grey street with two red cars & a <blue> pedestrian.",
          "pipeline_steps": ["step1_image_caption"], "meta": {"step1_image_caption": m1}}
    loose = [200.0, 20.0, 260.0, 60.0]
    exprs2 = [
        {"expression_id": "a/expr_0", "text": "the red cars",
         "instances": [_inst("a", 0, BOXES[0], 0), _inst("a", 1, BOXES[1], 1)], "verified": False},
        {"expression_id": "a/expr_1", "text": "the pedestrian in blue",
         "instances": [_inst("a", 2, BOXES[2], 2)], "verified": False},
        {"expression_id": "a/expr_2", "text": "everything on the road",
         "instances": [_inst("a", 3, BOXES[0], 0), _inst("a", 4, BOXES[1], 1), _inst("a", 5, BOXES[2], 2),
                       _inst("a", 6, loose, None, matched=False)], "verified": False},
    ]
    both = ["step0_region_expr", "step1_image_caption"]
    r2 = {**a, "regions": r0["regions"], "caption": r1["caption"], "expressions": exprs2,
          "pipeline_steps": [*both, "step2_grounding_expr"],
          "meta": {"step0_region_expr": m0, "step1_image_caption": m1, "step2_grounding_expr": m2}}
    moved = [362.0, 86.0, 382.0, 148.0]
    exprs3 = [
        {**exprs2[0], "instances": [exprs2[0]["instances"][0]], "verified": True},
        {**exprs2[1], "instances": [_inst("a", 2, moved, 2, updated=True)], "verified": True},
    ]
    r3 = {**r2, "expressions": exprs3, "pipeline_steps": [*r2["pipeline_steps"], "step3_double_check"],
          "meta": {**r2["meta"], "step3_double_check": m3}}
    for step, rec in enumerate((r0, r1, r2, r3)):
        layout.sink(step).append(rec)
    # image b: no boxes, so no calls for 0, 2, 3
    b = dict(seeds["b"])
    b0 = {**b, "regions": [], "pipeline_steps": ["step0_region_expr"], "meta": {"step0_region_expr": {}}}
    b1 = {**b, "caption": "An empty road.", "pipeline_steps": ["step1_image_caption"],
          "meta": {"step1_image_caption": m1}}
    b2 = {**b, "regions": [], "caption": "An empty road.", "expressions": [],
          "pipeline_steps": [*both, "step2_grounding_expr"],
          "meta": {"step0_region_expr": {}, "step1_image_caption": m1, "step2_grounding_expr": {}}}
    b3 = {**b2, "pipeline_steps": [*b2["pipeline_steps"], "step3_double_check"],
          "meta": {**b2["meta"], "step3_double_check": {}}}
    for step, rec in enumerate((b0, b1, b2, b3)):
        layout.sink(step).append(rec)
    # image c: step 2 failed for good
    c = dict(seeds["c"])
    layout.sink(0).append({**c, "regions": regions(BOXES[:1]), "pipeline_steps": ["step0_region_expr"],
                           "meta": {"step0_region_expr": {**m0, "repairs": []}}})
    layout.sink(1).append({**c, "caption": "One red car.", "pipeline_steps": ["step1_image_caption"],
                           "meta": {"step1_image_caption": m1}})
    layout.record_failure(image_id="c", step=2, error="ParseError: no '<phrase>: [[...]]' line", attempts=6,
                          raw="I cannot see <any> groups")
    finalize(layout, [0, 1, 2, 3])
    return layout


@pytest.fixture
def run(tmp_path) -> Layout:
    return make_run(tmp_path)


class _Index(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.ids: list[str] = []
        self.scripts = 0
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a["src"])
        if tag == "a":
            self.links.append(a["href"])
        if tag == "script":
            self.scripts += 1
        if "id" in a:
            self.ids.append(a["id"])

    def handle_data(self, data):
        self.text.append(data)


def parse_index(path: Path) -> _Index:
    p = _Index()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def test_panels_and_index_for_every_finished_step(run):
    rep = build_preview(run.root, sample=0)
    assert rep.index == run.root / "preview" / "index.html"
    assert rep.images == 3 and rep.total == 3
    names = sorted(p.name for p in (run.root / "preview" / "images").iterdir())
    # b has no KITTI boxes: one plain picture instead of three empty panels
    assert names == ["a_step0.png", "a_step2.png", "a_step3.png", "b_image.png", "c_step0.png"]
    assert rep.panels == len(names)
    for name in names:
        with Image.open(run.root / "preview" / "images" / name) as im:
            assert im.format == "PNG" and im.width >= W
            assert max(ImageStat.Stat(im.convert("L")).stddev) > 10  # not blank


def test_index_opens_from_disk(run):
    rep = build_preview(run.root, sample=0)
    idx = parse_index(rep.index)
    assert idx.scripts == 0
    assert idx.images and all(not re.match(r"^(/|[a-z]+:)", src) for src in idx.images)  # relative only
    for src in idx.images:
        assert (rep.index.parent / src).is_file()
    assert {"a", "b", "c"} <= set(idx.ids)
    assert all(link.startswith("#") for link in idx.links)


def test_index_shows_caption_phrases_warnings_and_failures(run):
    rep = build_preview(run.root, sample=0)
    text = " ".join(parse_index(rep.index).text)
    raw = rep.index.read_text(encoding="utf-8")
    assert "A grey street with two red cars & a <blue> pedestrian." in text   # caption, escaped in the HTML
    assert "&lt;blue&gt;" in raw and "<blue>" not in raw
    for phrase in ("the red cars", "the pedestrian in blue", "everything on the road"):
        assert phrase in text
    assert "1 kept, 1 removed" in text and "1 moved" in text
    assert "(dropped)" in text
    assert "answer repaired (code_fence)" in text                           # meta repairs
    assert "boxes matching no step-0 region" in text
    assert "ParseError" in text and "after 6 attempts" in text              # failures.jsonl
    assert "300 in / 120 out" in text                                       # tokens of the step-0 call


class _Cards(HTMLParser):
    """Badges, figure captions and text per image card (``<section id=...>``)."""

    def __init__(self):
        super().__init__()
        self.cards: dict[str, dict] = {}
        self._card: dict | None = None
        self._in: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self._card = self.cards.setdefault(a["id"], {"badges": [], "figures": [], "text": [], "images": []})
        elif self._card is not None:
            if tag == "span" and "badge" in (a.get("class") or ""):
                self._in = "badges"
            elif tag == "figcaption":
                self._in = "figures"
            elif tag == "img":
                self._card["images"].append(a["src"])

    def handle_endtag(self, tag):
        if tag == "section":
            self._card = None
        if tag in ("span", "figcaption"):
            self._in = None

    def handle_data(self, data):
        if self._card is not None:
            self._card["text"].append(data)
            if self._in:
                self._card[self._in].append(data.strip())


def cards(index: Path) -> dict[str, dict]:
    p = _Cards()
    p.feed(index.read_text(encoding="utf-8"))
    return p.cards


def test_image_without_labels_is_badged_no_labels_with_one_plain_picture(run):
    rep = build_preview(run.root, sample=0)
    got = cards(rep.index)
    b = got["b"]
    assert b["badges"] == ["no labels"]                  # not "clean": nothing was checked
    assert b["figures"] == ["the image, no labels"]      # no empty step panels
    assert b["images"] == ["images/b_image.png"]
    text = " ".join(b["text"])
    assert "label file missing or empty" in text
    assert "No phrases" not in text
    with Image.open(rep.index.parent / "images" / "b_image.png") as im:
        assert im.width >= W and max(ImageStat.Stat(im.convert("L")).stddev) > 10  # the photo, shown
    # a labelled image keeps its badges and step panels
    assert got["a"]["badges"] == ["1 warning"] or got["a"]["badges"][0].endswith("warnings")
    assert got["a"]["figures"] == ["step 0 · region_expr", "step 2 · grounding_expr", "step 3 · double_check"]
    assert "1 without labels" in " ".join(parse_index(rep.index).text)


def test_a_step_panel_with_nothing_to_draw_is_skipped_and_said(run):
    # image a's step 2 answer grouped nothing (and step 3 had nothing to check)
    for step in (2, 3):
        rec = run.sink(step).latest()["a"]
        run.sink(step).append({**rec, "expressions": []})
    rep = build_preview(run.root, images=["a"])
    assert sorted(p.name for p in (run.root / "preview" / "images").iterdir()) == ["a_step0.png"]
    a = cards(rep.index)["a"]
    assert a["figures"] == ["step 0 · region_expr"]
    assert "Not drawn, nothing to show: step 2 (no phrases), step 3 (no boxes before or after)." in " ".join(a["text"])


def test_retried_failure_is_not_shown(run):
    run.record_failure(image_id="a", step=0, error="flaky", attempts=1)  # step 0 of a has a record
    rep = build_preview(run.root, images=["a"])
    assert "flaky" not in rep.index.read_text(encoding="utf-8")


def test_images_and_sample_choose_what_is_drawn(run, tmp_path):
    rep = build_preview(run.root, tmp_path / "out", images=["c", "a"])
    assert rep.index == tmp_path / "out" / "index.html"
    assert rep.images == 2
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir())[0].startswith("a_")
    with pytest.raises(ConfigError, match="no image with id zz"):
        build_preview(run.root, images=["zz"])
    assert build_preview(run.root, sample=1).images == 1


def test_choose_ids_spreads_the_sample():
    ids = [f"{i:03d}" for i in range(100)]
    assert choose_ids(ids, sample=5) == ["000", "025", "050", "074", "099"]
    assert choose_ids(ids, sample=0) == ids
    assert choose_ids(ids, sample=500) == ids
    assert choose_ids(ids, images=["050", " 007", "050"]) == ["007", "050"]
    # a stream read once (the seed's sorted ids), with its count: the same picks
    assert choose_ids(iter(ids), sample=5, count=len(ids)) == ["000", "025", "050", "074", "099"]
    assert choose_ids(iter(ids), images=["099"], count=len(ids)) == ["099"]
    with pytest.raises(ConfigError, match=r"no image with id 100, x .*e\.g\. 000"):
        choose_ids(iter(ids), images=["x", "100", "050"], count=len(ids))


def test_step3_changes_kept_removed_moved(run):
    before = run.sink(2).latest()["a"]
    after = run.sink(3).latest()["a"]
    got = {(c["expr"], c["bbox_id"]): c["status"] for c in step3_changes(before, after)}
    assert got[(0, "a/box_0")] == "kept"
    assert got[(0, "a/box_1")] == "removed"
    assert got[(1, "a/box_2")] == "moved"
    assert [got[(2, f"a/box_{k}")] for k in (3, 4, 5, 6)] == ["removed"] * 4


def test_small_boxes_get_tags_outside_without_overlap():
    font = _font(15)
    placer = TagPlacer(600, 300, font)
    small = [(100.0, 100.0, 110.0, 108.0), (112.0, 100.0, 122.0, 108.0), (124.0, 101.0, 130.0, 109.0)]
    rects = [placer.place(Tag(b, [(f"E{i} kept", PALETTE[i])]), small)[0] for i, b in enumerate(small)]
    for r, b in zip(rects, small, strict=True):
        assert not (r[0] >= b[0] and r[2] <= b[2] and r[1] >= b[1] and r[3] <= b[3])  # not inside the box
        assert r[0] >= 0 and r[2] <= 600 and r[1] >= 0 and r[3] <= 300
    for i in range(len(rects)):
        for j in range(i + 1, len(rects)):
            a, b = rects[i], rects[j]
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])
    big = (10.0, 10.0, 400.0, 250.0)
    r, _ = TagPlacer(600, 300, font).place(Tag(big, [("0 truck", PALETTE[0])]))
    assert big[0] <= r[0] and r[2] <= big[2] and big[1] <= r[1] and r[3] <= big[3]  # big box: tag inside


def test_palette_is_okabe_ito_and_text_contrasts():
    assert set(PALETTE) <= set(OKABE_ITO.values()) and len(set(PALETTE)) == 7
    assert text_color(OKABE_ITO["yellow"]) == (0, 0, 0)
    assert text_color(OKABE_ITO["blue"]) == (255, 255, 255)
    assert text_color((0, 0, 0)) == (255, 255, 255)


def test_unreadable_image_is_a_placeholder_not_a_crash(run):
    Path(run.sink(0).latest()["a"]["image_path"]).write_bytes(b"not a png")
    rep = build_preview(run.root, images=["a"])
    assert rep.panels == 3


def test_command(run, tmp_path):
    import typer
    from typer.testing import CliRunner

    app = typer.Typer()
    register(app)
    res = CliRunner().invoke(app, ["--results-dir", str(run.root), "--images", "a,b", "--out", str(tmp_path / "g")])
    assert res.exit_code == 0, res.output
    assert "for 2 of 3 images" in res.output and (tmp_path / "g" / "index.html").is_file()
    res = CliRunner().invoke(app, ["--results-dir", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "not a directory" in res.output


def test_text_with_newlines_and_control_characters_is_drawn_on_one_line(run):
    # A file name (the image id) or a model's answer can hold a newline; Pillow's raqm layout
    # refuses one in a single-line draw, which used to crash the whole gallery.
    assert printable("a\nb\tc\r\x07") == "a\\nb c\\r\\x07"
    sink = run.sink(0)
    rec = sink.latest()["a"]
    rec["regions"][0]["type"] = "Car\nsecond line"
    rec["regions"][0]["description"] = "red\ncar\x00"
    sink.append(rec)
    rep = build_preview(run.root, images=["a"])
    assert rep.panels == 3
    panel = _compose("id\nwith a newline · step 0", Image.new("RGB", (64, 48)), [], "note\nhere")
    assert panel.width >= 64
