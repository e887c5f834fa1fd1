"""A reindex rebuilds the done index as settling leaves it: bits (at the seed's ordinals) for
the images with a record in every step of the run, offsets for the others."""

from __future__ import annotations

from producer.submit import reindex, unpack_bits
from tests.producer.test_finalize import rec
from worker.constants import SEED_ORDINAL
from worker.keys import run_key
from worker.layout import Layout
from worker.runstate import RunState
from worker.sinks import dumps

STEPS = [0, 1, 2, 3]


def seed_with_ordinals(layout: Layout, ordinals: dict[str, int]) -> None:
    layout.root.mkdir(parents=True, exist_ok=True)
    with open(layout.seed.path, "w", encoding="utf-8") as f:
        for i, o in ordinals.items():
            f.write(dumps({"image_id": i, "image_path": f"/img/{i}.png", "width": 10, "height": 10,
                           "kitti_bboxes": [], SEED_ORDINAL: o}) + "\n")


def bits(state: RunState, step: int) -> list[int]:
    raw = state.r.get(run_key(state.run_id, "bits", step)) or b""
    return [i for i in range(len(raw) * 8) if raw[i // 8] & (0x80 >> (i % 8))]


def test_a_reindex_makes_bits_of_images_done_in_every_step_and_offsets_of_the_others(tmp_path, redis_client,
                                                                                     monkeypatch):
    import producer.extsort as extsort

    monkeypatch.setattr(extsort, "CHUNK", 2)  # every sort spills: the bounded-memory merge
    layout = Layout(tmp_path)
    seed_with_ordinals(layout, {"a": 7, "b": 3, "c": 0, "d": 9})
    for i in ("a", "b", "c"):  # a, b: every step; c: steps 0 and 1; d: none; "x": not in the seed
        for s in (STEPS if i != "c" else [0, 1]):
            layout.sink(s).append(rec(i, s))
    layout.sink(0).append(rec("x", 0))
    layout.sink(0).append(rec("a", 0, regions=[]))  # a newer record of a
    state = RunState(redis_client, "run-bits")
    state.mark_done(2, "stale", 1)  # an entry whose record is in no sink: dropped
    assert reindex(state, layout, STEPS) == {0: 4, 1: 3, 2: 2, 3: 2}
    for s in STEPS:
        assert bits(state, s) == [3, 7]
        assert state.done_offset(s, "a") is None and state.done_offset(s, "b") is None
    assert state.done_offset(2, "stale") is None
    for s in (0, 1):
        assert layout.sink(s).read_at(state.done_offset(s, "c"))["image_id"] == "c"
    assert layout.sink(0).read_at(state.done_offset(0, "x"))["image_id"] == "x"
    assert {s: c["done"] for s, c in state.counts(STEPS).items()} == {0: 4, 1: 3, 2: 2, 3: 2}
    assert state.done_many(3, ["a", "b", "c", "d"], [7, 3, 0, 9]) == [True, True, False, False]
    assert not state.r.exists(run_key(state.run_id, "reindexing"))

    # Unpacked (a `changed` re-run needs every record's offset): offsets again, no bits; the
    # newest record of a is the one pointed at.
    assert unpack_bits(state, layout) == {0: 4, 1: 3, 2: 2, 3: 2}
    assert all(bits(state, s) == [] for s in STEPS)
    assert layout.sink(0).read_at(state.done_offset(0, "a"))["regions"] == []
    assert layout.sink(3).read_at(state.done_offset(3, "b"))["image_id"] == "b"
    assert state.counts([3])[3]["done"] == 2


def test_a_seed_without_ordinals_is_reindexed_to_offsets(tmp_path, redis_client):
    from tests.producer.test_finalize import seed

    layout = Layout(tmp_path)
    seed(layout, ["a"])
    for s in STEPS:
        layout.sink(s).append(rec("a", s))
    state = RunState(redis_client, "run-no-ordinals")
    assert reindex(state, layout, STEPS) == {0: 1, 1: 1, 2: 1, 3: 1}
    assert all(state.done_offset(s, "a") is not None for s in STEPS)


def test_a_reindex_over_an_index_that_holds_the_images_offsets_counts_each_image_once(tmp_path, redis_client,
                                                                                       monkeypatch):
    """An index made before the bitmaps (an offset for every image), or offsets workers set while
    the sinks were read (no image moves to the bits meanwhile): images the rebuild makes bits
    must not keep their offsets too, or status counts them twice."""
    import producer.extsort as extsort

    monkeypatch.setattr(extsort, "CHUNK", 2)
    layout = Layout(tmp_path)
    seed_with_ordinals(layout, {"a": 7, "b": 3, "c": 0})
    state = RunState(redis_client, "run-upgraded")
    for i in ("a", "b", "c"):
        for s in (STEPS if i != "c" else [0, 1]):
            state.mark_done(s, i, layout.sink(s).append(rec(i, s)))
    reindex(state, layout, STEPS)
    for s in STEPS:
        assert bits(state, s) == [3, 7]
        assert state.done_offset(s, "a") is None and state.done_offset(s, "b") is None
    assert {s: c["done"] for s, c in state.counts(STEPS).items()} == {0: 3, 1: 3, 2: 2, 3: 2}
    assert layout.sink(1).read_at(state.done_offset(1, "c"))["image_id"] == "c"
