"""Batch mode end to end: real Redis, real Celery worker processes, the producer CLI, and the
offline teacher as the provider's batch API (``worker/clients/offline_batch.py``), whose jobs
live in a directory every process sees, as a provider's live on its servers."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tests.support.fleet import producer, wait_until
from worker.clients.offline_batch import OfflineBatch
from worker.ledger import Ledger
from worker.settings import API_KEY_VARS

pytestmark = pytest.mark.integration

V = "image_referring_expression.vlm"
API_KEYS = tuple(v for names in API_KEY_VARS.values() for v in names)
# A killed coordinator is replaced within 3 s, and a job it had claimed but not recorded as sent
# is taken over after 15 s (by default: ten leases, at least a minute).
SHORT_LEASE = {"REFEXP_BATCH_LEASE_SECONDS": "3", "REFEXP_BATCH_CLAIM_STALE_SECONDS": "15"}


def batch_args(results: Path, data: tuple[Path, Path], *extra: str) -> list[str]:
    image_dir, label_dir = data
    return [f"{V}.backend=offline", f"{V}.batch.enabled=true", f"{V}.batch.gather_seconds=0.5",
            f"{V}.batch.poll_seconds=0.3", f"{V}.batch.max_requests_per_job=16",
            "image_referring_expression.workflow.output_format=both", *extra,
            "--image-dir", str(image_dir), "--label-dir", str(label_dir), "--results-dir", str(results)]


def without_calls(path: Path) -> list[dict]:
    """Final records without their call meta (tokens and, in batch mode, the batch-priced part)."""
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        for v in (rec.get("meta") or {}).values():
            if isinstance(v, dict):
                v.pop("call", None)
        out.append(rec)
    return out


@pytest.fixture
def batch_env(fleet_env, tmp_path) -> dict[str, str]:
    env = {**fleet_env, "REFEXP_OFFLINE_BATCH_DIR": str(tmp_path / "provider"), **SHORT_LEASE}
    fleet_env.update(env)  # the fleet fixture starts workers with this dict
    return env


def submitted_names(provider: Path) -> list[str]:
    """The display name of every job the provider was sent, in order (one per submit)."""
    log = provider / "submits.log"
    return [line.split()[1] for line in log.read_text().splitlines()] if log.exists() else []


def ledger_jobs(results: Path) -> list:
    return Ledger(results).jobs()


@pytest.fixture(scope="module")
def online(demo_data, tmp_path_factory) -> list[dict]:
    """What every batch run must reproduce: the records of an online ``producer run`` of the same
    data with the same (deterministic) offline teacher. Made once per module, not once per test:
    ``run`` uses an embedded Redis of its own and no batch setting, so no test's environment or
    fault changes it."""
    image_dir, label_dir = demo_data
    out = tmp_path_factory.mktemp("online")
    env = {k: v for k, v in os.environ.items() if k.removesuffix("_FILE") not in (*API_KEYS, "REDIS_PASSWORD")}
    producer({**env, "PYTHONUNBUFFERED": "1"}, "run", f"{V}.backend=offline",
             "image_referring_expression.workflow.output_format=both", "--image-dir", str(image_dir),
             "--label-dir", str(label_dir), "--results-dir", str(out), timeout=300)
    return without_calls(out / "annotations.jsonl")


def test_batch_run_gives_the_online_run_s_outputs(fleet, batch_env, demo_data, tmp_path, online):
    fleet.start(2)
    results = tmp_path / "results"
    producer(batch_env, "enqueue", *batch_args(results, demo_data), "--wait", "--timeout", "240", timeout=300)
    assert without_calls(results / "annotations.jsonl") == online
    # every call went through a provider job, each job was submitted once, and all were released
    jobs = ledger_jobs(results)
    names = submitted_names(tmp_path / "provider")
    assert sorted(names) == sorted(f"refexp-{j.job_id}" for j in jobs if j.provider_id), fleet.logs()
    assert {j.state for j in jobs} == {"released"}
    assert {j.step for j in jobs} == {0, 1, 2, 3}
    assert all(j.n <= 16 for j in jobs)
    for rec in (json.loads(x) for x in (results / "annotations.jsonl").read_text().splitlines()):
        for name in ("step0_region_expr", "step3_double_check"):
            call = rec["meta"].get(name, {}).get("call")
            if call:
                assert call["batch_input_tokens"] == call["input_tokens"]
    st = json.loads(producer(batch_env, "status", "--results-dir", str(results), "--json").stdout)
    assert st["finished"] is True
    assert st["batch"]["jobs"] == {"submitted": 0, "running": 0, "done": len(jobs)}
    assert st["batch"]["requests_in_jobs"] == 0 and st["batch"]["oldest_waiting_s"] is None
    assert (results / "step_2_grounding_expr" / "labels").is_dir()


def test_a_job_that_finishes_while_no_worker_runs_is_collected_not_resubmitted(fleet, batch_env, demo_data,
                                                                               tmp_path):
    # the provider keeps each job running for 4 polls: it finishes only after the worker is gone
    (w,) = fleet.start(1, extra_env={"REFEXP_OFFLINE_BATCH_POLLS": "4"})
    results = tmp_path / "results"
    producer(batch_env, "enqueue", *batch_args(results, demo_data))
    wait_until(lambda: any(j.state == "submitted" for j in ledger_jobs(results)), 120, "a job submitted")
    fleet.kill(w, signal.SIGKILL)
    w.proc.wait()
    submitted_before = submitted_names(tmp_path / "provider")
    assert submitted_before
    fleet.start(1)  # polls once more: the job has finished "at the provider" meanwhile
    producer(batch_env, "wait", "--results-dir", str(results), "--timeout", "240", timeout=300)
    names = submitted_names(tmp_path / "provider")
    assert names[:len(submitted_before)] == submitted_before
    assert len(names) == len(set(names)), "a job was submitted twice"
    jobs = ledger_jobs(results)
    assert sorted(names) == sorted(f"refexp-{j.job_id}" for j in jobs if j.provider_id)
    assert {j.state for j in jobs} == {"released"}
    st = json.loads(producer(batch_env, "status", "--results-dir", str(results), "--json").stdout)
    assert st["finished"] and all(c["failed"] == 0 and c["pending"] == 0 for c in st["steps"].values())


def test_killing_the_coordinating_worker_loses_nothing(fleet, batch_env, demo_data, tmp_path, redis_client, online):
    workers = fleet.start(2, extra_env={"REFEXP_OFFLINE_BATCH_POLLS": "3"})
    results = tmp_path / "results"
    producer(batch_env, "enqueue", *batch_args(results, demo_data))
    wait_until(lambda: sum(j.state != "formed" for j in ledger_jobs(results)) >= 2, 120, "jobs submitted")
    holder = redis_client.get("refexp:batch:lease").decode()
    victim = next(w for w in workers if holder.startswith(f"{w.name}@"))
    fleet.kill(victim, signal.SIGKILL)
    victim.proc.wait()
    producer(batch_env, "wait", "--results-dir", str(results), "--timeout", "240", timeout=300)
    assert without_calls(results / "annotations.jsonl") == online
    names = submitted_names(tmp_path / "provider")
    assert len(names) == len(set(names)), "a job was submitted twice"


def test_a_job_that_expires_whole_is_retried_in_a_new_job(fleet, batch_env, demo_data, tmp_path, online):
    fleet.start(2, extra_env={"REFEXP_OFFLINE_BATCH_END": "expired:1"})
    results = tmp_path / "results"
    producer(batch_env, "enqueue", *batch_args(results, demo_data), "--wait", "--timeout", "240", timeout=300)
    jobs = ledger_jobs(results)
    expired = [j for j in jobs if j.provider_state == "expired"]
    assert len(expired) == 1
    assert not (results / "failures.jsonl").exists() or not (results / "failures.jsonl").read_text().strip()
    # its requests went into a later job of the same step
    again = Ledger(results).requests(expired[0])
    later = {e["image_id"] for j in jobs if j.step == expired[0].step and j.job_id != expired[0].job_id
             for e in Ledger(results).requests(j)}
    assert {e["image_id"] for e in again} <= later
    assert without_calls(results / "annotations.jsonl") == online


def test_expired_jobs_past_max_retries_are_recorded_as_failures(fleet, batch_env, demo_data, tmp_path):
    fleet.start(1, extra_env={"REFEXP_OFFLINE_BATCH_END": "expired"})
    results = tmp_path / "results"
    proc = producer(batch_env, "enqueue", *batch_args(results, demo_data, f"{V}.max_retries=1",
                                                      "image_referring_expression.workflow.steps=[1]"),
                    "--wait", "--timeout", "240", timeout=300, check=False)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    failures = [json.loads(x) for x in (results / "failures.jsonl").read_text().splitlines()]
    assert failures and {f["error"] for f in failures} == {"BatchJobFailed"}
    assert {f["attempts"] for f in failures} == {2}  # the first job, and the one its retry went into


def test_producer_run_with_batch_on(batch_env, demo_data, tmp_path, online):
    results = tmp_path / "local"
    producer(batch_env, "run", *batch_args(results, demo_data), timeout=300)
    assert without_calls(results / "annotations.jsonl") == online
    assert OfflineBatch(directory=tmp_path / "provider").submitted()


def test_batch_on_an_endpoint_without_a_batch_api_fails_before_seeding(batch_env, demo_data, tmp_path):
    results = tmp_path / "results"
    env = {**batch_env, "REFEXP_OFFLINE_BATCH_UNSUPPORTED": "1"}  # the probe answers as vLLM's would
    proc = producer(env, "enqueue", *batch_args(results, demo_data), check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "has no batch API" in proc.stdout + proc.stderr
    assert not (results / "seed_annotations.jsonl").exists()


def test_a_redis_restarted_empty_loses_no_submitted_job(fleet_env, demo_data, tmp_path, online):
    from producer.embedded import RedisServer
    from tests.integration.test_producer_outages import revive_crashed
    from tests.support.fleet import Fleet

    results = tmp_path / "results"
    server = RedisServer().start()
    env = {**fleet_env, "REDIS_URL": server.url, "REFEXP_OFFLINE_BATCH_DIR": str(tmp_path / "provider"),
           **SHORT_LEASE}
    fleet = Fleet(env=env, logdir=tmp_path)
    try:
        fleet.start(2, extra_env={"REFEXP_OFFLINE_BATCH_POLLS": "6"})
        producer(env, "enqueue", *batch_args(results, demo_data))
        wait_until(lambda: any(j.state == "submitted" for j in ledger_jobs(results)), 120, "a job submitted")
        server.stop()
        server = RedisServer(port=server.port).start()
        submitted = {j.job_id for j in ledger_jobs(results) if j.provider_id}
        producer(env, "enqueue", "-c", str(results / "run.spec.yaml"), "--wait", "--timeout", "240", timeout=300)
        revive_crashed(fleet)
        names = submitted_names(tmp_path / "provider")
        assert len(names) == len(set(names)), "a job was submitted twice"
        jobs = {j.job_id: j for j in ledger_jobs(results)}
        assert all(jobs[i].state == "released" for i in submitted), "a job submitted before the restart was lost"
        assert without_calls(results / "annotations.jsonl") == online
    finally:
        fleet.stop_all()
        server.stop()


def test_requests_the_provider_answered_with_an_error_are_parked_again(fleet, batch_env, demo_data, tmp_path, online):
    fleet.start(2, extra_env={"REFEXP_OFFLINE_BATCH_ERRORS": "image_caption:3"})
    results = tmp_path / "results"
    producer(batch_env, "enqueue", *batch_args(results, demo_data), "--wait", "--timeout", "240", timeout=300)
    assert not (results / "failures.jsonl").exists() or not (results / "failures.jsonl").read_text().strip()
    ledger = Ledger(results)
    step1 = [e["image_id"] for j in ledger.jobs() if j.step == 1 for e in ledger.requests(j)]
    assert len(step1) == len(set(step1)) + 3, "the three requests answered 503 went into a later job"
    retried = [e for j in ledger.jobs() if j.step == 1 for e in ledger.requests(j) if e["vlm_retries"]]
    assert len(retried) == 3
    assert without_calls(results / "annotations.jsonl") == online


def test_a_full_results_volume_under_batch_mode_loses_nothing_and_sends_no_job_twice(fleet, batch_env, demo_data,
                                                                                        tmp_path, online):
    """The ledger lives on the results volume: while it is full, parking a request, writing a
    job and writing its answers all fail (a real tmpfs, filled). Tasks retry and the coordinator
    tries again next tick; once space is back the run ends with every image, no failure, and
    every job sent once."""
    from tests.support.faults import fill, tmpfs

    with tmpfs(tmp_path / "vol", "16m") as vol:
        results = vol / "results"
        producer(batch_env, "enqueue", *batch_args(results, demo_data))
        filler = fill(vol)  # not a byte left for the ledger, the sinks or the legacy files
        fleet.start(2)
        wait_until(lambda: sum(w.text().count("No space left on device") for w in fleet.workers) >= 3, 120,
                   "workers to hit the full volume")
        filler.unlink()
        producer(batch_env, "wait", "--results-dir", str(results), "--timeout", "240", timeout=300)
        assert without_calls(results / "annotations.jsonl") == online
        assert not (results / "failures.jsonl").exists() or not (results / "failures.jsonl").read_text().strip()
        names = submitted_names(tmp_path / "provider")
        assert names and len(names) == len(set(names)), "a job was submitted twice"
        assert {j.state for j in ledger_jobs(results)} == {"released"}


def test_a_read_only_results_volume_mid_batch_run_loses_nothing(fleet, batch_env, demo_data, tmp_path, online):
    """The volume turns read-only while jobs are in flight (answers to write, requests to park),
    then writable again: every image ends done, none failed, no job sent twice."""
    from tests.support.faults import remount, tmpfs

    with tmpfs(tmp_path / "vol", "64m") as vol:
        results = vol / "results"
        fleet.start(2, extra_env={"REFEXP_OFFLINE_BATCH_POLLS": "3"})
        producer(batch_env, "enqueue", *batch_args(results, demo_data))
        wait_until(lambda: any(j.state == "submitted" for j in ledger_jobs(results)), 120, "a job submitted")
        remount(vol, "ro")
        try:
            wait_until(lambda: sum(w.text().count("Read-only file system") for w in fleet.workers) >= 2, 120,
                       "workers to hit the read-only volume")
        finally:
            remount(vol, "rw")
        producer(batch_env, "wait", "--results-dir", str(results), "--timeout", "240", timeout=300)
        assert without_calls(results / "annotations.jsonl") == online
        assert not (results / "failures.jsonl").exists() or not (results / "failures.jsonl").read_text().strip()
        names = submitted_names(tmp_path / "provider")
        assert len(names) == len(set(names)), "a job was submitted twice"
