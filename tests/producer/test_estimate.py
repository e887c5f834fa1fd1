"""``producer estimate``: calls from the labels, tokens from the spec or a sample run, cost."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from producer.demo import make_demo_dataset
from producer.estimate import LinearTokens, estimate, fit, image_tokens, register, scan_dataset
from tests.producer.test_preview import BOXES, make_run
from worker.clients.offline import OfflineClient
from worker.errors import ConfigError
from worker.kitti import parse_kitti
from worker.spec import load_spec
from worker.steps import input_record, run_step
from worker.steps.prompts import PROMPT_TEMPLATES
from worker.steps.records import SOURCE


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, Path]:
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_images=6, seed=0)


def spec_for(images: Path, labels: Path, *extra: str):
    return load_spec(None, [f"image_referring_expression.data.image_dir={images}",
                            f"image_referring_expression.data.kitti_label_dir={labels}", *extra])


def boxes_per_image(images: Path, labels: Path) -> dict[str, int]:
    out = {}
    for p in sorted(images.iterdir()):
        label = labels / f"{p.stem}.txt"
        text = label.read_text() if label.exists() else ""
        out[p.stem] = len(parse_kitti(text, width=1242, height=375).boxes)
    return out


def test_calls_per_step_follow_the_labels(demo):
    images, labels = demo
    counts = boxes_per_image(images, labels)
    with_boxes = sum(1 for n in counts.values() if n)
    assert 0 < with_boxes < len(counts)   # the demo has images without boxes
    e = estimate(spec_for(images, labels, "image_referring_expression.vlm.backend=offline"), sample=0)
    assert e.images == len(counts)
    assert {s.step: s.calls for s in e.steps} == {0: with_boxes, 1: len(counts), 2: with_boxes, 3: with_boxes}
    assert e.boxes_per_image_with_boxes == pytest.approx(sum(counts.values()) / with_boxes, abs=0.01)
    only = estimate(spec_for(images, labels, "image_referring_expression.vlm.backend=offline",
                             "image_referring_expression.workflow.steps=[1]"), sample=0)
    assert [s.step for s in only.steps] == [1]


def test_spec_prompt_tokens_match_the_real_prompt(demo):
    """Offline counts 4 characters a token and no image tokens: the step-0 estimate is exact."""
    images, labels = demo
    spec = spec_for(images, labels, "image_referring_expression.vlm.backend=offline")
    e = estimate(spec, sample=0)
    client = OfflineClient()
    measured = []
    for p in sorted(images.iterdir()):
        label = labels / f"{p.stem}.txt"
        boxes = parse_kitti(label.read_text() if label.exists() else "", width=1242, height=375).boxes
        if not boxes:
            continue
        seed = {"image_id": p.stem, "image_path": str(p), "width": 1242, "height": 375,
                "kitti_bboxes": [[*b["bbox"], b["type"]] for b in boxes], "source": SOURCE, "pipeline_steps": []}
        out = run_step(0, input_record(0, seed, {}), client, PROMPT_TEMPLATES)
        measured.append(out.record["meta"]["step0_region_expr"]["call"]["input_tokens"])
    step0 = next(s for s in e.steps if s.step == 0)
    assert step0.input_tokens == pytest.approx(sum(measured), rel=0.02)
    assert all(s.input_tokens > 0 and s.output_tokens > 0 for s in e.steps)


def test_from_results_uses_measured_usage(tmp_path):
    run = make_run(tmp_path / "pilot")
    labels = tmp_path / "labels"
    labels.mkdir()
    for stem, boxes in (("a", BOXES), ("c", BOXES[:1])):
        (labels / f"{stem}.txt").write_text("".join(f"{b[4]} 0 0 0 {b[0]} {b[1]} {b[2]} {b[3]} 1 1 1 0 0 0 0\n"
                                                    for b in boxes))
    spec = spec_for(tmp_path / "pilot" / "images", labels, "image_referring_expression.vlm.prices.input_per_million=2",
                    "image_referring_expression.vlm.prices.output_per_million=10")
    e = estimate(spec, sample=0, from_results=run.root)
    steps = {s.step: s for s in e.steps}
    # make_run's calls: step 0 300 in / 120 out (a, c), step 1 90 / 40 (a, b, c), step 2 400 / 60, step 3 350 / 50 (a)
    assert (steps[0].calls, steps[0].input_per_call, steps[0].output_per_call) == (2, 300, 120)
    assert (steps[1].calls, steps[1].input_tokens, steps[1].output_tokens) == (3, 270, 120)
    assert (steps[2].calls, steps[2].input_tokens) == (2, 800)
    assert steps[3].output_tokens == 100
    assert e.input_tokens == 600 + 270 + 800 + 700
    assert e.cost == pytest.approx((e.input_tokens * 2 + e.output_tokens * 10) / 1e6)
    assert "sample run" in e.source


def test_from_results_without_usage_is_an_error(tmp_path, demo):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no call usage"):
        estimate(spec_for(*demo), from_results=tmp_path / "empty")


def test_sample_scales_to_the_dataset(demo):
    images, labels = demo
    full = estimate(spec_for(images, labels), sample=0)
    part = estimate(spec_for(images, labels), sample=3)
    assert part.images == full.images and part.sampled == 3
    assert next(s for s in part.steps if s.step == 1).calls == full.images


def test_image_token_rules():
    def vlm(*overrides: str):
        return load_spec(None, [f"image_referring_expression.vlm.{o}" for o in overrides]).ire.vlm

    assert image_tokens(vlm("backend=offline"), 1242, 375)[0] == 0
    assert image_tokens(vlm("gemini.model=gemini-3-flash", "gemini.media_resolution=MEDIA_RESOLUTION_LOW"),
                        1242, 375)[0] == 280
    assert image_tokens(vlm("gemini.model=gemini-3-pro", "gemini.media_resolution=MEDIA_RESOLUTION_HIGH"),
                        1242, 375)[0] == 1120
    assert image_tokens(vlm("gemini.model=gemini-2.5-flash", "gemini.media_resolution=MEDIA_RESOLUTION_LOW"),
                        1242, 375)[0] == 64
    assert image_tokens(vlm("gemini.model=gemini-2.5-flash", "gemini.media_resolution=MEDIA_RESOLUTION_HIGH"),
                        1242, 375)[0] == 2 * 258
    assert image_tokens(vlm("backend=openai", "openai.model_name=gpt-4o"), 1242, 375)[0] == 85 + 170 * 3
    assert image_tokens(vlm("backend=openai", "openai.model_name=Qwen/Qwen2.5-VL-7B-Instruct"), 1242, 375)[0] == 572


def test_fit():
    line = fit([(1, 110), (2, 120), (4, 140)])
    assert (line.a, line.b) == (pytest.approx(100), pytest.approx(10))
    assert fit([(3, 50), (3, 70)]) == LinearTokens(60)
    assert fit([(1, 100), (2, 10)]) == LinearTokens(55)      # a negative slope falls back to the mean
    assert fit([]).at(5) == 0


def test_command(demo):
    images, labels = demo
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    res = runner.invoke(app, ["image_referring_expression.vlm.backend=offline", "--image-dir", str(images),
                              "--label-dir", str(labels), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["images"] == 6 and [s["step"] for s in data["steps"]] == [0, 1, 2, 3]
    res = runner.invoke(app, ["--image-dir", str(images), "--label-dir", str(labels),
                              "image_referring_expression.vlm.prices.input_per_million=1"])
    assert res.exit_code == 0 and "cost:" in res.output and "step" in res.output
    res = runner.invoke(app, ["--image-dir", "/nonexistent/images"])
    assert res.exit_code == 2 and "not a directory" in res.output


# --------------------------------------------------------------------------- token accounting


class UsageClient:
    """A client that answers a caption and reports usage under the OpenAI names."""

    name = "usage"

    def generate(self, request):
        from worker.clients.base import VLMResponse

        return VLMResponse(text="A road.", model="fake-vl", finish_reason="stop",
                           usage={"prompt_tokens": 321, "completion_tokens": 7, "image_tokens": 258})


def test_run_step_records_the_call_usage(tmp_path):
    from PIL import Image

    path = tmp_path / "x.png"
    Image.new("RGB", (64, 32)).save(path)
    seed = {"image_id": "x", "image_path": str(path), "width": 64, "height": 32, "kitti_bboxes": [],
            "source": SOURCE, "pipeline_steps": []}
    out = run_step(1, seed, UsageClient(), PROMPT_TEMPLATES)
    call = out.record["meta"]["step1_image_caption"]["call"]
    assert {k: call[k] for k in ("model", "input_tokens", "output_tokens", "image_tokens")} == {
        "model": "fake-vl", "input_tokens": 321, "output_tokens": 7, "image_tokens": 258}
    assert isinstance(call["latency_s"], float) and call["latency_s"] >= 0
    assert out.record["caption"] == "A road."
    empty = run_step(0, seed, UsageClient(), PROMPT_TEMPLATES)       # no boxes: no call, no usage
    assert "call" not in empty.record.get("meta", {}).get("step0_region_expr", {})


def test_finalize_drops_latency_and_sums_usage(tmp_path):
    from producer.finalize import finalize
    from producer.usage import format_usage

    layout = make_run(tmp_path)
    final = layout.final.read_text()
    assert '"call":' in final and "latency_s" not in final
    assert "latency_s" in layout.sink(3).path.read_text()       # the sinks keep it
    rep = finalize(layout, [0, 1, 2, 3], prices={"input_per_million": 1.0, "output_per_million": 2.0})
    assert layout.final.read_text() == final                     # same bytes again
    u = rep.usage
    assert u["steps"]["0"]["calls"] == 2 and u["steps"]["0"]["images"] == 3
    assert u["steps"]["0"]["input_tokens"] == 600 and u["steps"]["0"]["input_tokens_per_image"] == 200
    assert u["steps"]["1"]["calls"] == 3 and u["steps"]["1"]["output_tokens"] == 120
    assert u["total"]["input_tokens"] == 600 + 270 + 400 + 350
    assert u["total"]["cost"] == pytest.approx((1620 * 1.0 + (240 + 120 + 60 + 50) * 2.0) / 1e6)
    lines = format_usage(u)
    assert any(line.strip().startswith("step 0") and "per image: in 200" in line for line in lines)
    assert lines[-1].strip().startswith("total")


def test_status_shows_live_token_counts(redis_client):
    from producer.status import format_status, status
    from worker.runstate import RunState

    state = RunState(redis_client, "r1")
    spec = load_spec(None, ["image_referring_expression.vlm.prices.input_per_million=1",
                            "image_referring_expression.vlm.prices.output_per_million=1"]).public_dict()
    state.store_spec("h", spec, {"images": 2, "steps": [0, 1], "spec_hash": "h", "enqueue_complete": True})
    for image_id in ("a", "b"):
        state.mark_done(1, image_id, 0)
        state.add_usage(1, {"model": "m", "input_tokens": 100, "output_tokens": 20, "latency_s": 0.25})
    state.mark_done(0, "a", 0)
    state.add_usage(0, {"model": "m", "input_tokens": 500, "output_tokens": 80, "thinking_tokens": 30,
                        "latency_s": 1.0})
    st = status(state)
    u = st["usage"]
    assert u["steps"]["1"] == {**u["steps"]["1"], "calls": 2, "images": 2, "input_tokens": 200,
                               "input_tokens_per_image": 100.0, "latency_s_per_call": 0.25}
    assert u["steps"]["0"]["thinking_tokens"] == 30
    assert u["total"]["cost"] == pytest.approx((700 + 120 + 30) / 1e6)
    text = format_status(st)
    assert "tokens" in text and "per image: in 100" in text


def test_from_results_of_the_offline_teacher_says_so(tmp_path):
    """Through the real ``producer`` command: a demo run measured against a Gemini spec is named
    as the offline teacher's figures, with no image-token claim and no made-up cost."""
    import os

    from tests.producer.test_export import offline_run
    from tests.support.fleet import ROOT, producer

    layout = offline_run(tmp_path, n_images=4)
    data = tmp_path / "data"
    args = ("estimate", "-c", str(ROOT / "configs" / "gemini.yaml"), "--image-dir", str(data / "images"),
            "--label-dir", str(data / "labels"), "--from-results", str(layout.root),
            "image_referring_expression.vlm.prices.input_per_million=0.1",
            "image_referring_expression.vlm.prices.output_per_million=0.4")
    out = producer(dict(os.environ), *args).stdout
    assert "spec: gemini gemini-" in out.splitlines()[0]
    assert "answered by the offline teacher (not a model)" in out
    assert "image tokens: measured" not in out
    assert "image tokens: none: the offline teacher counts only text" in out
    assert "cost: not estimated (the figures come from the offline teacher" in out
    assert "note: these figures come from the offline teacher, not gemini-" in out
    as_json = json.loads(producer(dict(os.environ), *args, "--json").stdout)
    assert as_json["measured_on"] == ["offline"] and as_json["cost"] is None
    # the same run measured for an offline spec is simply the offline teacher's figures
    same = producer(dict(os.environ), *args, "image_referring_expression.vlm.backend=offline").stdout
    assert "spec: offline teacher" in same and "note: these figures" not in same


