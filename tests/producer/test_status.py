"""producer status from the run's Redis state (a real Redis: the run state's counters are kept
by a Lua script)."""

from __future__ import annotations

import pytest

from producer.status import format_status, status
from worker.runstate import RunState
from worker.steps.quality import new_quality


@pytest.fixture
def make_state(redis_client):
    def make() -> RunState:
        state = RunState(redis_client, "run1")
        state.set_meta(images=3, steps=[0, 1], enqueue_complete=True, enqueued_at=0.0)
        return state
    return make


def test_counts_pending_and_finished(make_state):
    state = make_state()
    for image in ("a", "b", "c"):
        state.mark_done(1, image, 0)
    state.mark_done(0, "a", 0)
    state.mark_failed(0, "b", "ParseError: nothing")
    st = status(state)
    assert st["steps"]["0"] == {"done": 1, "failed": 1, "blocked": 0, "pending": 1}
    assert st["steps"]["1"]["pending"] == 0
    assert st["finished"] is False
    state.mark_blocked(0, "c", "waiting")
    assert status(state)["finished"] is True
    # a later success clears the failure mark
    state.mark_done(0, "b", 10)
    assert status(state)["steps"]["0"] == {"done": 2, "failed": 0, "blocked": 1, "pending": 0}


def test_quality_report_adds_up_per_step_and_is_shown(make_state):
    state = make_state()
    q1 = new_quality(mode="structured", repairs=["code_fence"], calls=1, boxes_expected=4, boxes_returned=4,
                     boxes_matched=3, hallucinated_dropped=1, kitti_skipped=1)
    q2 = new_quality(mode="text", repairs=["code_fence", "trailing_comma"], calls=2, reasks=1,
                     boxes_expected=2, boxes_returned=2, boxes_matched=2)
    state.add_quality(0, q1)
    state.add_quality(0, q2)
    q = status(state)["quality"]["0"]
    assert q["images"] == 2 and q["calls"] == 3 and q["reasks"] == 1
    assert (q["boxes_matched"], q["boxes_returned"], q["boxes_expected"]) == (5, 6, 6)
    assert q["hallucinated_dropped"] == 1 and q["kitti_skipped"] == 1
    assert q["repair:code_fence"] == 2 and q["repair:trailing_comma"] == 1
    assert q["mode:structured"] == 1 and q["mode:text"] == 1
    text = format_status(status(state))
    assert "boxes matched 5 of 6 returned (6 asked about)" in text
    assert "hallucinated dropped 1" in text and "re-asks 1" in text and "code_fence 2" in text


def test_answers_cut_to_size_are_counted_and_shown(make_state):
    state = make_state()
    state.add_quality(1, new_quality(repairs=["oversized_answer_cut"], calls=1, answers_cut=1))
    state.add_quality(1, new_quality(calls=1))
    q = status(state)["quality"]["1"]
    assert q["answers_cut"] == 1 and q["repair:oversized_answer_cut"] == 1
    assert "answers cut to size 1" in format_status(status(state))


def test_auto_concurrency_shows_its_limit_floor_and_last_reason(make_state, redis_client):
    import uuid

    from worker.budget import FleetBudget

    endpoint = f"openai|http://status-{uuid.uuid4().hex[:8]}/v1|m"
    state = make_state()
    state.set_meta(endpoint=endpoint)
    st = status(state)
    assert "auto" not in st["budget"] and "concurrency (auto)" not in format_status(st)
    budget = FleetBudget(redis_client, "redis://unused", endpoint_key=endpoint, max_concurrency="auto",
                         requests_per_minute=0, lease_seconds=30)
    for _ in range(4):
        with budget.slot("region_expr"):
            pass
    budget.controller.maybe_flush(force=True)
    auto = status(state)["budget"]["auto"]
    assert auto["limit"] >= 1 and auto["floor_s"] >= 0 and auto["reason"]
    assert f"concurrency (auto): limit {auto['limit']}" in format_status(status(state))


def test_auto_shows_the_request_rate_it_keeps_to_and_why(make_state, redis_client):
    import uuid

    from worker.budget import FleetBudget

    endpoint = f"openai|http://status-{uuid.uuid4().hex[:8]}/v1|m"
    state = make_state()
    state.set_meta(endpoint=endpoint)
    budget = FleetBudget(redis_client, "redis://unused", endpoint_key=endpoint, max_concurrency="auto",
                         requests_per_minute=0, lease_seconds=30)
    with budget.slot("region_expr"):
        pass
    budget.controller.maybe_flush(force=True)
    assert "rate_limit_per_minute" not in status(state)["budget"]["auto"]
    budget.note_stated(10.0)  # an answer stated 600 requests a minute
    redis_client.hset(budget._state, "next", 0)  # the next update is due now, not in a second
    budget.controller.maybe_flush(force=True)
    auto = status(state)["budget"]["auto"]
    assert auto["rate_limit_per_minute"] == 570 and auto["rate_source"] == "stated"
    text = format_status(status(state))
    assert "request rate (auto, stated): 570 calls/min" in text and "states 600 requests/min" in text, text


def test_a_fixed_request_rate_alone_shows_no_auto_section(make_state, redis_client):
    import uuid

    from worker.budget import FleetBudget

    endpoint = f"openai|http://status-{uuid.uuid4().hex[:8]}/v1|m"
    state = make_state()
    state.set_meta(endpoint=endpoint)
    budget = FleetBudget(redis_client, "redis://unused", endpoint_key=endpoint, max_concurrency=4,
                         requests_per_minute=600, lease_seconds=30)
    with budget.slot("region_expr"):
        pass  # writes the rate's next turn into the endpoint's state hash
    assert "auto" not in status(state)["budget"]
