"""The coordinator's desk against a real Redis and a real ledger, with the offline batch backend:
gathering (by size, by age), duplicates, cursors, takeover, submit, poll and collect. Release
(publishing answer tasks) is covered with real workers in tests/integration/test_batch.py."""

from __future__ import annotations

import time

import pytest
from PIL import Image

from worker import context
from worker.budget import FleetBudget
from worker.clients.base import VLMRequest
from worker.clients.offline_batch import OfflineBatch
from worker.context import RunContext
from worker.coordinator import Coordinator, Desk
from worker.images import load_payload
from worker.keys import BATCH_LEASE, run_key
from worker.layout import Layout
from worker.ledger import Ledger
from worker.parking import request_to_json
from worker.runstate import RunState
from worker.spec import load_spec

P = "image_referring_expression.vlm"
REF = "run1:h"


@pytest.fixture
def ctx(tmp_path, redis_client, redis_url):
    results = tmp_path / "results"
    results.mkdir()
    spec = load_spec(None, [f"results_dir={results}", f"{P}.backend=offline", f"{P}.batch.enabled=true",
                            f"{P}.batch.max_requests_per_job=2", f"{P}.batch.gather_seconds=60",
                            f"{P}.batch.poll_seconds=0.01"])
    budget = FleetBudget(redis_client, redis_url, endpoint_key="offline||", max_concurrency=4,
                         requests_per_minute=0, lease_seconds=30)
    c = RunContext(run_id="run1", spec=spec, layout=Layout(results), state=RunState(redis_client, "run1"),
                   spec_hash="h", budget=budget)
    context._CONTEXTS[REF] = c
    yield c
    context.forget_contexts()


def park(ctx: RunContext, image_id: str, image, t: float) -> None:
    req = VLMRequest(image=load_payload(image), prompt="caption", step="image_caption")
    Ledger(ctx.spec.results_dir).park(1, {"key": image_id, "image_id": image_id, "seed_offset": 0, "run_ref": REF,
                                          "step": 1, "vlm_retries": 0, "t": t, "request": request_to_json(req)})


def park_two(ctx: RunContext, tmp_path, now: float) -> None:
    """Two images' step-1 requests parked: one job's worth."""
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 48), (120, 80, 40)).save(image)
    for name in ("a", "b"):
        park(ctx, name, image, now)


def test_gathering_forms_full_jobs_then_old_ones_drops_duplicates_and_survives_takeover(ctx, tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 48), (120, 80, 40)).save(image)
    ledger = Ledger(ctx.spec.results_dir)
    now = time.time()
    for name in ("a", "b", "c", "a"):  # "a" parked twice: a duplicate message
        park(ctx, name, image, now)
    desk = Desk(ledger, lambda c: OfflineBatch(directory=tmp_path / "provider"))
    desk.gather()
    desk.form(now)
    assert [j.n for j in desk.jobs.values()] == [2]  # full jobs only: "c" waits for gather_seconds
    assert sum(len(v) for v in desk.pending.values()) == 1
    # a new coordinator reads the same: one job, "c" gathering, the duplicates still dropped
    park(ctx, "b", image, now)
    again = Desk(ledger, desk.backend_for)
    assert again.waiting == {(1, "a"), (1, "b")}
    again.gather()
    assert [p.entry["image_id"] for items in again.pending.values() for p in items] == ["c"]
    again.form(now + 61)  # "c" has waited gather_seconds
    assert sorted(j.n for j in again.jobs.values()) == [1, 2]
    for job in list(again.jobs.values()):
        again.submit(job)
        assert job.state == "submitted"
        again.poll(job, now + 62)
        assert job.state == "collected"
        answers = [a for _, a in ledger.answers(job)]
        assert [a["key"] for a in answers] == [e["key"] for e in ledger.requests(job)]
        assert all(a["text"] for a in answers)
    assert len(OfflineBatch(directory=tmp_path / "provider").submitted()) == 2
    summary = ctx.state.r.hgetall(run_key("run1", "batch", "jobs"))
    assert len(summary) == 2


def test_one_coordinator_holds_the_lease_until_it_lets_go(redis_client):
    a, b = Coordinator(redis_client, name="a", lease_seconds=5), Coordinator(redis_client, name="b", lease_seconds=5)
    assert a.holds_lease() and a.holds_lease()
    assert not b.holds_lease()
    a.release_lease()
    assert b.holds_lease()
    assert redis_client.get(BATCH_LEASE).decode().startswith("b:")


class OddProvider(OfflineBatch):
    """A provider whose status call breaks for one job (an answer its SDK cannot read)."""

    broken: str = ""

    def status(self, job_id):
        if job_id == self.broken:
            raise RuntimeError("unreadable status")
        return super().status(job_id)


