"""Selecting how many retrieved reports to keep: the documented table, edge cases, and reference definitions."""

import math

import numpy as np
import pytest

from mmed_rag.retrieval.select import KSelection, select_absolute, select_fixed, select_gap, select_ratio

TABLE_SCORES = [0.62, 0.60, 0.45, 0.44, 0.10, -0.05]


def original_ratio_rule(scores, k, threshold):
    """The released code's rule, verbatim in behaviour: it keeps every candidate whose ratio is below threshold."""
    values = np.asarray(scores, dtype=np.float64)
    with np.errstate(divide="ignore"):
        ratios = values.max() / values
    return min(k, int(np.count_nonzero(ratios < threshold)))


def test_the_documented_table():
    assert select_fixed(TABLE_SCORES, 5) == 5
    assert select_ratio(TABLE_SCORES, 5, 1.5) == 4
    assert select_gap(TABLE_SCORES, 5, 0.25) == 2
    assert select_absolute(TABLE_SCORES, 5, 0.5) == 2
    assert original_ratio_rule(TABLE_SCORES, 5, 1.5) == 5  # it keeps the negative candidate


def reference_ratio(values, k, threshold):
    kept = 0
    for i, value in enumerate(values[:k]):
        if i == 0 or (values[0] > 0 and value > 0 and values[0] / value < threshold):
            kept += 1
        else:
            break
    return kept


def reference_gap(values, k, gamma):
    kept = 0
    for i, value in enumerate(values[:k]):
        if i > 0:
            previous = values[i - 1]
            if previous <= 0 or value <= 0 or math.log(previous / value) > gamma:
                break
        kept += 1
    return kept


@pytest.mark.parametrize("seed", range(20))
def test_rules_match_their_plain_definitions_on_random_scores(seed):
    rng = np.random.default_rng(seed)
    values = np.sort(rng.uniform(-0.3, 1.0, rng.integers(0, 30)))[::-1]
    k = int(rng.integers(0, 12))
    threshold, gamma, floor = rng.uniform(1.01, 3.0), rng.uniform(0.01, 0.5), rng.uniform(-0.2, 0.8)
    assert select_fixed(values, k) == min(k, len(values))
    assert select_ratio(values, k, threshold) == reference_ratio(list(values), k, threshold)
    assert select_gap(values, k, gamma) == reference_gap(list(values), k, gamma)
    assert select_absolute(values, k, floor) == min(k, int(np.sum(values >= floor)))
    if len(values) and values[-1] > 0:  # on positive scores our ratio rule is exactly the original's
        assert select_ratio(values, k, threshold) == original_ratio_rule(values, k, threshold)


def test_ratio_rule_is_scale_invariant_like_the_originals_scaled_logits():
    cosine = np.array([0.31, 0.30, 0.22, 0.21, 0.05])
    assert select_ratio(cosine, 5, 1.4) == select_ratio(cosine * 100.0, 5, 1.4) == 2


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        ([-0.1, -0.2, -0.3], (1, 1, 0)),  # all negative: the best is kept by ratio and gap, none by absolute >= 0
        ([0.0, 0.0, 0.0], (1, 1, 3)),  # all zero: no division by zero
        ([0.5, 0.0, -0.1], (1, 1, 2)),  # a zero ends the prefix
        ([0.5, 0.5, 0.5], (3, 3, 3)),  # ties are kept together
        ([], (0, 0, 0)),  # nothing retrieved
    ],
)
def test_non_positive_and_degenerate_scores(scores, expected):
    assert (select_ratio(scores, 3, 1.5), select_gap(scores, 3, 0.2), select_absolute(scores, 3, 0.0)) == expected


def test_k_caps_every_rule_and_k_zero_keeps_nothing():
    scores = [0.9, 0.89, 0.88, 0.87]
    assert [select_fixed(scores, 10), select_ratio(scores, 2, 5.0), select_gap(scores, 3, 1.0)] == [4, 2, 3]
    assert select_absolute(scores, 0, 0.0) == select_ratio(scores, 0, 2.0) == select_gap(scores, 0, 1.0) == 0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: select_ratio([0.5, 0.4], 2, 1.0), "above 1"),
        (lambda: select_gap([0.5, 0.4], 2, 0.0), "gamma must be positive"),
        (lambda: select_fixed([0.5, float("nan")], 2), "NaN"),
        (lambda: select_fixed([0.4, 0.5], 2), "sorted best first"),
        (lambda: select_fixed([0.5], -1), "non-negative integer"),
        (lambda: KSelection("ratio", 5), "needs a threshold"),
        (lambda: KSelection("nearest", 5, 1.0), "unknown selection rule"),
    ],
)
def test_bad_arguments_are_clear(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_selection_from_the_original_flags():
    assert KSelection.from_original_flags(3) == KSelection("fixed", 3)
    ratio = KSelection.from_original_flags(5, clip_threshold=1.5)
    assert ratio == KSelection("ratio", 5, 1.5) and ratio(TABLE_SCORES) == 4
    assert KSelection("gap", 5, 0.25)(TABLE_SCORES) == 2 and KSelection("absolute", 5, 0.5)(TABLE_SCORES) == 2
