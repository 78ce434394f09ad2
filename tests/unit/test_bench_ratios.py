"""Ratios of pairs measured back to back (bench/common.py): the median of the
pairs' ratios, and the Measurement reporting it."""
from __future__ import annotations

import math

from bench.common import Measurement, paired_ratio


def test_paired_ratio_is_the_median_of_the_pairs_ratios():
    # a load burst slows both halves of pair 2: the pairs' ratios stay 0.5, while
    # the ratio of the medians would not
    assert paired_ratio([50, 400, 60], [100, 800, 120]) == 0.5
    assert paired_ratio([1, 2, 3, 4], [1, 1, 1, 1]) == 2.5


def test_pairs_without_a_positive_baseline_are_left_out():
    assert paired_ratio([5, 7], [0, 14]) == 0.5
    assert paired_ratio([5], [0]) is None
    assert paired_ratio([], []) is None


def test_measurement_reports_the_paired_ratio_when_it_has_one():
    m = Measurement("s", "k", "n", 10.0, "ns/pkt", "b", 40.0)
    assert m.ratio == 0.25
    m.paired_ratio = 0.3
    assert m.ratio == 0.3 and m.to_json()["ratio"] == 0.3 and m.to_json()["paired_ratio"] == 0.3
    nan = Measurement("s", "k", "n", float("nan"), "ns/pkt", "b", 40.0)
    assert math.isnan(nan.ratio) and nan.to_json()["ratio"] is None
