"""Box arithmetic: IoU, one-to-one matching, nearest target."""

from __future__ import annotations

import math

import pytest

from worker.geometry import area, clip, iou, match_greedy, match_one_to_one, nearest, to_pixels

# --------------------------------------------------------------------------- iou / area / clip


def test_iou_identical():
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == pytest.approx(1.0)


def test_iou_disjoint_and_touching():
    assert iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0


def test_iou_partial():
    # intersection 5x10=50, union 100+100-50=150
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(1 / 3)


def test_iou_contained():
    assert iou([0, 0, 10, 10], [0, 0, 5, 10]) == pytest.approx(0.5)


def test_iou_zero_area_boxes():
    assert iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0


def test_area_and_clip():
    assert area([0, 0, 10, 5]) == 50
    assert area([10, 10, 0, 0]) == 0
    assert clip([-5, -5, 50, 50], 40, 30) == [0.0, 0.0, 40, 30]


def test_norm_pixel_conversions():
    assert to_pixels([500, 500, 1000, 1000], 640, 480) == [320.0, 240.0, 640.0, 480.0]
    px = to_pixels([52, 185, 156, 370], 1920, 1080)
    assert all(math.isclose(a, b, abs_tol=2) for a, b in zip(px, [100, 200, 300, 400], strict=True))


# --------------------------------------------------------------------------- match_one_to_one


def test_match_greedy_skips_unreadable_boxes_and_sums_the_iou():
    got, total = match_greedy([None, [0, 0, 10, 10], [100, 100, 110, 110]], [[100, 100, 110, 110], [0, 0, 10, 5]],
                              min_iou=0.4)
    assert got == {1: 1, 2: 0} and math.isclose(total, 1.5)


def test_match_identity():
    boxes = [[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]]
    assert match_one_to_one(boxes, boxes, min_iou=0.5) == {0: 0, 1: 1, 2: 2}


def test_match_permuted():
    targets = [[0, 0, 10, 10], [20, 20, 30, 30]]
    cands = [[21, 21, 30, 30], [0, 0, 10, 9]]
    assert match_one_to_one(cands, targets, min_iou=0.5) == {0: 1, 1: 0}


def test_match_is_one_to_one():
    # two candidates both overlap the only target; only the better one gets it
    targets = [[0, 0, 10, 10]]
    cands = [[0, 0, 10, 8], [0, 0, 10, 10]]
    assert match_one_to_one(cands, targets, min_iou=0.5) == {1: 0}


def test_match_best_pairs_first_not_first_come():
    # candidate 0 overlaps both targets; greedy-by-order would give it target 0 and starve
    # candidate 1, whose only good match is target 0.
    targets = [[0, 0, 10, 10], [0, 0, 10, 14]]
    cands = [[0, 0, 10, 12], [0, 0, 10, 10]]
    # iou(c0,t0)=10/12=.833, iou(c0,t1)=12/14=.857, iou(c1,t0)=1.0, iou(c1,t1)=.714
    result = match_one_to_one(cands, targets, min_iou=0.5)
    assert result == {1: 0, 0: 1}


def test_match_threshold():
    targets = [[0, 0, 10, 10]]
    cands = [[5, 0, 15, 10]]  # iou 1/3
    assert match_one_to_one(cands, targets, min_iou=0.5) == {}
    assert match_one_to_one(cands, targets, min_iou=0.3) == {0: 0}


def test_match_threshold_inclusive():
    targets = [[0, 0, 10, 10]]
    cands = [[0, 0, 5, 10]]  # iou exactly 0.5
    assert match_one_to_one(cands, targets, min_iou=0.5) == {0: 0}


def test_match_empty_inputs():
    assert match_one_to_one([], [[0, 0, 1, 1]], min_iou=0.5) == {}
    assert match_one_to_one([[0, 0, 1, 1]], [], min_iou=0.5) == {}


def test_match_ties_break_on_index():
    targets = [[0, 0, 10, 10], [0, 0, 10, 10]]
    cands = [[0, 0, 10, 10]]
    assert match_one_to_one(cands, targets, min_iou=0.5) == {0: 0}


# --------------------------------------------------------------------------- nearest


def test_nearest_picks_highest_iou():
    targets = [[0, 0, 10, 10], [2, 0, 12, 10], [100, 100, 110, 110]]
    assert nearest([2, 0, 12, 10], targets) == (1, pytest.approx(1.0))


def test_nearest_none_overlapping():
    assert nearest([500, 500, 510, 510], [[0, 0, 10, 10]]) == (-1, 0.0)
    assert nearest([0, 0, 1, 1], []) == (-1, 0.0)


def test_nearest_returns_iou_value():
    idx, v = nearest([5, 0, 15, 10], [[0, 0, 10, 10]])
    assert idx == 0
    assert v == pytest.approx(1 / 3)
