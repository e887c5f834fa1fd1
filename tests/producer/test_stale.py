"""The stale count (``producer/stale.py``) over sinks written by the real step functions (the
offline teacher): what the workers' check would redo, step by step, with the cascade."""

from __future__ import annotations

from PIL import Image

from producer.stale import format_stale, stale_report
from worker.clients.offline import OfflineClient
from worker.layout import Layout
from worker.sinks import dumps
from worker.spec import load_spec
from worker.steps import StepOptions, input_record, run_step
from worker.steps.prompts import PROMPT_TEMPLATES

P = "image_referring_expression"


def finished_run(tmp_path, n: int = 3):
    """A results dir whose four step sinks hold every image's records, as a run leaves them."""
    results = tmp_path / "results"
    spec = load_spec(None, [f"results_dir={results}", f"{P}.vlm.backend=offline"])
    layout = Layout(results)
    results.mkdir()
    options = StepOptions.from_vlm(spec.ire.vlm)
    seeds = []
    for i in range(n):
        image = tmp_path / f"img{i}.png"
        Image.new("RGB", (200, 100), (40 * i, 90, 90)).save(image)
        seeds.append({"image_id": f"img{i}", "image_path": str(image), "width": 200, "height": 100,
                      "kitti_bboxes": [[10.0, 10.0, 60.0, 80.0, "Car"]] if i else []})
    layout.seed.path.write_text("".join(dumps(s) + "\n" for s in seeds))
    for seed in seeds:
        recs: dict[int, dict] = {}
        for step in (0, 1, 2, 3):
            recs[step] = run_step(step, input_record(step, seed, recs), OfflineClient(), PROMPT_TEMPLATES,
                                  options=options).record
            layout.sink(step).append(recs[step])
    return spec, layout


def stale_of(report) -> dict[int, tuple[int, int, int]]:
    return {s.step: (s.done, s.stale, s.calls) for s in report.steps}


def test_nothing_is_stale_against_the_spec_that_made_it(tmp_path):
    spec, layout = finished_run(tmp_path)
    report = stale_report(spec, layout, PROMPT_TEMPLATES)
    assert stale_of(report) == {s: (3, 0, 0) for s in range(4)}
    assert "redoing them" not in "\n".join(format_stale(report, spec))


def test_a_new_step_2_prompt_makes_step_2_and_step_3_stale_and_counts_the_calls(tmp_path):
    spec, layout = finished_run(tmp_path)
    templates = {**PROMPT_TEMPLATES, "grounding_expr": "Group carefully.\n" + PROMPT_TEMPLATES["grounding_expr"]}
    report = stale_report(spec, layout, templates)
    # img0 has no boxes: step 2 asks nothing, so its record is current, and so is its step 3.
    assert stale_of(report) == {0: (3, 0, 0), 1: (3, 0, 0), 2: (3, 2, 2), 3: (3, 2, 2)}
    assert report.steps[3].upstream == 2 and report.steps[2].upstream == 0
    assert "redoing them: 4 calls" in "\n".join(format_stale(report, spec))


def test_a_new_model_makes_every_step_stale_and_a_replaced_image_its_own(tmp_path):
    spec, layout = finished_run(tmp_path)
    other = load_spec(None, [f"results_dir={layout.root}", f"{P}.vlm.backend=openai", f"{P}.vlm.openai.model_name=m",
                             f"{P}.vlm.structured_output=off"])
    # img0's step 0 asked nothing (no boxes): no request, nothing a model changes; its step 2
    # reads the caption, which the new model redoes.
    assert {s.step: s.stale for s in stale_report(other, layout, PROMPT_TEMPLATES).steps} == {0: 2, 1: 3, 2: 3, 3: 3}
    Image.new("RGB", (200, 100), (1, 2, 3)).save(tmp_path / "img2.png")
    report = stale_report(spec, layout, PROMPT_TEMPLATES)
    assert {s.step: s.stale for s in report.steps} == {0: 1, 1: 1, 2: 1, 3: 1}


def test_records_without_a_fingerprint_count_as_stale(tmp_path):
    spec, layout = finished_run(tmp_path, n=1)
    rec = next(r for _, r in layout.sink(1).scan())
    del rec["meta"]["step1_image_caption"]["fingerprint"]
    layout.sink(1).append(rec)  # the newest record of img0's step 1 wins
    report = stale_report(spec, layout, PROMPT_TEMPLATES)
    assert (report.steps[1].stale, report.steps[1].no_fingerprint) == (1, 1)
    assert report.steps[2].stale == 1 and report.steps[2].upstream == 1
    assert "carry no fingerprint" in "\n".join(format_stale(report, spec))
