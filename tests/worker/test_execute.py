"""One image-step end to end, in process: ``execute`` and ``commit`` against a real Redis (the
run state), a real results dir and the offline teacher as the client (network-free)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from PIL import Image

from worker.budget import FleetBudget
from worker.clients.offline import OfflineClient
from worker.context import RunContext
from worker.execute import BLOCKED, DONE, SKIPPED, Uncommitted, commit, execute
from worker.layout import Layout
from worker.runstate import MARKS, Outcome, RunState
from worker.sinks import JsonlSink, dumps
from worker.spec import load_spec
from worker.stepdefs import step_dir_name

P = "image_referring_expression"


class CountingClient(OfflineClient):
    """The offline teacher, counting its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def generate(self, request):
        self.calls += 1
        return super().generate(request)


def make_ctx(tmp_path, redis_client, redis_url, *, run_id: str = "run1", image_id: str = "img",
             size: tuple[int, int] = (200, 100), box: tuple[float, ...] = (10.0, 10.0, 60.0, 80.0),
             overrides: tuple[str, ...] = (f"{P}.workflow.output_format=both",)) -> RunContext:
    """A run of one image in flight: its seed line, run state, budget and the counting teacher."""
    image = tmp_path / f"{image_id}.png"
    Image.new("RGB", size, (90, 90, 90)).save(image)
    results = tmp_path / "results"
    spec = load_spec(None, [f"results_dir={results}", f"{P}.vlm.backend=offline", *overrides])
    layout = Layout(results)
    results.mkdir()
    layout.seed.path.write_text(dumps({"image_id": image_id, "image_path": str(image), "width": size[0],
                                       "height": size[1], "kitti_bboxes": [[*box, "Car"]]}) + "\n")
    state = RunState(redis_client, run_id)
    budget = FleetBudget(redis_client, redis_url, endpoint_key="offline||", max_concurrency=4,
                         requests_per_minute=0, lease_seconds=30)
    c = RunContext(run_id=run_id, spec=spec, layout=layout, state=state, spec_hash="h", budget=budget)
    c._client = CountingClient()
    state.mark_queued({image_id: 0})
    return c


@pytest.fixture
def ctx(tmp_path, redis_client, redis_url) -> RunContext:
    return make_ctx(tmp_path, redis_client, redis_url)


def run_all(ctx) -> list[str]:
    return [execute(ctx, s, "img", 0) for s in (0, 1, 2, 3)]


def test_each_step_writes_its_line_and_legacy_file_then_marks_done_and_the_image_settles(ctx):
    assert run_all(ctx) == [DONE] * 4
    for s in (0, 1, 2, 3):
        offset = ctx.state.done_offset(s, "img")
        assert ctx.layout.sink(s).read_at(offset)["image_id"] == "img"
        assert ctx.layout.legacy_path(s, "img").exists()
    assert ctx.state.queued_count() == 0  # settled by the last step's transaction
    assert ctx.client.calls == 4


def test_a_done_step_is_skipped_without_a_call(ctx):
    run_all(ctx)
    calls = ctx.client.calls
    assert [execute(ctx, s, "img", 0) for s in (0, 1, 2, 3)] == [SKIPPED] * 4
    assert ctx.client.calls == calls


def test_a_step_whose_input_is_missing_is_blocked_without_a_call(ctx):
    assert execute(ctx, 2, "img", 0) == BLOCKED
    assert execute(ctx, 3, "img", 0) == BLOCKED
    assert ctx.client.calls == 0
    assert ctx.state.outcomes(["img"], [2, 3]) == {"img": {2: Outcome.BLOCKED, 3: Outcome.BLOCKED}}


def test_an_answer_that_cannot_be_written_is_kept_and_written_later_without_a_second_call(ctx):
    sink = ctx.layout.sink(0)
    sink.path.parent.mkdir(parents=True, exist_ok=True)
    sink.path.mkdir()  # the sink path is a directory: every append fails as on a broken volume
    with pytest.raises(Uncommitted) as info:
        execute(ctx, 0, "img", 0)
    assert isinstance(info.value.cause, OSError) and info.value.cause.errno == errno.EISDIR
    assert ctx.state.done_offset(0, "img") is None, "nothing is marked done before its line is on disk"
    assert ctx.client.calls == 1
    sink.path.rmdir()
    assert commit(ctx, 0, "img", info.value.pending) == DONE
    assert ctx.client.calls == 1
    assert JsonlSink(sink.path).read_at(ctx.state.done_offset(0, "img"))["regions"]


