"""``workflow.reprocess: changed`` end to end: real Redis, real Celery workers (or ``producer
run``'s own), the OpenAI SDK against the fake endpoint, which counts the calls of each step.

A re-run redoes exactly the image-steps whose fingerprint differs from what the current spec
would send, and the steps after them; what does not change a request (the timeout) redoes
nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from producer.demo import make_demo_dataset
from tests.support.fleet import producer
from worker.steps.prompts import STRUCTURED_TEMPLATES

pytestmark = pytest.mark.integration

P = "image_referring_expression"
STEPS = ("region_expr", "image_caption", "grounding_expr", "double_check")


def args(fake, results: Path, data: tuple[Path, Path], *extra: str) -> list[str]:
    image_dir, label_dir = data
    return [f"{P}.vlm.backend=openai", f"{P}.vlm.openai.base_url={fake.openai_base_url}",
            f"{P}.vlm.openai.model_name=fake-vl", f"{P}.vlm.openai.timeout=20", *extra,
            "--image-dir", str(image_dir), "--label-dir", str(label_dir), "--results-dir", str(results)]


def calls(fake) -> dict[str, int]:
    """Calls per step since the last reset, every step named (0 when it made none)."""
    by_step = fake.stats()["calls_by_step"]
    assert set(by_step) <= set(STEPS), by_step
    return {s: by_step.get(s, 0) for s in STEPS}


def final(results: Path) -> dict[str, dict]:
    lines = (results / "annotations.jsonl").read_text().splitlines()
    return {r["image_id"]: r for r in map(json.loads, lines)}


def fingerprints(results: Path) -> dict[str, dict[str, str]]:
    return {i: {k: m["fingerprint"] for k, m in r["meta"].items()} for i, r in final(results).items()}


def step3_prompt_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.yaml"
    path.write_text(json.dumps({"double_check_structured": "Be strict about colours.\n"
                                + STRUCTURED_TEMPLATES["double_check_structured"]}))
    return path


def test_changed_redoes_only_what_the_spec_changed(fleet, fleet_env, fake_vlm, tmp_path, redis_client):
    data = make_demo_dataset(tmp_path / "data", n_images=10, seed=3)
    results = tmp_path / "results"
    fleet.start(2)

    def enqueue(*extra: str) -> dict[str, int]:
        fake_vlm.reset()
        producer(fleet_env, "enqueue", *args(fake_vlm, results, data, f"{P}.workflow.reprocess=changed", *extra),
                 "--wait", "--timeout", "240")
        return calls(fake_vlm)

    producer(fleet_env, "enqueue", *args(fake_vlm, results, data), "--wait", "--timeout", "240")
    first = calls(fake_vlm)
    with_boxes = sum(1 for r in final(results).values() if r["kitti_bboxes"])
    assert first == {"region_expr": with_boxes, "image_caption": 10, "grounding_expr": with_boxes,
                     "double_check": with_boxes}, fleet.logs()
    before = fingerprints(results)
    assert all(len(fp) == 16 for per in before.values() for fp in per.values())

    # Nothing changed, or only what no request carries (the timeout): no call, same output.
    assert enqueue() == dict.fromkeys(STEPS, 0), fleet.logs()
    # The checks hashed every image; the hash files went with each image as it settled.
    assert not [p for p in (results / ".image-cache").rglob("*") if p.is_file()]
    assert enqueue(f"{P}.vlm.openai.timeout=45") == dict.fromkeys(STEPS, 0), fleet.logs()
    assert fingerprints(results) == before

    # The step-3 prompt: step 3 alone is asked again, for every image it asks about. The
    # estimate says so first, from the sinks, and prices it from what those calls took.
    prompts = step3_prompt_file(tmp_path)
    est_args = args(fake_vlm, results, data, f"{P}.workflow.prompts_file={prompts}",
                    f"{P}.vlm.prices.input_per_million=1")
    est = json.loads(producer(fleet_env, "estimate", *est_args, "--json").stdout)
    assert {s["step"]: (s["done"], s["stale"], s["calls"]) for s in est["stale"]["steps"]} == {
        0: (10, 0, 0), 1: (10, 0, 0), 2: (10, 0, 0), 3: (10, with_boxes, with_boxes)}
    assert est["stale"]["cost"] > 0 and fake_vlm.stats()["calls"] == 0
    assert enqueue(f"{P}.workflow.prompts_file={prompts}") == {
        "region_expr": 0, "image_caption": 0, "grounding_expr": 0, "double_check": with_boxes}, fleet.logs()
    after = fingerprints(results)
    for image_id, per in after.items():
        assert {k: v for k, v in per.items() if k != "step3_double_check"} == {
            k: v for k, v in before[image_id].items() if k != "step3_double_check"}
        asked = bool(final(results)[image_id]["kitti_bboxes"])  # an image without boxes asks nothing
        assert (per["step3_double_check"] != before[image_id]["step3_double_check"]) == asked

    # The model: all four steps again.
    assert enqueue(f"{P}.workflow.prompts_file={prompts}", f"{P}.vlm.openai.model_name=fake-vl-2") == first
    assert fake_vlm.stats()["requests_by_model"] == {"fake-vl-2": sum(first.values())}
    st = json.loads(producer(fleet_env, "status", "--results-dir", str(results), "--json").stdout)
    assert st["finished"] and {s: c["done"] for s, c in st["steps"].items()} == dict.fromkeys("0123", 10)
    assert all(rec["meta"]["step0_region_expr"].get("call", {}).get("model", "fake-vl-2") == "fake-vl-2"
               for rec in final(results).values())
    # The done marks set aside for the checks are all gone again: Redis holds what it held before.
    assert list(redis_client.scan_iter("refexp:run:*:recheck:*")) == []


def test_force_reprocess_and_reprocess_disagreeing_is_refused(fleet_env, fake_vlm, tmp_path):
    data = make_demo_dataset(tmp_path / "data", n_images=2, seed=3)
    proc = producer(fleet_env, "enqueue", *args(fake_vlm, tmp_path / "results", data,
                                                f"{P}.workflow.force_reprocess=true",
                                                f"{P}.workflow.reprocess=changed"), check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stdout + proc.stderr
    assert f"{P}.workflow.force_reprocess=true" in err and f"{P}.workflow.reprocess=changed" in err
    assert fake_vlm.stats()["calls"] == 0 and not (tmp_path / "results" / "seed_annotations.jsonl").exists()


def test_producer_run_redoes_the_steps_of_a_replaced_image_only(fleet_env, fake_vlm, tmp_path):
    """``producer run`` (its own Redis, rebuilt from the sinks each time) honours it too: an
    image replaced in place (same name and size, other pixels) is asked about again, alone."""
    env = {k: v for k, v in fleet_env.items() if k != "REDIS_URL"}
    data = make_demo_dataset(tmp_path / "data", n_images=6, seed=5)
    results = tmp_path / "results"
    producer(env, "run", *args(fake_vlm, results, data))
    first = calls(fake_vlm)
    records = final(results)
    target = next(i for i, r in sorted(records.items()) if r["kitti_bboxes"])
    path = Path(records[target]["image_path"])

    fake_vlm.reset()
    producer(env, "run", *args(fake_vlm, results, data, f"{P}.workflow.reprocess=changed"))
    assert calls(fake_vlm) == dict.fromkeys(STEPS, 0)

    with Image.open(path) as im:
        flipped = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        flipped.save(path)
    st = json.loads(producer(env, "status", "--results-dir", str(results), "--stale", "--json").stdout)
    assert {s["step"]: s["stale"] for s in st["stale"]["steps"]} == dict.fromkeys(range(4), 1)
    shown = producer(env, "status", "--results-dir", str(results), "--stale").stdout
    assert "workflow.reprocess: changed: a re-run redoes these" in shown and "redoing them: 4 calls" in shown
    fake_vlm.reset()
    producer(env, "run", *args(fake_vlm, results, data, f"{P}.workflow.reprocess=changed"))
    assert calls(fake_vlm) == dict.fromkeys(STEPS, 1), first
    redone = {r.image for r in fake_vlm.requests}
    assert redone == {path.read_bytes()}  # every call was about the replaced image
    before = {i: {k: m["fingerprint"] for k, m in r["meta"].items()} for i, r in records.items()}
    after = fingerprints(results)
    assert {i for i in after if after[i] != before[i]} == {target}


def test_records_made_after_a_schema_fallback_are_kept(fleet_env, tmp_path):
    """An endpoint that refuses response schemas: each new process tries one and falls back to
    the text prompts. The records hold the text request (the mode actually used), and a
    ``changed`` re-run keeps them instead of paying for every image again."""
    from tests.support.fake_vlm import FakeVLM

    env = {k: v for k, v in fleet_env.items() if k != "REDIS_URL"}
    data = make_demo_dataset(tmp_path / "data", n_images=4, seed=5)
    results = tmp_path / "results"
    with FakeVLM(reject_json_schema=True) as fake:
        producer(env, "run", *args(fake, results, data))
        modes = {m["quality"]["mode"] for r in final(results).values() for m in r["meta"].values() if "call" in m}
        assert modes == {"text"}
        assert all(m.get("schema_refused") for r in final(results).values() for k, m in r["meta"].items()
                   if "call" in m and k != "step1_image_caption")  # captions never send a schema
        fake.reset()
        producer(env, "run", *args(fake, results, data, f"{P}.workflow.reprocess=changed"))
        assert calls(fake) == dict.fromkeys(STEPS, 0)


def test_gemini_budgets_as_sent_are_part_of_it(fleet_env, fake_vlm, tmp_path):
    """Through the google-genai SDK: Gemini's first-call budget is sized from the boxes, and the
    check rebuilds it the same way (nothing redone); a new ``max_output_tokens`` changes what is
    sent, so every step that asks is redone; the timeout changes nothing."""
    env = {k: v for k, v in fleet_env.items() if k != "REDIS_URL"} | {"GOOGLE_API_KEY": "test-key"}
    data = make_demo_dataset(tmp_path / "data", n_images=4, seed=9)
    results = tmp_path / "results"
    image_dir, label_dir = data

    def run(*extra: str) -> dict[str, int]:
        fake_vlm.reset()
        producer(env, "run", f"{P}.vlm.backend=gemini", f"{P}.vlm.gemini.base_url={fake_vlm.gemini_base_url}",
                 f"{P}.vlm.gemini.model=gemini-2.5-flash", *extra, "--image-dir", str(image_dir),
                 "--label-dir", str(label_dir), "--results-dir", str(results))
        return calls(fake_vlm)

    first = run()
    assert first["image_caption"] == 4
    assert run(f"{P}.workflow.reprocess=changed", f"{P}.vlm.gemini.timeout=30") == dict.fromkeys(STEPS, 0)
    assert run(f"{P}.workflow.reprocess=changed", f"{P}.vlm.gemini.max_output_tokens=9000") == first
