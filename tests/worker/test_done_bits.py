"""The done index bounded by the window: an image that settles done in every step moves from
the ``done:<step>`` hashes (offsets) to the ``bits:<step>`` bitmaps (one bit at its seed
ordinal); every reader answers from both. Real Redis, a real results dir, the offline teacher."""

from __future__ import annotations

import pytest

from tests.worker.test_execute import make_ctx
from worker.constants import SEED_ORDINAL
from worker.execute import DONE, SKIPPED, execute, record_failure
from worker.keys import run_key
from worker.runstate import Outcome, RunState
from worker.sinks import dumps

STEPS = (0, 1, 2, 3)


def with_ordinal(ctx, ordinal: int) -> None:
    """Give the context's one seed line an ordinal, as ``write_seed`` does."""
    import json

    rec = json.loads(ctx.layout.seed.path.read_text())
    ctx.layout.seed.path.write_text(dumps({**rec, SEED_ORDINAL: ordinal}) + "\n")


@pytest.fixture
def ctx(tmp_path, redis_client, redis_url):
    c = make_ctx(tmp_path, redis_client, redis_url)
    with_ordinal(c, 5)
    return c


def bits(state: RunState, step: int) -> list[int]:
    raw = state.r.get(run_key(state.run_id, "bits", step)) or b""
    return [i for i in range(len(raw) * 8) if raw[i // 8] & (0x80 >> (i % 8))]


def lines(ctx, step: int) -> int:
    return sum(1 for _ in ctx.layout.sink(step).scan())


def test_a_settled_fully_done_image_holds_bits_not_offsets_and_status_counts_it(ctx):
    assert [execute(ctx, s, "img", 0) for s in STEPS] == [DONE] * 4
    assert ctx.state.queued_count() == 0
    # Its move is pending (a batch of them moves at the tally's fold): offsets still, counted once.
    assert all(ctx.state.done_offset(s, "img") is not None and bits(ctx.state, s) == [] for s in STEPS)
    assert {s: c["done"] for s, c in ctx.state.counts(STEPS).items()} == {s: 1 for s in STEPS}
    assert ctx.state.done_many(3, ["img", "other"], [5, 6]) == [True, False]
    ctx.state.fold(list(STEPS))
    for s in STEPS:
        assert ctx.state.done_offset(s, "img") is None, "its offsets left the index with it"
        assert bits(ctx.state, s) == [5]
        assert ctx.state.is_done(s, "img", 5)
    assert {s: c["done"] for s, c in ctx.state.counts(STEPS).items()} == {s: 1 for s in STEPS}
    assert ctx.state.outcomes(["img"], [3], {"img": 5}) == {"img": {3: Outcome.DONE}}
    assert ctx.state.done_many(3, ["img", "other"], [5, 6]) == [True, False]


def test_before_it_settles_the_image_keeps_its_offsets(ctx):
    assert [execute(ctx, s, "img", 0) for s in (0, 1, 2)] == [DONE] * 3
    for s in (0, 1, 2):
        assert ctx.layout.sink(s).read_at(ctx.state.done_offset(s, "img"))["image_id"] == "img"
    assert all(bits(ctx.state, s) == [] for s in STEPS)


def test_a_late_duplicate_of_a_settled_image_s_task_skips_without_a_call_or_a_line(ctx):
    from worker.tasks import _commit_pending

    for s in STEPS:
        execute(ctx, s, "img", 0)
    calls, before = ctx.client.calls, [lines(ctx, s) for s in STEPS]
    assert [execute(ctx, s, "img", 0) for s in STEPS] == [SKIPPED] * 4
    # An answer an earlier attempt kept (a retry's ``pending``) is not written a second time either.
    assert _commit_pending(ctx, 2, "img", {"record": {"image_id": "img"}, "legacy": None}, 5) == SKIPPED
    assert ctx.client.calls == calls
    assert [lines(ctx, s) for s in STEPS] == before
    # Its settle (the task's SKIPPED path) finds it settled: nothing comes back in flight.
    ctx.state.mark_queued({"img": 0}, {"img": 5})
    assert ctx.state.settle("img", list(STEPS), 5) is True
    assert ctx.state.queued_count() == 0


def test_a_failure_recorded_late_does_not_mark_failed_a_step_whose_bit_is_set(ctx):
    """``tasks.run_task`` with ``failure``: it asks ``outcomes`` first, with the ordinal."""
    for s in STEPS:
        execute(ctx, s, "img", 0)
    ctx.state.fold(list(STEPS))
    assert ctx.state.outcomes(["img"], [1], {"img": 5})["img"][1] == Outcome.DONE
    assert ctx.state.outcomes(["img"], [1])["img"][1] is None  # the bit is what answers


def test_a_failed_step_keeps_the_image_s_offsets_and_a_retry_moves_it_to_the_bits(ctx):
    assert [execute(ctx, s, "img", 0) for s in (0, 1)] == [DONE] * 2
    record_failure(ctx, 2, "img", RuntimeError("boom"), 1, 5)
    assert execute(ctx, 3, "img", 0) == "blocked"
    assert ctx.state.queued_count() == 0  # settled, with a failed step
    offsets = {s: ctx.state.done_offset(s, "img") for s in (0, 1)}
    assert None not in offsets.values(), "an image with a failed step keeps its done offsets"
    assert all(bits(ctx.state, s) == [] for s in STEPS)
    # retry-failed: steps 2 and 3 again; the image settles done in every step and moves.
    ctx.state.clear_attempt(2, ["img"])
    ctx.state.clear_attempt(3, ["img"])
    ctx.state.mark_queued({"img": 0}, {"img": 5})
    assert [execute(ctx, s, "img", 0) for s in (2, 3)] == [DONE] * 2
    assert ctx.state.queued_count() == 0
    ctx.state.fold(list(STEPS))
    assert all(bits(ctx.state, s) == [5] for s in STEPS)
    assert all(ctx.state.done_offset(s, "img") is None for s in STEPS)
    assert ctx.state.counts(STEPS)[2] == {"done": 1, "failed": 0, "blocked": 0}


def test_an_image_finished_before_the_producer_marked_it_leaves_the_window(ctx):
    """``publish_chunk``: publish, mark, then ``settle_many``: an image a fast worker settled
    (and moved to the bits) before the mark is found settled by its bits."""
    for s in STEPS:
        execute(ctx, s, "img", 0)
    ctx.state.mark_queued({"img": 0}, {"img": 5})
    assert ctx.state.settle_many(["img"], list(STEPS), [5]) == 1
    assert ctx.state.queued_count() == 0


def test_a_seed_without_ordinals_keeps_offsets_as_before(tmp_path, redis_client, redis_url):
    c = make_ctx(tmp_path, redis_client, redis_url)
    assert [execute(c, s, "img", 0) for s in STEPS] == [DONE] * 4
    assert all(c.state.done_offset(s, "img") is not None for s in STEPS)
    assert all(bits(c.state, s) == [] for s in STEPS)


def test_a_forced_redo_clears_the_bits_of_the_images_it_publishes(ctx):
    for s in STEPS:
        execute(ctx, s, "img", 0)
    for s in STEPS:
        ctx.state.clear_attempt(s, ["img"], done=True, ordinals=[5])
    assert all(bits(ctx.state, s) == [] for s in STEPS)
    assert ctx.state.counts([3])[3]["done"] == 0


def test_nothing_moves_to_the_bits_while_a_reindex_runs(ctx):
    rebuild = ctx.state.rebuild_index([])  # the flag, as a reindex sets it before reading the sinks
    for s in STEPS:
        execute(ctx, s, "img", 0)
    assert ctx.state.queued_count() == 0, "the image still settles"
    assert all(ctx.state.done_offset(s, "img") is not None for s in STEPS)
    assert all(bits(ctx.state, s) == [] for s in STEPS)
    rebuild.commit({})
    assert not ctx.state.r.exists(run_key(ctx.state.run_id, "reindexing"))


def test_a_step_added_to_a_settled_image_reads_its_upstream_from_the_sink(ctx):
    """Bits for steps 0-2 only (the run had those), then step 3 runs: its upstream offset is
    gone from the index, so the record is found in the sink. (The enqueue of a run given a new
    step turns bits back into offsets first, ``submit.unpack_bits``; this is a task that meets
    one all the same.) A mark looks at no bit, so the image settles by a plain settle (a
    skipped duplicate's, or the producer's after a publish), which does."""
    for s in (0, 1, 2):
        execute(ctx, s, "img", 0)
    state = ctx.state
    state.mark_queued({"img": 0}, {"img": 5})
    for s in (0, 1, 2):  # as the settle script moves an image done in every step of [0, 1, 2]
        state.r.setbit(run_key(state.run_id, "bits", s), 5, 1)
        state.r.hdel(run_key(state.run_id, "done", s), "img")
    assert execute(ctx, 3, "img", 0) == DONE
    assert ctx.layout.sink(3).read_at(ctx.layout.sink(3).find_latest("img")[0])["image_id"] == "img"
    assert state.settle("img", list(STEPS), 5) is True
    assert state.queued_count() == 0
    state.fold(list(STEPS))
    assert all(state.done_offset(s, "img") is None for s in STEPS)
    assert all(bits(state, s) == [5] for s in STEPS)


def test_a_step_without_seed_input_does_not_scan_a_rewritten_seed_for_its_ordinal(ctx, monkeypatch):
    """A re-seed moved the image's line: a step that reads the seed only for the ordinal
    takes none (no scan of the whole seed), and the image keeps its offsets."""
    import json

    from worker.sinks import JsonlSink

    assert [execute(ctx, s, "img", 0) for s in (0, 1, 2)] == [DONE] * 3
    line = ctx.layout.seed.path.read_text()
    other = dumps({**json.loads(line), "image_id": "other", SEED_ORDINAL: 6}) + "\n"
    ctx.layout.seed.path.write_text(other + line)  # offset 0 is another image's line now

    def no_scan(self):
        raise AssertionError("the whole seed was scanned")

    monkeypatch.setattr(JsonlSink, "scan", no_scan)
    assert execute(ctx, 3, "img", 0) == DONE
    assert ctx.state.queued_count() == 0
    assert all(ctx.state.done_offset(s, "img") is not None for s in STEPS)
    assert all(bits(ctx.state, s) == [] for s in STEPS)


def test_a_late_duplicate_after_a_re_seed_moved_the_line_skips_instead_of_blocking(ctx):
    """A settled image (its bits set, its offsets gone), then a re-seed moves its seed line, then
    a late duplicate of a step that reads no seed input: the line at the message's offset is
    another image's, so the ordinal is not at hand. The task must still find the image done
    (not mark it blocked: it would count both done and blocked, for good)."""
    import json

    assert [execute(ctx, s, "img", 0) for s in STEPS] == [DONE] * 4
    ctx.state.fold(list(STEPS))
    line = ctx.layout.seed.path.read_text()
    other = dumps({**json.loads(line), "image_id": "other", SEED_ORDINAL: 6}) + "\n"
    ctx.layout.seed.path.write_text(other + line)  # offset 0 is another image's line now
    before = [lines(ctx, s) for s in STEPS]
    assert execute(ctx, 3, "img", 0) == SKIPPED
    assert execute(ctx, 2, "img", 0) == SKIPPED
    assert ctx.state.counts(STEPS)[3] == {"done": 1, "failed": 0, "blocked": 0}
    assert ctx.state.counts(STEPS)[2] == {"done": 1, "failed": 0, "blocked": 0}
    assert [lines(ctx, s) for s in STEPS] == before
    assert ctx.state.done_offset(3, "img") is None and ctx.state.done_offset(2, "img") is None


def test_a_late_duplicate_in_a_forced_run_does_not_leave_the_image_both_a_bit_and_an_offset(
        tmp_path, redis_client, redis_url):
    """``reprocess: all``: the producer clears an image's bits before it publishes it, so a bit a
    task meets was set in this run (the image settled since): a duplicate delivery of one of its
    tasks skips, rather than write its record again and a done entry beside the bit (status would
    count the image twice, and the entry would stay for good)."""
    from tests.worker.test_execute import P
    from worker.tasks import _commit_pending

    c = make_ctx(tmp_path, redis_client, redis_url,
                 overrides=(f"{P}.workflow.output_format=both", f"{P}.workflow.reprocess=all"))
    with_ordinal(c, 5)
    assert [execute(c, s, "img", 0) for s in STEPS] == [DONE] * 4
    c.state.fold(list(STEPS))
    assert all(bits(c.state, s) == [5] for s in STEPS)
    calls, before = c.client.calls, [lines(c, s) for s in STEPS]
    assert execute(c, 1, "img", 0) == SKIPPED
    assert _commit_pending(c, 2, "img", {"record": {"image_id": "img"}, "legacy": None}, 5) == SKIPPED
    assert c.client.calls == calls and [lines(c, s) for s in STEPS] == before
    assert {s: n["done"] for s, n in c.state.counts(STEPS).items()} == {s: 1 for s in STEPS}


def test_a_late_duplicate_that_commits_after_the_move_leaves_the_next_step_skipping(ctx):
    """A duplicate of step 2 that looked its image up while it was in flight commits after the
    image moved to the bits: its offset lands beside them (the mark script looks at no bit for a
    task that marks). A later delivery of step 3 then finds an offset of its upstream, and must
    still skip: ``RunState.lookup`` reads the task's own bit whatever offsets it finds, so an
    image holding offsets and bits at once is never taken for one in flight."""
    assert [execute(ctx, s, "img", 0) for s in STEPS] == [DONE] * 4
    ctx.state.fold(list(STEPS))  # the image's move to the bits (batched, see RunState.fold)
    offset, _ = ctx.layout.sink(2).find_latest("img")
    # The duplicate's commit as a chain link marks it (no settle check, so no look at the bits).
    ctx.state.finish(2, "img", offset, list(STEPS), ordinal=5, settle=False)
    assert ctx.state.done_offset(2, "img") == offset and bits(ctx.state, 2) == [5]
    written = lines(ctx, 3)
    assert execute(ctx, 3, "img", 0) == SKIPPED
    assert lines(ctx, 3) == written and ctx.state.done_offset(3, "img") is None

def _settle_all(state: RunState, image_id: str, ordinal: int, offset: int = 0) -> bool:
    """An image's four steps done as a canvas marks them: the chord headers and the chain's
    first link without the settle check, the last step with it."""
    for s in (0, 1, 2):
        assert state.finish(s, image_id, offset, list(STEPS), ordinal=ordinal, settle=False) is False
    return state.finish(3, image_id, offset, list(STEPS), ordinal=ordinal)


def _done_counts(state: RunState) -> dict[int, int]:
    return {s: c["done"] for s, c in state.counts(STEPS).items()}


def test_moves_to_the_bits_go_in_batches_at_the_tally_fold(redis_client, monkeypatch):
    """Settling pushes a move entry; the fold that every TALLY_FOLD entries of the tally list run
    moves the whole batch. Status counts each image once before, during and after."""
    import worker.runstate as rs

    monkeypatch.setattr(rs, "TALLY_FOLD", 3)
    state = RunState(redis_client, "batched")
    state.mark_queued({f"i{n}": 0 for n in range(3)}, {f"i{n}": n for n in range(3)})
    assert _settle_all(state, "i0", 0) and _settle_all(state, "i1", 1)
    assert all(bits(state, s) == [] for s in STEPS), "two move entries: no fold yet"
    assert _done_counts(state) == {s: 2 for s in STEPS}
    assert state.done_many(2, ["i0", "i1", "i2"], [0, 1, 2]) == [True, True, False]
    assert _settle_all(state, "i2", 2)  # the third entry: the fold moves all three
    assert state.queued_count() == 0
    assert all(bits(state, s) == [0, 1, 2] for s in STEPS)
    assert all(state.r.hlen(run_key(state.run_id, "done", s)) == 0 for s in STEPS)
    assert _done_counts(state) == {s: 3 for s in STEPS}
    assert state.r.llen(run_key(state.run_id, "tally")) == 0


def test_an_image_redone_before_its_move_is_folded_stays_in_the_hashes(redis_client):
    """A forced redo (or a ``changed`` re-run) clears a done mark after the move entry was
    written: the fold leaves that image alone (it is in flight again); its next settle moves it."""
    state = RunState(redis_client, "redone")
    state.mark_queued({"a": 0, "b": 0}, {"a": 7, "b": 8})
    assert _settle_all(state, "a", 7) and _settle_all(state, "b", 8)
    state.clear_attempt(0, ["a"], done=True, ordinals=[7])
    state.mark_queued({"a": 0}, {"a": 7})
    state.fold(list(STEPS))
    assert all(bits(state, s) == [8] for s in STEPS), "only the image still done in every step moved"
    assert state.done_offset(0, "a") is None and all(state.done_offset(s, "a") == 0 for s in (1, 2, 3))
    assert _done_counts(state) == {0: 1, 1: 2, 2: 2, 3: 2}
    assert state.finish(0, "a", 0, list(STEPS), ordinal=7) is True  # redone: settles again
    state.fold(list(STEPS))
    assert all(bits(state, s) == [7, 8] for s in STEPS)
    assert _done_counts(state) == {s: 2 for s in STEPS}


def test_a_reindex_holds_the_pending_moves_then_drops_them(redis_client):
    """While ``reindexing`` is set no fold moves an image (the entries are kept); the rebuild's
    commit drops the entries written for the old index (an ``unpack_bits`` must not see its
    offsets turn back into bits), the counters' entries stay."""
    state = RunState(redis_client, "reindexed")
    state.mark_queued({"a": 0}, {"a": 3})
    assert _settle_all(state, "a", 3)
    state.add_usage(0, {"input_tokens": 5, "latency_s": 0.0})
    rebuild = state.rebuild_index([])
    state.fold(list(STEPS))
    assert all(bits(state, s) == [] for s in STEPS), "nothing moves while a reindex runs"
    tally = run_key(state.run_id, "tally")
    assert any(e.startswith(b"m") for e in state.r.lrange(tally, 0, -1)), "the move is kept"
    state.add_usage(0, {"input_tokens": 2, "latency_s": 0.0})
    rebuild.commit({})
    assert not state.r.exists(run_key(state.run_id, "reindexing"))
    assert not any(e.startswith(b"m") for e in state.r.lrange(tally, 0, -1))
    state.fold(list(STEPS))
    assert all(bits(state, s) == [] for s in STEPS) and all(state.done_offset(s, "a") == 0 for s in STEPS)
    assert state.usage()[0]["input_tokens"] == 7, "the counters' entries were folded, not dropped"


def test_a_stale_failed_mark_left_by_a_mark_without_settle_is_cleared_by_the_last_settle(redis_client):
    """A duplicate canvas failed step 0 of an image that another canvas then did: the header's
    mark (no script) leaves the failed mark; the last step's settle clears it, so status ends exact."""
    state = RunState(redis_client, "stale")
    state.mark_queued({"a": 0}, {"a": 1})
    state.mark_failed(0, "a", "a duplicate's failure")
    state.mark_blocked(1, "a", "a duplicate's block")
    assert _settle_all(state, "a", 1)
    state.fold(list(STEPS))
    assert all(c == {"done": 1, "failed": 0, "blocked": 0} for c in state.counts(STEPS).values())
    assert all(bits(state, s) == [1] for s in STEPS)


def test_usage_reads_the_tally_beside_move_entries(redis_client):
    state = RunState(redis_client, "usage")
    state.mark_queued({"a": 0}, {"a": 1})
    for s in (0, 1, 2):
        state.finish(s, "a", 0, list(STEPS), call={"input_tokens": 10, "latency_s": 0.5}, ordinal=1, settle=False)
    state.finish(3, "a", 0, list(STEPS), call={"input_tokens": 1, "latency_s": 0.0}, ordinal=1)
    assert any(e.startswith(b"m") for e in state.r.lrange(run_key(state.run_id, "tally"), 0, -1))
    assert {s: u["input_tokens"] for s, u in state.usage().items()} == {0: 10, 1: 10, 2: 10, 3: 1}
    state.fold(list(STEPS))
    assert {s: u["input_tokens"] for s, u in state.usage().items()} == {0: 10, 1: 10, 2: 10, 3: 1}
    assert state.usage()[0]["calls"] == 1


def test_a_duplicate_last_step_that_looked_before_the_move_writes_no_entry_beside_the_bit(redis_client):
    """Two deliveries of an image's last step both pass the skip check; one settles the image and
    the fold moves it; the other's mark then finds its step's bit set and writes no done entry
    (status would count the image twice in that step, for good)."""
    state = RunState(redis_client, "dup")
    state.mark_queued({"a": 0}, {"a": 4})
    assert _settle_all(state, "a", 4)
    state.fold(list(STEPS))
    assert state.finish(3, "a", 99, list(STEPS), ordinal=4) is False
    assert state.done_offset(3, "a") is None
    assert _done_counts(state) == {s: 1 for s in STEPS}