def test_run_state_outcomes_and_settling(redis_client):
    state = RunState(redis_client, "run2")
    state.mark_queued({"a": 10, "b": 20})
    got = {i: (off, since > 0) for i, since, off in state.iter_queued()}
    assert got == {"a": (10, True), "b": (20, True)}
    state.mark_failed(0, "a", "boom")
    state.mark_blocked(1, "a", "x")
    assert state.settle_many(["a", "b"], [0, 1]) == 1  # a has an outcome for each step, b has none
    assert [i for i, _, _ in state.iter_queued()] == ["b"]
    assert state.finish(0, "b", 0, [0, 1]) is False
    assert state.finish(1, "b", 5, [0, 1]) is True
    assert state.queued_count() == 0
    assert state.counts([0, 1]) == {0: {"done": 1, "failed": 1, "blocked": 0},
                                    1: {"done": 1, "failed": 0, "blocked": 1}}
    assert [str(k) for k in MARKS] == ["done", "failed", "blocked"]


def test_counters_are_folded_in_batches_and_read_the_same_before_and_after(redis_client):
    # A task appends its usage and quality counters as one tally entry; the script folds the
    # tally into the totals every TALLY_FOLD entries. Reading adds what is not folded yet.
    from worker.runstate import TALLY_FOLD
    from worker.steps.quality import new_quality

    state = RunState(redis_client, "run3")
    n = TALLY_FOLD + 7
    for i in range(n):
        state.finish(0, f"i{i}", i, [0], call={"input_tokens": 10, "latency_s": 0.5},
                     quality=new_quality(repairs=["code_fence"], calls=1))
        if i == TALLY_FOLD - 2:
            before_fold = (state.usage(), state.quality())
    assert before_fold[0] == {0: {"calls": TALLY_FOLD - 1, "input_tokens": 10 * (TALLY_FOLD - 1),
                                  "latency_ms": 500 * (TALLY_FOLD - 1)}}
    assert state.usage() == {0: {"calls": n, "input_tokens": 10 * n, "latency_ms": 500 * n}}
    q = state.quality()[0]
    assert (q["images"], q["calls"], q["repair:code_fence"], q["mode:text"]) == (n, n, n, n)
    assert redis_client.llen("refexp:run:run3:tally") == n - TALLY_FOLD  # bounded: folded once
    assert state.counts([0])[0]["done"] == n and state.queued_count() == 0


def test_a_done_mark_replaces_a_failed_or_blocked_one_and_settles_with_it(redis_client):
    state = RunState(redis_client, "run4")
    state.mark_queued({"a": 0})
    assert state.fail_and_settle(0, "a", "boom", [0, 1]) is False
    assert state.block_and_settle(1, "a", "waiting", [0, 1]) is True
    assert state.queued_count() == 0
    state.mark_queued({"a": 0})
    assert state.finish(0, "a", 7, [0, 1]) is True  # step 1 is still blocked: settled
    assert state.outcomes(["a"], [0, 1]) == {"a": {0: Outcome.DONE, 1: Outcome.BLOCKED}}
    assert state.counts([0, 1]) == {0: {"done": 1, "failed": 0, "blocked": 0},
                                    1: {"done": 0, "failed": 0, "blocked": 1}}


def test_the_step_directories_follow_the_table(tmp_path):
    layout = Layout(Path(tmp_path))
    assert [layout.sink(s).path.parent.name for s in (0, 1, 2, 3)] == [step_dir_name(s) for s in (0, 1, 2, 3)] == [
        "step_0_region_expr", "step_1_image_caption", "step_2_grounding_expr", "step_3_double_check"]


def test_an_upstream_offset_a_finalize_merged_away_is_found_again_not_retried_for_ever(ctx):
    from producer.finalize import finalize
    from worker.sinks import StaleOffset
    from worker.tasks import is_infra_error

    assert [execute(ctx, s, "img", 0) for s in (0, 1)] == [DONE, DONE]
    stale = ctx.state.done_offset(1, "img")
    finalize(ctx.layout, [0, 1, 2, 3])  # merges the parts the done index points into
    with pytest.raises(StaleOffset) as err:
        ctx.layout.sink(1).read_at(stale)
    assert not is_infra_error(err.value)  # never retried for ever as a volume failure
    assert execute(ctx, 2, "img", 0) == DONE
    fresh = ctx.state.done_offset(1, "img")
    assert fresh != stale and ctx.layout.sink(1).read_at(fresh)["image_id"] == "img"


def test_settle_many_survives_a_redis_that_lost_its_scripts_between_load_and_run(redis_url, redis_client):
    """redis-py loads a pipeline's scripts, then sends the EVALSHAs: a Redis restarted between
    the two answers NOSCRIPT. ``settle_many`` runs the batch again (settling is idempotent)."""
    import redis

    flushes = [1]

    class ForgetfulPipeline(redis.client.Pipeline):
        def load_scripts(self):  # the scripts are loaded, then the server forgets them once
            super().load_scripts()
            if flushes[0]:
                flushes[0] -= 1
                self.immediate_execute_command("SCRIPT", "FLUSH")

    class ForgetfulRedis(redis.Redis):
        def pipeline(self, transaction=True, shard_hint=None):
            return ForgetfulPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)

    client = ForgetfulRedis.from_url(redis_url)
    state = RunState(client, "run-noscript")
    state.mark_queued({"a": 0, "b": 0})
    state.mark_done(0, "a", 1)
    assert state.settle_many(["a", "b"], [0]) == 1 and flushes == [0]
    assert state.queued_count() == 1


