"""Batch-answered tokens are billed at vlm.prices.batch_factor in the token report."""

from __future__ import annotations

from producer.usage import call_cost, call_counts, usage_summary

PRICES = {"input_per_million": 2.0, "output_per_million": 10.0, "batch_factor": 0.5}


def test_batch_tokens_cost_the_factor():
    online = call_cost(PRICES, 1_000_000, 100_000)
    assert online == 3.0
    assert call_cost(PRICES, 1_000_000, 100_000, batch_input_tokens=1_000_000, batch_output_tokens=100_000) == 1.5
    # a re-ask went online: only the batch part is discounted
    assert call_cost(PRICES, 1_000_000, 100_000, batch_input_tokens=500_000) == 2.5


def test_the_token_report_prices_records_with_batch_tokens():
    recs = [(0, {"meta": {"step1_image_caption": {"call": {"input_tokens": 1000, "output_tokens": 100,
                                                            "batch_input_tokens": 1000,
                                                            "batch_output_tokens": 100}}}}),
            (1, {"meta": {"step1_image_caption": {"call": {"input_tokens": 1000, "output_tokens": 100}}}})]
    counts = call_counts(recs, 1)
    assert counts["batch_input_tokens"] == 1000
    summary = usage_summary({1: {"images": 2, **counts}}, PRICES)
    assert summary["steps"]["1"]["cost"] == round((2000 * 2 + 200 * 10) / 1e6 * 0.75, 6)
    assert summary["total"]["batch_output_tokens"] == 100


def test_no_batch_tokens_no_batch_fields():
    recs = [(0, {"meta": {"step1_image_caption": {"call": {"input_tokens": 10, "output_tokens": 1}}}})]
    summary = usage_summary({1: {"images": 1, **call_counts(recs, 1)}}, PRICES)
    assert "batch_input_tokens" not in summary["steps"]["1"] and "batch_input_tokens" not in summary["total"]
