"""Percentiles, summaries and CDFs of the benchmark (benchmarks/stats.py)."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sms.benchmarks.stats import cdf_points, percentile, summarize_ms


def test_percentile_interpolates_between_closest_ranks():
    xs = [1.0, 2.0, 3.0, 4.0]
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 100) == 4.0
    assert percentile(xs, 50) == pytest.approx(2.5)
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)


def test_percentile_of_nothing_is_nan_and_of_one_value_is_that_value():
    assert math.isnan(percentile([], 50))
    assert percentile([7.0], 1) == 7.0 and percentile([7.0], 99) == 7.0


def test_percentile_rejects_out_of_range_q():
    with pytest.raises(ValueError):
        percentile([1.0], 101)


@given(st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=200),
       st.floats(min_value=0, max_value=100), st.floats(min_value=0, max_value=100))
def test_percentile_is_monotonic_in_q_and_bounded(xs, q1, q2):
    lo, hi = sorted((q1, q2))
    assert min(xs) <= percentile(xs, lo) <= percentile(xs, hi) <= max(xs)


def test_summary_is_in_milliseconds():
    s = summarize_ms([0.001, 0.002, 0.003])
    assert s == {"count": 3, "p50": 2.0, "p95": 2.9, "p99": 2.98, "max": 3.0, "mean": 2.0}
    assert summarize_ms([])["p99"] is None


def test_cdf_is_downsampled_monotonic_and_ends_at_the_max():
    xs = [i / 1000 for i in range(1, 1001)]
    cdf = cdf_points(xs, points=50)
    assert len(cdf) <= 51
    assert cdf[-1] == [1000.0, 1.0]
    assert all(a[0] <= b[0] and a[1] < b[1] for a, b in zip(cdf, cdf[1:]))
    assert cdf_points([]) == []