def test_from_results_names_the_measured_model(tmp_path):
    run = make_run(tmp_path / "pilot")                 # its calls were answered by "fake-vl"
    images = tmp_path / "pilot" / "images"
    e = estimate(spec_for(images, tmp_path, "image_referring_expression.vlm.prices.input_per_million=2",
                          "image_referring_expression.vlm.prices.output_per_million=10"), sample=0,
                 from_results=run.root)
    assert e.measured_on == ["fake-vl"] and "answered by fake-vl" in e.source
    assert any("measured on fake-vl, but the spec asks for gemini-" in n for n in e.notes)
    assert e.cost is not None  # a model's figures: priced
    same = estimate(spec_for(images, tmp_path, "image_referring_expression.vlm.gemini.model=fake-vl"), sample=0,
                    from_results=run.root)
    assert not any("measured on" in n for n in same.notes)


def test_downscale_counts_image_tokens_at_the_sent_size(demo):
    """Qwen-VL tokens grow with pixels: 1242x375 sent at <= 120,000 pixels is 630x190 -> 22x7 patches."""
    images, labels = demo
    base = ["image_referring_expression.vlm.backend=openai",
            "image_referring_expression.vlm.openai.model_name=Qwen/Qwen2.5-VL-7B-Instruct"]
    full = estimate(spec_for(images, labels, *base), sample=0)
    small = estimate(spec_for(images, labels, *base, "image_referring_expression.vlm.downscale_to_pixels=120000"),
                     sample=0)
    per_image_full = 44 * 13  # round(1242/28) x round(375/28)
    per_image_small = 22 * 7  # round(630/28) x round(190/28)
    for f, s in zip(full.steps, small.steps, strict=True):
        assert f.calls == s.calls
        assert f.input_per_call - s.input_per_call == pytest.approx(per_image_full - per_image_small, abs=2)
    assert "downscale_to_pixels=120000" in small.image_rule and "downscale" not in full.image_rule