def test_one_broken_job_does_not_stop_the_others(ctx, tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 48), (120, 80, 40)).save(image)
    now = time.time()
    for name in ("a", "b", "c", "d"):
        park(ctx, name, image, now)
    provider = OddProvider(directory=tmp_path / "provider")
    desk = Desk(Ledger(ctx.spec.results_dir), lambda c: provider)
    desk.gather()
    desk.form(now)
    first, second = desk.jobs.values()
    desk.submit(first)
    provider.broken = first.provider_id
    desk.polled[second.job_id] = now + 1  # not due: the tick must not release it (that publishes to a broker)
    desk.tick(now + 1)  # the first job's poll raises; the second is still submitted in the same tick
    assert (first.state, second.state) == ("submitted", "submitted")
    assert first.job_id in desk.noted


def test_an_idle_results_dir_leaves_the_batch_runs_and_a_new_park_brings_it_back(ctx, tmp_path, redis_client):
    from worker.keys import BATCH_RUNS

    image = tmp_path / "a.png"
    Image.new("RGB", (64, 48), (120, 80, 40)).save(image)
    redis_client.sadd(BATCH_RUNS, REF)
    coord = Coordinator(redis_client, name="t", lease_seconds=5,
                        backend_for=lambda c: OfflineBatch(directory=tmp_path / "provider"))
    coord.tick()
    assert not redis_client.exists(BATCH_RUNS)  # nothing parked, no job: no lease held from now on
    park(ctx, "a", image, time.time())  # parked between the removal and the read: found by the read
    (desk,) = coord.desks.values()
    coord.retire_if_idle(desk, [REF])
    assert redis_client.smembers(BATCH_RUNS) == {REF.encode()}


def test_an_expired_job_keeps_the_answers_it_finished_and_retries_only_the_rest(ctx, tmp_path, fake_vlm):
    """OpenAI's Batch API writes the answers a job finished before it expired: they are used, and
    only the others come back as the job's failure (parked again into a new job). Driven through
    the openai SDK against the fake's batch routes."""
    from worker.clients.openai_batch import OpenAIBatch
    from worker.spec import OpenAISpec

    ledger, now = Ledger(ctx.spec.results_dir), time.time()
    park_two(ctx, tmp_path, now)
    spec = OpenAISpec(base_url=fake_vlm.openai_base_url, model_name="fake-vl", api_key="test-key")
    desk = Desk(ledger, lambda c: OpenAIBatch(spec))
    fake_vlm.batch.expire_next(answered=1)
    desk.gather()
    desk.form(now)
    (job,) = desk.jobs.values()
    desk.submit(job)
    desk.poll(job, now + 1)
    assert job.state == "collected" and job.provider_state == "expired"
    answers = {a["key"]: a for _, a in ledger.answers(job)}
    first, second = (e["key"] for e in ledger.requests(job))
    assert answers[first].get("text") and "error" not in answers[first]
    assert answers[second]["error"] == "BatchJobFailed" and "expired" in answers[second]["message"]


@pytest.mark.parametrize("sent_before", [True, False])
def test_a_job_whose_coordinator_died_mid_submit_is_picked_up_not_sent_twice(ctx, tmp_path, sent_before):
    """A coordinator that claimed a job and died before recording the provider's id leaves a
    stale claim. The next one asks the provider for a job under the job's name: one that was
    sent is adopted (no second bill); one that was not is sent now."""
    import os

    ledger, now = Ledger(ctx.spec.results_dir), time.time()
    park_two(ctx, tmp_path, now)
    provider = OfflineBatch(directory=tmp_path / "provider")
    dead = Desk(ledger, lambda c: provider, token="dead", claim_stale_after=5)
    dead.gather()
    dead.form(now)
    (job,) = dead.jobs.values()
    assert ledger.claim_submit(job, "dead", 5) == "new"  # the dead one's claim ...
    if sent_before:  # ... and, maybe, the job it got out before it died
        earlier = provider.submit([], display_name=f"refexp-{job.job_id}")
    claim = ledger.job_dir(job.job_id) / "submit.claim"
    os.utime(claim, (now - 60, now - 60))
    desk = Desk(ledger, lambda c: provider, token="next", claim_stale_after=5)
    desk.gather()
    (job,) = desk.jobs.values()
    desk.submit(job)
    assert job.state == "submitted"
    assert len(provider.submitted()) == 1
    if sent_before:
        assert job.provider_id == earlier
    desk.poll(job, now + 1)
    assert job.state == "collected"


def test_a_claim_is_stale_after_ten_leases_at_least_a_minute_unless_configured(monkeypatch):
    from worker.coordinator import claim_stale_seconds

    monkeypatch.delenv("REFEXP_BATCH_CLAIM_STALE_SECONDS", raising=False)
    assert claim_stale_seconds(30.0) == 300.0
    assert claim_stale_seconds(3.0) == 60.0  # a short lease does not make a slow upload look dead
    monkeypatch.setenv("REFEXP_BATCH_CLAIM_STALE_SECONDS", "15")
    assert claim_stale_seconds(3.0) == 15.0
    monkeypatch.setenv("REFEXP_BATCH_CLAIM_STALE_SECONDS", "0")
    with pytest.raises(ValueError, match="REFEXP_BATCH_CLAIM_STALE_SECONDS must be at least 1"):
        claim_stale_seconds(3.0)
