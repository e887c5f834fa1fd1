"""Nothing stranded, nothing lost: the results volume full or read-only, a config edited under
the fleet, Redis full, stalled or emptied, and images stranded on purpose.

Every test injects its fault for real (a tmpfs of a few MB, a remount, SIGSTOP, a Redis at its
``maxmemory``), against real worker processes and the OpenAI SDK talking to the fake endpoint,
and ends with every image done (or in failures.jsonl), annotations.jsonl complete, and no manual
Redis command. The figures each prints (calls repeated, time to recover) are in the closing notes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.integration.test_faults import (
    SHORT_VT,
    assert_finalized_once,
    done_ids,
    failures,
    hash_ids,
    job,
    normal_calls,
    run_state,
    seed_records,
    sink_lines,
    status_json,
)
from tests.support.faults import PrivateRedis, fill, remount, tmpfs
from tests.support.fleet import producer, wait_until
from worker.constants import SEED_ORDINAL
from worker.sinks import JsonlSink, ReadStats
from worker.stepdefs import step_dir_name

pytestmark = pytest.mark.integration

STEPS = (0, 1, 2, 3)
WORKER_ENV = {"REFEXP_VISIBILITY_TIMEOUT": SHORT_VT}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """8 drawn road scenes with KITTI labels (one has no label file, so no boxes)."""
    from producer.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("settle-data"), n_images=8, seed=11)


def baseline_calls(results: Path) -> int:
    return sum(normal_calls(r) for r in seed_records(results))


def assert_sinks_clean(results: Path, ids: list[str]) -> None:
    """No torn or corrupt line in any sink, and every image has its record in each."""
    for s in STEPS:
        stats = ReadStats()
        latest = JsonlSink(results / step_dir_name(s) / "annotations.jsonl").latest_offsets(stats)
        assert stats.bad_lines == 0, f"step {s}: {stats.bad_lines} torn or corrupt lines"
        assert sorted(latest) == sorted(ids), f"step {s}: missing {sorted(set(ids) - set(latest))}"


def assert_legacy_complete(results: Path, ids: list[str], seeds: dict[str, dict]) -> None:
    for s in STEPS:
        for i in ids:
            path = results / step_dir_name(s) / "labels" / f"{i}.txt.step{s}"
            assert path.exists(), f"{path} missing"


def wait_to_the_end(env: dict, results: Path, timeout: float, started: float) -> tuple[list[str], float]:
    """``producer wait`` as a user would, then the guarantee: every image in annotations.jsonl once,
    nothing in failures.jsonl (these faults are not image failures). Returns the image ids and the
    seconds since ``started`` (the fault clearing)."""
    producer(env, "wait", "--results-dir", str(results), "--timeout", str(timeout))
    recovered = time.monotonic() - started
    ids = [r["image_id"] for r in seed_records(results)]
    assert_finalized_once(results, ids)
    assert failures(results) == [], "a fault of the infrastructure is not an image failure"
    return ids, recovered


def worker_logs(fleet) -> str:
    return "\n".join(w.text() for w in fleet.workers)


def test_results_volume_full_mid_run_then_freed(fleet, fleet_env, fake_vlm, data, tmp_path):
    with tmpfs(tmp_path / "vol", "2m") as vol:
        results = vol / "results"
        fake_vlm.latency = 0.05
        producer(fleet_env, "enqueue", *job(fake_vlm, data, results,
                                            "image_referring_expression.workflow.output_format=both"))
        filler = fill(vol)  # not one byte left: every sink, legacy and failures write fails
        fleet.start(2, concurrency=4, extra_env=WORKER_ENV)
        wait_until(lambda: worker_logs(fleet).count("No space left on device") >= 6, 60,
                   "workers to hit the full disk a few times")
        calls_while_full = fake_vlm.stats()["calls"]
        started = time.monotonic()
        filler.unlink()
        ids, recovered = wait_to_the_end(fleet_env, results, 90, started)
        seeds = {r["image_id"]: r for r in seed_records(results)}
        assert_sinks_clean(results, ids)
        assert_legacy_complete(results, ids, seeds)
        calls = fake_vlm.stats()["calls"]
        assert calls == baseline_calls(results), "an answer that could not be written was paid for again"
        assert "the answer is kept: no new call" in worker_logs(fleet)
        assert not list(results.rglob(".*.tmp")), "temporary files left behind"
        print(f"disk full: {len(ids)} done, 0 failed, 0 stranded; {calls - baseline_calls(results)} calls "
              f"repeated ({calls_while_full} made while full); recovered {recovered:.1f} s after space was freed")


def test_results_volume_read_only_for_a_while(fleet, fleet_env, fake_vlm, data, tmp_path):
    with tmpfs(tmp_path / "vol", "64m") as vol:
        results = vol / "results"
        # Long enough that the run is still writing when the remount lands: the remount waits
        # for `producer status` (a process start) to see a first image-step, and at 0.2 s the
        # whole run could finish first (0 errors to wait for; seen once appends got faster).
        fake_vlm.latency = 1.0
        fleet.start(2, concurrency=4, extra_env=WORKER_ENV)
        producer(fleet_env, "enqueue", *job(fake_vlm, data, results,
                                            "image_referring_expression.workflow.output_format=both"))
        wait_until(lambda: status_json(fleet_env, results)["steps"]["0"]["done"] >= 1, 60, "a first image-step")
        remount(vol, "ro")
        try:
            wait_until(lambda: worker_logs(fleet).count("Read-only file system") >= 4, 60,
                       "workers to hit the read-only volume")
        finally:
            remount(vol, "rw")
        ids, recovered = wait_to_the_end(fleet_env, results, 90, time.monotonic())
        assert_sinks_clean(results, ids)
        calls = fake_vlm.stats()["calls"]
        assert calls == baseline_calls(results), "an answer that could not be written was paid for again"
        print(f"read-only volume: {len(ids)} done, 0 failed, 0 stranded; {calls - baseline_calls(results)} calls "
              f"repeated; recovered {recovered:.1f} s after the remount")


def test_prompts_file_edited_under_the_fleet_changes_nothing_enqueued(fleet, fleet_env, fake_vlm, data, tmp_path):
    prompts = tmp_path / "prompts.yaml"
    marker = "You are an AI visual assistant that specializes in captions (custom)."
    prompts.write_text(json.dumps({"image_caption": marker}))
    results = tmp_path / "results"
    producer(fleet_env, "enqueue", *job(fake_vlm, data, results,
                                        f"image_referring_expression.workflow.prompts_file={prompts}"))
    prompts.write_text("image_caption: [this is: not: a template\n")  # broken before any worker starts
    fleet.start(2, concurrency=4, extra_env=WORKER_ENV)
    producer(fleet_env, "wait", "--results-dir", str(results), "--timeout", "90")
    ids = [r["image_id"] for r in seed_records(results)]
    assert_finalized_once(results, ids)
    assert failures(results) == []
    captions = [r.prompt for r in fake_vlm.requests if r.prompt.startswith("You are an AI visual assistant that")]
    assert captions and all(p.startswith(marker) for p in captions), "workers must use the prompts enqueued"


def _private_fleet(fleet, fleet_env, server: PrivateRedis) -> dict[str, str]:
    env = {**fleet_env, "REDIS_URL": server.url}
    fleet.env = env
    return env


def _fill_redis(client, chunk: int = 64 * 1024) -> int:
    """Write junk until Redis refuses (``maxmemory`` with ``noeviction``); returns the keys written."""
    import redis as redis_lib

    n = 0
    blob = b"x" * chunk
    while True:
        try:
            client.set(f"junk:{n}", blob)
        except redis_lib.exceptions.OutOfMemoryError:
            return n
        n += 1


def test_redis_full_mid_run_then_freed(fleet, fleet_env, fake_vlm, data, tmp_path):
    with PrivateRedis(tmp_path / "redis") as server:
        env = {**_private_fleet(fleet, fleet_env, server), **WORKER_ENV}  # the reconciler's timeout too
        client = server.client()
        fake_vlm.latency = 0.3
        fleet.start(2, concurrency=4, extra_env=WORKER_ENV)
        results = tmp_path / "results"
        producer(env, "enqueue", *job(fake_vlm, data, results))
        wait_until(lambda: fake_vlm.stats()["in_flight"] >= 3, 30, "calls in flight")
        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory", str(used + 2 * 1024 * 1024))
        junk = _fill_redis(client)
        wait_until(lambda: "maxmemory" in worker_logs(fleet), 60, "workers to meet the full Redis")
        started = time.monotonic()
        client.delete(*[f"junk:{i}" for i in range(junk)])
        client.config_set("maxmemory", "0")
        ids, recovered = wait_to_the_end(env, results, 120, started)
        assert all(w.proc.poll() is None for w in fleet.workers), fleet.logs()
        # The fleet still takes work after the fault: nothing wedged.
        more = tmp_path / "results-after"
        producer(env, "enqueue", *job(fake_vlm, data, more), "--wait", "--timeout", "60")
        assert_finalized_once(more, [r["image_id"] for r in seed_records(more)])
        repeated = fake_vlm.stats()["calls"] - baseline_calls(results) - baseline_calls(more)
        print(f"Redis full: {len(ids)} done, 0 failed, 0 stranded; {repeated} calls repeated; "
              f"recovered {recovered:.1f} s after memory was freed")


def test_redis_stalled_longer_than_the_socket_timeout(fleet, fleet_env, fake_vlm, data, tmp_path):
    from worker.settings import REDIS_SOCKET_TIMEOUT

    with PrivateRedis(tmp_path / "redis") as server:
        env = _private_fleet(fleet, fleet_env, server)
        fake_vlm.latency = 0.3
        fleet.start(2, concurrency=4, extra_env=WORKER_ENV)
        results = tmp_path / "results"
        producer(env, "enqueue", *job(fake_vlm, data, results))
        wait_until(lambda: fake_vlm.stats()["in_flight"] >= 3, 30, "calls in flight")
        server.pause()
        try:
            wait_until(lambda: fake_vlm.stats()["in_flight"] == 0, 30, "the calls in flight to end")
            stalled = time.monotonic()
            # Hold the stall past every socket timeout, so each blocked command really fails.
            wait_until(lambda: time.monotonic() - stalled > REDIS_SOCKET_TIMEOUT + 3, 60, "the stall to last")
        finally:
            server.resume()
        ids, recovered = wait_to_the_end(env, results, 150, time.monotonic())
        assert all(w.proc.poll() is None for w in fleet.workers), fleet.logs()
        repeated = fake_vlm.stats()["calls"] - baseline_calls(results)
        print(f"Redis stalled {REDIS_SOCKET_TIMEOUT + 3:.0f} s: {len(ids)} done, 0 failed, 0 stranded; "
              f"{repeated} calls repeated; recovered {recovered:.1f} s after SIGCONT")


# --------------------------------------------------------------------------- stranded on purpose

def _lose_every_message(client) -> int:
    """Delete every queued and unacknowledged message of the fleet's queue, as a lost Redis key,
    a hand-made mistake or a bug would: the images stay "in flight" with nothing to move them."""
    from worker.keys import QUEUE, UNACKED, UNACKED_INDEX, UNACKED_MESSAGES, is_queue_list

    keys = [k for k in client.scan_iter(match=f"{QUEUE}*", _type="list") if is_queue_list(k.decode())]
    lost = sum(client.llen(k) for k in keys) + client.hlen(UNACKED) + client.zcard(UNACKED_MESSAGES)
    client.delete(*keys, UNACKED, UNACKED_INDEX, UNACKED_MESSAGES)
    return lost


def test_wait_puts_back_images_whose_messages_were_lost(fleet, fleet_env, fake_vlm, data, tmp_path, redis_client):
    env = {**fleet_env, **WORKER_ENV}  # the producer's reconciler uses the same visibility timeout
    results = tmp_path / "results"
    producer(env, "enqueue", *job(fake_vlm, data, results))
    # Queued messages are read and recognised: nothing is put back while they exist, however old.
    out = producer(env, "repair", "--results-dir", str(results), "--older-than", "0")
    assert out.stdout.startswith("0 stranded images published again"), out.stdout
    lost = _lose_every_message(redis_client)
    assert lost == 2 * len(seed_records(results))  # two chord-header messages per image
    fleet.start(2, concurrency=4, extra_env=WORKER_ENV)
    started = time.monotonic()
    out = producer(env, "wait", "--results-dir", str(results), "--timeout", "90")
    recovered = time.monotonic() - started
    ids = [r["image_id"] for r in seed_records(results)]
    assert_finalized_once(results, ids)
    assert failures(results) == []
    assert fake_vlm.stats()["calls"] == baseline_calls(results)
    assert "1 failed" not in out.stdout
    print(f"messages lost: {len(ids)} stranded -> {len(ids)} done, 0 failed; 0 calls repeated; "
          f"recovered in {recovered:.1f} s (visibility timeout {SHORT_VT} s)")


def test_repair_puts_back_images_stranded_mid_chain(fleet, fleet_env, fake_vlm, data, tmp_path, redis_url,
                                                     redis_client):
    env = {**fleet_env, **WORKER_ENV}
    fake_vlm.latency = 0.4
    fleet.start(2, concurrency=2, extra_env=WORKER_ENV)
    results = tmp_path / "results"
    producer(env, "enqueue", *job(fake_vlm, data, results))
    n = len(seed_records(results))
    wait_until(lambda: 1 <= status_json(env, results)["steps"]["2"]["done"] <= n - 3, 60,
               "some images past step 2 and others not")
    w1 = fleet.workers[0]
    fleet.kill(w1)  # kill -9: its tasks stay in Redis's unacked set
    w1.proc.wait(timeout=10)
    fleet.stop_all()  # warm shutdown of the other: its calls in flight finish and are written
    fleet.workers.clear()
    # Messages held unacked by the dead worker are recognised too: nothing is put back yet.
    out = producer(env, "repair", "--results-dir", str(results), "--older-than", "0")
    assert out.stdout.startswith("0 stranded images published again"), out.stdout
    lost = _lose_every_message(redis_client)
    st = status_json(env, results)
    stranded = st["in_flight_images"]
    assert lost >= 1 and stranded >= 1, st
    # Young strandings are left alone (the visibility timeout has not passed for all of them) ...
    early = producer(env, "repair", "--results-dir", str(results), "--older-than", "3600")
    assert early.stdout.startswith("0 stranded images published again"), early.stdout
    # ... old ones are put back, for exactly the steps that have no outcome.
    state = run_state(redis_url, results)
    done_before = {s: done_ids(state, results, s) for s in STEPS}
    seeds = {r["image_id"]: r for r in seed_records(results)}
    owed = sum(1 for i, r in seeds.items() for s in STEPS if i not in done_before[s] and (s == 1 or r["kitti_bboxes"]))
    calls_before = fake_vlm.stats()["calls"]
    out = producer(env, "repair", "--results-dir", str(results), "--older-than", "0")
    assert out.stdout.startswith(f"{stranded} stranded images published again"), out.stdout
    fleet.start(2, concurrency=4, extra_env=WORKER_ENV)
    producer(env, "wait", "--results-dir", str(results), "--timeout", "90")
    assert_finalized_once(results, sorted(seeds))
    assert failures(results) == []
    assert fake_vlm.stats()["calls"] - calls_before == owed, "a step that was done was asked again, or one was lost"
    print(f"stranded mid-chain: {stranded} images put back by `producer repair`; {owed} calls owed and made")


def test_max_inflight_holds_below_the_publish_batch(fleet, fleet_env, fake_vlm, tmp_path, redis_url):
    import threading

    from tests.integration.test_faults import tiny_images

    images = tiny_images(tmp_path / "images", 60)
    fake_vlm.latency = 0.05
    fleet.start(1, concurrency=8)
    results = tmp_path / "results"
    peak = [0]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            if (results / "run.json").exists():
                peak[0] = max(peak[0], run_state(redis_url, results).queued_count())
            stop.wait(0.002)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        producer(fleet_env, "enqueue", *job(fake_vlm, images, results), "--max-inflight", "5",
                 "--wait", "--timeout", "90")
    finally:
        stop.set()
        t.join()
    assert_finalized_once(results, [r["image_id"] for r in seed_records(results)])
    assert 1 <= peak[0] <= 5, f"{peak[0]} images in flight with --max-inflight 5"


def test_redis_emptied_mid_run_the_next_enqueue_rebuilds_bits_and_offsets_and_redoes_nothing(
        fleet, fleet_env, fake_vlm, data, tmp_path, redis_url, redis_client):
    """Redis loses everything (FLUSHDB) with some images settled (their bits set, offsets
    dropped) and others part-way: the next ``enqueue`` reindexes from the sinks (bits for the
    images done in every step, offsets for the others) and the run completes with exactly the
    calls that were owed."""
    from worker.keys import run_key

    env = {**fleet_env, **WORKER_ENV}
    fake_vlm.latency = 0.3
    fleet.start(2, concurrency=2, extra_env=WORKER_ENV)
    results = tmp_path / "results"
    producer(env, "enqueue", *job(fake_vlm, data, results))
    seeds = {r["image_id"]: r for r in seed_records(results)}
    n = len(seeds)
    state = run_state(redis_url, results)
    wait_until(lambda: 1 <= state.counts([3])[3]["done"] <= n - 3, 60, "some images settled and others not",
               interval=0.05)
    fleet.stop_all()  # warm shutdown: the calls in flight finish and are written
    fleet.workers.clear()
    settled = done_ids(state, results, 3)
    pending = {e.decode().partition(" ")[2] for e in state.r.lrange(run_key(state.run_id, "tally"), 0, -1)
               if e.startswith(b"m")}  # moves to the bits not folded yet: their images keep entries
    assert settled and settled & hash_ids(state.r, state.run_id, "done", 3) <= pending, "settled images are bits"
    on_disk = {s: set(JsonlSink(results / step_dir_name(s) / "annotations.jsonl").latest_offsets(ReadStats()))
               for s in STEPS}
    owed = sum(1 for i, r in seeds.items() for s in STEPS if i not in on_disk[s] and (s == 1 or r["kitti_bboxes"]))
    assert owed > 0
    redis_client.flushdb()
    calls_before = fake_vlm.stats()["calls"]
    producer(env, "enqueue", *job(fake_vlm, data, results))  # reindexes: this Redis holds nothing of the run
    done_all = {i for i in seeds if all(i in on_disk[s] for s in STEPS)}
    for s in STEPS:
        key = run_key(state.run_id, "bits", s)
        bits_now = {i for i, r in seeds.items() if redis_client.getbit(key, r[SEED_ORDINAL])}
        assert bits_now == done_all, f"step {s}: the reindex made bits of the images done in every step"
    fleet.start(2, concurrency=4, extra_env=WORKER_ENV)
    producer(env, "wait", "--results-dir", str(results), "--timeout", "90")
    assert_finalized_once(results, sorted(seeds))
    assert failures(results) == []
    assert fake_vlm.stats()["calls"] - calls_before == owed, "a step that was done was asked again, or one was lost"
    assert all(hash_ids(state.r, state.run_id, "done", s) == set() for s in STEPS), "the index is all bits"
    assert status_json(env, results)["steps"]["3"]["done"] == n
    print(f"Redis emptied mid-run: {len(done_all)} of {n} images rebuilt as bits; {owed} calls owed and made")


def _headers_done_chain_pending(state, results: Path) -> list[str]:
    """Images whose chord header steps (0 and 1) are marked done while they are still in flight
    and step 2 has no outcome: the header tasks marked done without the settle check (a later
    step of their canvas settles the image), and that later step has not run."""
    from worker.keys import run_key

    queued = {k.decode() for k in state.r.hkeys(run_key(state.run_id, "queued"))}
    done = {s: hash_ids(state.r, state.run_id, "done", s) for s in (0, 1, 2)}
    other = hash_ids(state.r, state.run_id, "failed", 2) | hash_ids(state.r, state.run_id, "blocked", 2)
    return sorted(i for i in queued if i in done[0] and i in done[1] and i not in done[2] and i not in other)


def test_headers_done_while_their_chain_is_lost_are_settled_by_repair(fleet, fleet_env, fake_vlm, data, tmp_path,
                                                                      redis_url, redis_client):
    """A chord header marks done without settling (its chain's last step settles the image). Its
    chain lost (the worker killed, every message gone) leaves the image in flight with steps 0
    and 1 done and step 2 without an outcome: the reconciler publishes it again for the steps
    that have none, the headers are not asked again, and the run finishes with status exact."""
    env = {**fleet_env, **WORKER_ENV}
    fake_vlm.latency = 0.5
    fleet.start(1, concurrency=1, extra_env=WORKER_ENV)
    results = tmp_path / "results"
    producer(env, "enqueue", *job(fake_vlm, data, results))
    state = run_state(redis_url, results)
    wait_until(lambda: _headers_done_chain_pending(state, results), 60,
               "an image with its header steps done and its chain not run yet", interval=0.05)
    w1 = fleet.workers[0]
    fleet.kill(w1)  # kill -9: nothing runs the chain from now on
    w1.proc.wait(timeout=10)
    fleet.workers.clear()
    _lose_every_message(redis_client)
    stranded = _headers_done_chain_pending(state, results)
    assert stranded, "the kill came after the chain's step 2 was marked"
    seeds = {r["image_id"]: r for r in seed_records(results)}
    out = producer(env, "repair", "--results-dir", str(results), "--older-than", "0")
    assert "stranded images published again" in out.stdout and not out.stdout.startswith("0 "), out.stdout
    fleet.start(1, concurrency=2, extra_env=WORKER_ENV)
    producer(env, "wait", "--results-dir", str(results), "--timeout", "90")
    assert_finalized_once(results, sorted(seeds))
    assert failures(results) == []
    st = status_json(env, results)
    assert st["finished"] and st["in_flight_images"] == 0, st
    for s in STEPS:  # exact: every image done once in every step, nothing failed or blocked
        assert st["steps"][str(s)]["done"] == len(seeds), (s, st)
        assert st["steps"][str(s)]["failed"] == st["steps"][str(s)]["blocked"] == 0, st
    lines = sink_lines(results)
    assert all(lines[s][i] == 1 for i in stranded for s in (0, 1)), "a header step that was done was redone"
    print(f"headers done, chain lost: {len(stranded)} images settled by `producer repair`")
