"""Batch mode through the providers' SDKs: real Redis, real Celery workers, the producer CLI, and
the official openai / google-genai clients talking to the fake endpoint's batch and file routes
(tests/support/fake_batch.py). tests/integration/test_batch.py covers the flow's faults with the
offline teacher's batch backend; this file shows the same flow drives Gemini's Batch Mode and
OpenAI's Batch API, a failed line and an expired job included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.fleet import producer
from worker.ledger import Ledger

pytestmark = pytest.mark.integration

P = "image_referring_expression"
V = f"{P}.vlm"


def backend_args(backend: str, fake) -> list[str]:
    if backend == "openai":
        return [f"{V}.backend=openai", f"{V}.openai.base_url={fake.openai_base_url}",
                f"{V}.openai.model_name=fake-vl"]
    return [f"{V}.backend=gemini", f"{V}.gemini.base_url={fake.gemini_base_url}",
            f"{V}.gemini.model=gemini-2.5-flash"]


@pytest.mark.parametrize("backend", ["openai", "gemini"])
def test_a_batch_run_through_the_provider_sdk_finishes_every_image(fleet, fleet_env, fake_vlm, demo_data, tmp_path,
                                                                   backend):
    image_dir, label_dir = demo_data
    key = {"OPENAI_API_KEY": "test-key"} if backend == "openai" else {"GOOGLE_API_KEY": "test-key"}
    fleet.start(2, extra_env={**key, "REFEXP_BATCH_LEASE_SECONDS": "3",
                                   "REFEXP_BATCH_CLAIM_STALE_SECONDS": "15"})
    fake_vlm.batch.finish_after(1)     # every job is seen running once before it ends
    fake_vlm.batch.fail_line(0, 429)   # the first job's first request is refused: asked again in a later job
    fake_vlm.batch.expire_next(answered=3)  # ... and the first job expires with three answers
    results = tmp_path / "results"
    producer(fleet_env, "enqueue", *backend_args(backend, fake_vlm), f"{V}.batch.enabled=true",
             f"{V}.batch.gather_seconds=0.5", f"{V}.batch.poll_seconds=0.3", f"{V}.batch.max_requests_per_job=16",
             "--image-dir", str(image_dir), "--label-dir", str(label_dir), "--results-dir", str(results),
             "--wait", "--timeout", "240", timeout=300)
    final = [json.loads(line) for line in (results / "annotations.jsonl").read_text().splitlines()]
    n_images = len(list(Path(image_dir).iterdir()))
    assert len(final) == n_images, fleet.logs()
    assert fake_vlm.stats()["calls"] == 0, "a call went online"  # re-asks would; the fake answers parse
    jobs = Ledger(results).jobs()
    assert {j.state for j in jobs} == {"released"} and {j.step for j in jobs} == {0, 1, 2, 3}
    created = fake_vlm.batch.calls["openai.batches.create" if backend == "openai" else "gemini.create"]
    assert created == len([j for j in jobs if j.provider_id]) and created > 4  # the retried ones went in later jobs
    for rec in final:
        for step_meta in rec["meta"].values():
            call = step_meta.get("call") if isinstance(step_meta, dict) else None
            if call:
                assert call["batch_input_tokens"] == call["input_tokens"] > 0
    st = json.loads(producer(fleet_env, "status", "--results-dir", str(results), "--json").stdout)
    assert st["finished"] and all(c["failed"] == 0 for c in st["steps"].values())
    assert st["batch"]["jobs"]["done"] == len(jobs)