def test_even_sample_holds_at_most_twice_the_sample_and_spreads_it():
    """The jsonl is streamed: at most 2 x sample records held, the chosen ones spread over all."""
    from producer.estimate import EvenSample

    for n, sample in ((10_000, 10), (1_001, 7), (5, 10), (64, 1)):
        kept, peak = EvenSample(sample), 0
        for i in range(n):
            kept.add(i)
            peak = max(peak, len(kept.kept))
        got = kept.result()
        assert kept.seen == n and peak <= 2 * max(sample, 1)
        assert len(got) == min(n, sample) and got[0] == 0 and got == sorted(got)
        if 1 < sample < n:
            gaps = [b - a for a, b in itertools.pairwise(got)]
            assert max(gaps) <= 2 * n / (sample - 1) and got[-1] >= n // 2, (n, sample, got)
    every = EvenSample(0)
    for i in range(100):
        every.add(i)
    assert every.result() == list(range(100))


def test_estimate_of_a_jsonl_samples_records_spread_over_the_file(tmp_path):
    png = tmp_path / "a.png"
    Image.new("RGB", (40, 30)).save(png)
    with open(tmp_path / "in.jsonl", "w") as f:
        for i in range(500):
            f.write(json.dumps({"image_id": f"im{i:04d}", "image_path": "a.png", "width": 40, "height": 30,
                                "kitti_bboxes": [[1, 1, 5, 5, "Car"]] * (1 + i % 3)}) + "\n")
    spec = load_spec(None, [f"results_dir={tmp_path / 'r'}",
                            f"image_referring_expression.data.input_annotations_jsonl={tmp_path / 'in.jsonl'}"])
    scan = scan_dataset(spec, 9)
    ids = [r["image_id"] for r in scan.sampled]
    assert scan.images == 500 and len(ids) == 9 and ids[0] == "im0000" and int(ids[-1][2:]) >= 400
