"""The batch ledger on disk: parked requests, cursors, jobs and answers (no Redis, no Celery)."""

from __future__ import annotations

import json
import os

from worker.ledger import Ledger


def entry(image_id: str, step: int = 0) -> dict:
    return {"key": image_id, "image_id": image_id, "seed_offset": 0, "run_ref": "run:hash", "step": step,
            "vlm_retries": 0, "t": 1.0, "request": {"prompt": "p"}}


def test_parked_requests_read_back_in_order_and_only_past_the_position(tmp_path):
    ledger = Ledger(tmp_path)
    for i in range(3):
        ledger.park(0, entry(f"img{i}"))
    ledger.park(2, entry("img9", step=2))
    got = list(ledger.read_parked({}))
    assert [(p.key, p.entry["image_id"]) for p in got] == [((0, "img0"), "img0"), ((0, "img1"), "img1"),
                                                          ((0, "img2"), "img2"), ((2, "img9"), "img9")]
    positions = {got[1].part: got[1].end}
    assert [p.entry["image_id"] for p in ledger.read_parked(positions)] == ["img2", "img9"]


def test_a_line_being_written_waits_and_a_torn_line_is_sealed_and_skipped(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.park(0, entry("a"))
    part = ledger.part_path(0)
    with open(part, "ab") as f:
        f.write(b'{"image_id": "half')  # a writer cut off mid-line (or still writing)
    assert [p.entry["image_id"] for p in ledger.read_parked({})] == ["a"]
    ledger.park(0, entry("b"))  # seals the torn line with a newline first
    got = list(ledger.read_parked({}))
    assert [p.entry.get("image_id") for p in got] == ["a", None, "b"]
    assert got[-1].end == os.path.getsize(part)


def test_cursors_round_trip(tmp_path):
    ledger = Ledger(tmp_path)
    assert ledger.cursors() == {}
    ledger.save_cursors({"requests/step_0/x.jsonl": 120})
    assert ledger.cursors() == {"requests/step_0/x.jsonl": 120}


def test_a_job_keeps_its_requests_and_answers_at_their_offsets(tmp_path):
    ledger = Ledger(tmp_path)
    job = ledger.create_job(1, "run:hash", [entry("a", 1), entry("b", 1)])
    assert job.state == "formed" and job.n == 2 and job.job_id.startswith("s1-")
    assert [e["image_id"] for e in ledger.requests(job)] == ["a", "b"]
    job.state, job.provider_id = "submitted", "prov-1"
    ledger.save(job)
    (again,) = ledger.jobs()
    assert (again.state, again.provider_id) == ("submitted", "prov-1")
    offsets = ledger.write_answers(job, [{"key": "a", "text": "x"}, {"key": "b", "error": "ClientError"}])
    assert [ledger.answer_at(job.job_id, o)["key"] for o in offsets] == ["a", "b"]
    assert [(o, a["key"]) for o, a in ledger.answers(job)] == list(zip(offsets, ["a", "b"], strict=True))


def test_a_job_folder_without_its_record_is_not_a_job(tmp_path):
    ledger = Ledger(tmp_path)
    (ledger.root / "jobs" / "s0-broken").mkdir(parents=True)
    (ledger.root / "jobs" / "s0-broken" / "requests.jsonl").write_text(json.dumps(entry("a")) + "\n")
    assert ledger.jobs() == []