def test_an_image_s_converted_copies_are_dropped_when_it_settles_not_before(tmp_path, redis_client, redis_url):
    """With vlm.downscale_to_pixels the image is converted once and kept for its four calls; once
    the image settles, its copies go: the cache holds the images in flight, not the run's."""
    c = make_ctx(tmp_path, redis_client, redis_url, run_id="run2", image_id="big", size=(1200, 800),
                 box=(100.0, 100.0, 600.0, 700.0), overrides=(f"{P}.vlm.downscale_to_pixels=100000",))
    state, results = c.state, c.layout.root
    cache = results / ".image-cache"
    copies = []
    for step in (0, 1, 2):
        assert execute(c, step, "big", 0) == DONE
        copies.append(sorted(p for p in cache.rglob("*") if p.is_file()))
    assert len(copies[0]) == 1 and copies[0] == copies[1] == copies[2]  # one conversion, kept
    assert execute(c, 3, "big", 0) == DONE and state.queued_count() == 0
    assert not [p for p in cache.rglob("*") if p.is_file()]


def _changed(ctx, *extra: str, templates: dict[str, str] | None = None) -> RunContext:
    """The same run, its spec now ``reprocess: changed`` (plus ``extra``), every step set aside
    for a check as ``producer enqueue`` does (``clear_attempt(recheck=True)``)."""
    spec = load_spec(None, [f"results_dir={ctx.layout.root}", f"{P}.vlm.backend=offline",
                            f"{P}.workflow.output_format=both", f"{P}.workflow.reprocess=changed", *extra])
    c = RunContext(run_id="run1", spec=spec, layout=ctx.layout, state=ctx.state, spec_hash="h2", budget=ctx.budget,
                   templates=templates)
    c._client = ctx._client
    for s in (0, 1, 2, 3):
        ctx.state.clear_attempt(s, ["img"], recheck=True)
    ctx.state.mark_queued({"img": 0})
    return c


def test_changed_keeps_current_records_without_a_call_and_redoes_a_changed_step_and_what_follows(ctx, redis_client):
    from worker.steps.prompts import PROMPT_TEMPLATES

    run_all(ctx)
    calls = ctx._client.calls
    offsets = ctx.state.done_offsets("img", (0, 1, 2, 3))
    fps = {s: ctx.layout.sink(s).read_at(offsets[s])["meta"] for s in offsets}

    again = _changed(ctx)
    assert ctx.state.done_offsets("img", (0, 1, 2, 3)) == dict.fromkeys((0, 1, 2, 3))  # pending again
    assert run_all(again) == [DONE] * 4 and ctx._client.calls == calls
    assert ctx.state.done_offsets("img", (0, 1, 2, 3)) == offsets  # the same records, marked done again
    assert not list(redis_client.scan_iter("refexp:run:run1:recheck:*"))
    assert ctx.state.queued_count() == 0

    # A new step-2 prompt: step 2 is asked again, and step 3, which reads it, with it.
    templates = {**PROMPT_TEMPLATES, "grounding_expr": "Group carefully.\n" + PROMPT_TEMPLATES["grounding_expr"]}
    again = _changed(ctx, templates=templates)
    assert run_all(again) == [DONE] * 4 and ctx._client.calls == calls + 2
    now = ctx.state.done_offsets("img", (0, 1, 2, 3))
    assert {s: now[s] == offsets[s] for s in now} == {0: True, 1: True, 2: False, 3: False}
    new3 = ctx.layout.sink(3).read_at(now[3])["meta"]
    assert new3["step2_grounding_expr"]["fingerprint"] != fps[2]["step2_grounding_expr"]["fingerprint"]
    assert new3["step0_region_expr"]["fingerprint"] == fps[0]["step0_region_expr"]["fingerprint"]
    assert not list(redis_client.scan_iter("refexp:run:run1:recheck:*"))


def test_changed_redoes_a_record_written_before_fingerprints(ctx):
    assert execute(ctx, 1, "img", 0) == DONE
    rec = ctx.layout.sink(1).read_at(ctx.state.done_offset(1, "img"))
    del rec["meta"]["step1_image_caption"]["fingerprint"]
    ctx.state.mark_done(1, "img", ctx.layout.sink(1).append(rec))
    calls = ctx._client.calls
    assert execute(_changed(ctx), 1, "img", 0) == DONE and ctx._client.calls == calls + 1


def test_an_enqueue_that_is_not_changed_makes_set_aside_records_done_again(ctx):
    run_all(ctx)
    offsets = ctx.state.done_offsets("img", (0, 1, 2, 3))
    _changed(ctx)  # a `changed` re-run that stopped before any task ran
    assert ctx.state.has_prior((0, 1, 2, 3))
    for s in (0, 1, 2, 3):
        ctx.state.restore_prior(s, ["img"])
    assert ctx.state.done_offsets("img", (0, 1, 2, 3)) == offsets and not ctx.state.has_prior((0, 1, 2, 3))
