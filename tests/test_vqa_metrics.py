"""VQA metrics agree with scikit-learn, unparseable answers are wrong, and the intervals behave."""

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from mmed_rag.eval.vqa import metrics_to_dict, yes_no_metrics


def random_answers(seed, n=300):
    rng = np.random.default_rng(seed)
    gold = rng.choice(["yes", "no"], size=n, p=[0.4, 0.6]).tolist()
    predicted = rng.choice(["yes", "no", None], size=n, p=[0.45, 0.45, 0.1]).tolist()
    scores = rng.random(n).round(2).tolist()  # rounded: ties must count half, as in scikit-learn
    return gold, predicted, scores


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("positive", ["yes", "no"])
def test_point_values_equal_scikit_learn(seed, positive):
    gold, predicted, scores = random_answers(seed)
    metrics = yes_no_metrics(gold, predicted, scores, positive=positive, bootstrap=0)
    y_true = [label == positive for label in gold]
    y_pred = [label == positive for label in predicted]
    as_classes = [label or "unparseable" for label in predicted]
    assert metrics["accuracy"].value == pytest.approx(accuracy_score(gold, as_classes), abs=1e-9)
    assert metrics["precision"].value == pytest.approx(precision_score(y_true, y_pred, zero_division=0), abs=1e-9)
    assert metrics["recall"].value == pytest.approx(recall_score(y_true, y_pred, zero_division=0), abs=1e-9)
    assert metrics["f1"].value == pytest.approx(f1_score(y_true, y_pred, zero_division=0), abs=1e-9)
    positive_scores = scores if positive == "yes" else [1 - score for score in scores]
    assert metrics["auc"].value == pytest.approx(roc_auc_score(y_true, positive_scores), abs=1e-9)
    assert metrics["counts"]["unparseable"] == predicted.count(None)


def test_unparseable_answers_are_wrong_and_never_positive():
    metrics = yes_no_metrics(["no", "no", "yes"], [None, None, "yes"], bootstrap=0)
    assert metrics["accuracy"].value == pytest.approx(1 / 3)
    assert metrics["precision"].value == 1.0 and metrics["recall"].value == 1.0
    flipped = yes_no_metrics(["no", "no", "yes"], [None, None, "yes"], positive="no", bootstrap=0)
    assert flipped["recall"].value == 0.0  # a hedge is not a "no"


def test_bootstrap_interval_contains_the_value_and_narrows_with_more_data():
    gold, predicted, scores = random_answers(0, n=100)
    small = yes_no_metrics(gold, predicted, scores, bootstrap=500, seed=1)
    big_gold, big_predicted, big_scores = random_answers(0, n=2000)
    big = yes_no_metrics(big_gold, big_predicted, big_scores, bootstrap=500, seed=1)
    for name in ("accuracy", "precision", "recall", "f1", "auc"):
        estimate = small[name]
        assert estimate.low <= estimate.value <= estimate.high
        assert big[name].high - big[name].low < estimate.high - estimate.low
    again = yes_no_metrics(gold, predicted, scores, bootstrap=500, seed=1)
    assert metrics_to_dict(again) == metrics_to_dict(small)  # seeded


def test_perfect_answers_and_a_single_class():
    metrics = yes_no_metrics(["yes", "no", "yes"], ["yes", "no", "yes"], [0.9, 0.1, 0.8], bootstrap=200)
    assert all(metrics[name].value == 1.0 for name in ("accuracy", "precision", "recall", "f1", "auc"))
    one_class = yes_no_metrics(["yes", "yes"], ["yes", "no"], [0.9, 0.1], bootstrap=0)
    assert one_class["auc"].value is None  # undefined, not 0 or 0.5
    assert "auc" not in yes_no_metrics(["yes"], ["yes"], bootstrap=0)  # no scores: no AUC


def test_gold_labels_must_be_parsed_first():
    with pytest.raises(ValueError, match="gold label"):
        yes_no_metrics(["yes", None], ["yes", "no"])
    with pytest.raises(ValueError, match="one entry per example"):
        yes_no_metrics(["yes"], ["yes", "no"])
