"""End to end on real parts: Redis, two Celery worker processes, the producer CLI, and the
OpenAI SDK talking HTTP to the fake endpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.fleet import producer, wait_until

pytestmark = pytest.mark.integration

STEP_DIRS = ["step_0_region_expr", "step_1_image_caption", "step_2_grounding_expr", "step_3_double_check"]


def openai_args(fake, results: Path, data: tuple[Path, Path], *extra: str) -> list[str]:
    image_dir, label_dir = data
    return [
        "image_referring_expression.vlm.backend=openai",
        f"image_referring_expression.vlm.openai.base_url={fake.openai_base_url}",
        "image_referring_expression.vlm.openai.model_name=fake-vl",
        "image_referring_expression.vlm.openai.timeout=20",
        "image_referring_expression.workflow.output_format=both",
        *extra,
        "--image-dir", str(image_dir), "--label-dir", str(label_dir), "--results-dir", str(results),
    ]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def seeded_ids(results: Path) -> list[str]:
    return sorted(r["image_id"] for r in read_jsonl(results / "seed_annotations.jsonl"))


def status_json(env, results: Path) -> dict:
    return json.loads(producer(env, "status", "--results-dir", str(results), "--json").stdout)


def chord_state_left(redis_client) -> dict[str, int]:
    """Celery's per-task and per-chord keys in Redis, by kind (``.b`` a chord's bit string,
    ``.c`` its claim: worker/result_backend.py)."""
    kinds: dict[str, int] = {}
    for raw in redis_client.scan_iter("celery-task*", count=1000):
        key = raw.decode()
        kind = "task-meta" if key.startswith("celery-task-meta-") else "taskset" + key[-2:] * (key[-2] == ".")
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def calls_counted(redis_client) -> int:
    """Every VLM call the fleet budget has counted, over all minutes (``producer status`` shows the
    last two of these per-minute counters as calls per minute)."""
    return sum(int(redis_client.get(k) or 0) for k in redis_client.scan_iter("refexp:ep:*:calls:*"))


def test_fleet_runs_every_image_once_and_resumes_for_free(fleet, fleet_env, fake_vlm, demo_data, tmp_path,
                                                           redis_client):
    fleet.start(2)
    results = tmp_path / "results"
    producer(fleet_env, "enqueue", *openai_args(fake_vlm, results, demo_data), "--wait", "--timeout", "240")
    # Chord counting ran the body of every image (steps 2 and 3 below) with no task result stored,
    # and left nothing behind: each chord's keys go when its body is sent.
    left = chord_state_left(redis_client)
    assert left == {}, left

    final = read_jsonl(results / "annotations.jsonl")
    ids = seeded_ids(results)
    assert len(ids) >= 45, "the demo data seeds most of its 50 images"
    assert [r["image_id"] for r in final] == ids, fleet.logs()
    for rec in final:
        assert rec["pipeline_steps"] == ["step0_region_expr", "step1_image_caption",
                                         "step2_grounding_expr", "step3_double_check"]
        for n, d in enumerate(STEP_DIRS):
            assert (results / d / "labels" / f"{rec['image_id']}.txt.step{n}").exists()
    with_boxes = [r for r in final if r["kitti_bboxes"]]
    assert with_boxes and all(r["regions"] and r["expressions"] for r in with_boxes)
    assert all(e["verified"] for r in with_boxes for e in r["expressions"])

    st = status_json(fleet_env, results)
    assert st["finished"] is True and st["images"] == len(ids)
    assert {s: (c["done"], c["failed"]) for s, c in st["steps"].items()} == {
        s: (len(ids), 0) for s in ("0", "1", "2", "3")}
    assert len(st["workers"]) == 2

    calls = fake_vlm.stats()["calls"]
    no_box = sum(1 for r in final if not r["kitti_bboxes"])
    assert calls == 4 * len(ids) - 3 * no_box  # steps 0, 2, 3 skip the model without boxes
    # Each worker process adds its calls to the minute's counter about once a second, and by
    # itself a second or two after its last call: idle workers have counted every call.
    wait_until(lambda: calls_counted(redis_client) == calls, 10, f"the {calls} calls to be counted")

    # A second enqueue of the same run: nothing left to do, no VLM call.
    again = producer(fleet_env, "enqueue", *openai_args(fake_vlm, results, demo_data), "--wait", "--timeout", "60")
    assert "enqueued 0 images" in again.stdout
    assert fake_vlm.stats()["calls"] == calls

    # force_reprocess redoes everything, and the output is the same.
    before = (results / "annotations.jsonl").read_bytes()
    producer(fleet_env, "enqueue", *openai_args(fake_vlm, results, demo_data,
                                                "image_referring_expression.workflow.force_reprocess=true"),
             "--wait", "--timeout", "240")
    assert fake_vlm.stats()["calls"] == 2 * calls
    assert (results / "annotations.jsonl").read_bytes() == before
    fleet.stop_all()  # a clean shutdown adds what a worker has not counted yet
    assert calls_counted(redis_client) == 2 * calls


@pytest.mark.parametrize("steps", [[0, 2, 3], [1]])
def test_step_subsets(fleet, fleet_env, fake_vlm, demo_data, tmp_path, steps):
    fleet.start(2)
    results = tmp_path / "results"
    producer(fleet_env, "enqueue", *openai_args(
        fake_vlm, results, demo_data, f"image_referring_expression.workflow.steps=[{','.join(map(str, steps))}]"),
        "--wait", "--timeout", "240")
    final = read_jsonl(results / "annotations.jsonl")
    assert [r["image_id"] for r in final] == seeded_ids(results)
    names = {0: "step0_region_expr", 1: "step1_image_caption", 2: "step2_grounding_expr", 3: "step3_double_check"}
    for rec in final:
        assert rec["pipeline_steps"] == [names[s] for s in steps]
    for n, d in enumerate(STEP_DIRS):
        assert (results / d).exists() == (n in steps)
    if steps == [1]:
        assert all(r["caption"] for r in final)
    else:
        assert all("caption" not in r for r in final)


def test_local_run_matches_the_fleet_byte_for_byte(fleet, fleet_env, fake_vlm, demo_data, tmp_path):
    fleet.start(2)
    fleet_results, local_results = tmp_path / "fleet", tmp_path / "local"
    producer(fleet_env, "enqueue", *openai_args(fake_vlm, fleet_results, demo_data), "--wait", "--timeout", "240")
    local_env = {k: v for k, v in fleet_env.items() if k != "REDIS_URL"}  # `run` needs no server
    producer(local_env, "run", *openai_args(fake_vlm, local_results, demo_data))

    assert (local_results / "annotations.jsonl").read_bytes() == (fleet_results / "annotations.jsonl").read_bytes()
    for d in STEP_DIRS:
        fleet_files = sorted(p.name for p in (fleet_results / d / "labels").iterdir())
        assert fleet_files == sorted(p.name for p in (local_results / d / "labels").iterdir())
        for name in fleet_files:
            fleet_bytes = (fleet_results / d / "labels" / name).read_bytes()
            assert fleet_bytes == (local_results / d / "labels" / name).read_bytes()
