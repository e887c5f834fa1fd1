"""The settle after a publish (``enqueue.publish_chunk``): the images whose tasks all ran before
the chunk was marked in flight leave the window, the others stay, and the producer pays a few
commands per chunk for it, not the settle script per image.

A private Redis (``INFO commandstats`` is server-wide). A stand-in publisher plays the fast
workers: while "publishing" it settles some images' steps through the same scripts the tasks run
(``RunState.finish`` / ``fail_and_settle``). Real workers losing that race are
tests/integration/test_faults.py's to show.
"""

from __future__ import annotations

from collections import Counter

import pytest

from producer.embedded import embedded_redis
from producer.enqueue import publish_chunk
from worker.runstate import RunState

STEPS = [0, 1, 2, 3]
#: What opening a connection sends: whether one opens during a count depends on earlier tests.
_HANDSHAKE = ("info", "client", "hello", "select", "ping")


@pytest.fixture(scope="module")
def redis_url():
    """A private server for this module: the count reads ``INFO commandstats``, which is server-wide."""
    with embedded_redis() as url:
        yield url


def _calls(r) -> Counter:
    calls = Counter({k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in r.info("commandstats").items()})
    for name in _HANDSHAKE:
        calls.pop(name, None)
    return calls


class FastWorkers:
    """Publishes nothing; settles the image-steps given by ``finish`` as workers that took the
    messages at once would, before ``publish`` returns (so before the mark), then reads the
    command counts: what runs after that is the producer's mark and settle."""

    processes = 1

    def __init__(self, state: RunState, ordinals: dict[str, int], finish: dict[str, dict[int, str]]):
        self.state, self.ordinals, self.finish = state, ordinals, finish
        self.after_publish: Counter = Counter()

    def publish(self, items) -> int:
        for image_id, outcomes in self.finish.items():
            for step, outcome in outcomes.items():
                if outcome == "done":
                    self.state.finish(step, image_id, 7, STEPS, ordinal=self.ordinals[image_id])
                else:
                    self.state.fail_and_settle(step, image_id, "bad answer", STEPS, ordinal=self.ordinals[image_id])
        self.after_publish = _calls(self.state.r)
        return len(items)


def _chunk(n: int) -> tuple[list[tuple[int, str, list[int]]], dict[str, int]]:
    ids = [f"img_{i:04d}" for i in range(n)]
    return [(i * 100, image_id, list(STEPS)) for i, image_id in enumerate(ids)], {i: k for k, i in enumerate(ids)}


def test_only_images_settled_before_the_mark_are_settled_and_they_leave_the_window(redis_client):
    # Warm the path (script load, connections) on another run before counting.
    warm = RunState(redis_client, "run-warm")
    chunk, ordinals = _chunk(5)
    workers = FastWorkers(warm, ordinals, {"img_0000": dict.fromkeys(STEPS, "done")})
    publish_chunk(warm, "run-warm:h", chunk, STEPS, workers, ordinals=ordinals)

    state = RunState(redis_client, "run-late")
    chunk, ordinals = _chunk(200)
    every = dict.fromkeys(STEPS, "done")
    finish = {
        **{f"img_{i:04d}": every for i in range(5)},  # done in every step: moved to the bits
        "img_0005": {0: "done", 1: "done", 2: "done", 3: "failed"},  # settled, its last step failed
        "img_0006": {0: "done", 1: "done", 2: "done"},  # last step still to run: stays
        "img_0007": {3: "done"},  # last step done, step 2 not: looked at, stays
    }
    workers = FastWorkers(state, ordinals, finish)
    publish_chunk(state, "run-late:h", chunk, STEPS, workers, ordinals=ordinals)
    spent = _calls(redis_client) - workers.after_publish

    in_flight = {image_id for image_id, _, _ in state.iter_queued()}
    assert in_flight == {f"img_{i:04d}" for i in range(6, 200)}
    assert state.counts([3])[3] == {"done": 6, "failed": 1, "blocked": 0}
    # One settle script per image whose last step was settled (7 of 200), and for the chunk one
    # TIME and HSET (the mark) and one MULTI of three HMGETs and a BITFIELD (the filter).
    assert spent["evalsha"] == 7
    assert (spent["hmget"], spent["bitfield"], spent["multi"], spent["exec"]) == (3, 1, 1, 1)
    assert spent["hset"] == 1 and spent["time"] == 1
    per_image = sum(spent.values()) / len(chunk)
    print(f"producer after the publish: {sum(spent.values())} commands for {len(chunk)} images "
          f"({per_image:.2f} per image): {dict(spent)}")
    # A settle script runs up to ~20 commands inside (an image found in the bits is moved again:
    # a SETBIT and an HDEL per step); the 193 images still to run cost nothing beyond the filter.
    assert sum(spent.values()) <= 9 + 7 * 20


def test_an_image_without_ordinal_is_found_by_its_done_entry(redis_client):
    """A seed written before ordinals: no bit to read, the done entry settles it (and it keeps
    its offsets)."""
    state = RunState(redis_client, "run-no-ordinals")
    chunk, _ = _chunk(3)
    workers = FastWorkers(state, dict.fromkeys(["img_0001"]), {"img_0001": dict.fromkeys(STEPS, "done")})
    publish_chunk(state, "run-no-ordinals:h", chunk, STEPS, workers)
    assert {image_id for image_id, _, _ in state.iter_queued()} == {"img_0000", "img_0002"}
    assert state.done_offset(3, "img_0001") == 7
    assert state.settled_in(3, ["img_0000", "img_0001"]) == [False, True]
