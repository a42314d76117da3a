"""Yes/no VQA metrics with bootstrap confidence intervals: accuracy, precision, recall, F1 and AUC.

Answers are free text; :func:`mmed_rag.eval.yesno.parse_yes_no` turns each into "yes", "no" or None. A prediction
that does not parse is counted (``unparseable``) and is always wrong: it is never a positive prediction and never
matches the gold label, so a model cannot gain by hedging. Gold answers must parse; the caller decides what to do
with those that do not (see :mod:`mmed_rag.eval.examples`).

Precision, recall and F1 are for one positive class (``positive``, "yes" by default, as in the MMed-RAG tables);
AUC needs a score per answer, ``P(yes)`` from ``mmed-rag generate --yes-no-scores``. Confidence intervals are
percentile intervals over ``bootstrap`` resamples of the examples, all metrics computed on the same resamples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

from mmed_rag.eval.yesno import NO, YES

METRICS = ("accuracy", "precision", "recall", "f1", "auc")


@dataclass(frozen=True)
class Estimate:
    """A metric on the whole set and its bootstrap 95% interval (None where the set cannot define it)."""

    value: float | None
    low: float | None
    high: float | None

    def to_dict(self) -> dict:
        return {"value": self.value, "ci95": [self.low, self.high]}


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator with 0 where the denominator is 0 (scikit-learn's ``zero_division=0``)."""
    numerator, denominator = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def _counting_metrics(gold_positive: np.ndarray, predicted_positive: np.ndarray, correct: np.ndarray) -> dict:
    """Accuracy, precision, recall, F1 along the last axis (one row per bootstrap resample, or a single row)."""
    true_positive = (gold_positive & predicted_positive).sum(-1)
    precision = _safe_ratio(true_positive, predicted_positive.sum(-1))
    recall = _safe_ratio(true_positive, gold_positive.sum(-1))
    return {
        "accuracy": correct.mean(-1),
        "precision": precision,
        "recall": recall,
        "f1": _safe_ratio(2 * precision * recall, precision + recall),
    }


def _auc(gold_positive: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC AUC along the last axis by the rank-sum (Mann-Whitney) formula, ties counted half; NaN without both
    classes."""
    ranks = rankdata(scores, axis=-1)
    positives = gold_positive.sum(-1)
    negatives = gold_positive.shape[-1] - positives
    rank_sum = (ranks * gold_positive).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)
    return np.where((positives > 0) & (negatives > 0), auc, np.nan)


def yes_no_metrics(
    gold: Sequence[str],
    predicted: Sequence[str | None],
    scores: Sequence[float] | None = None,
    *,
    positive: str = YES,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict:
    """Metrics of parsed predictions against gold labels, each an :class:`Estimate`, plus the counts.

    ``gold``: "yes"/"no" per example; ``predicted``: "yes"/"no"/None (unparseable); ``scores``: P(yes) per
    example, for AUC (omitted: no AUC). ``bootstrap=0`` gives point values without intervals.
    """
    if positive not in (YES, NO):
        raise ValueError(f"positive must be {YES!r} or {NO!r}, got {positive!r}")
    if len(gold) != len(predicted) or (scores is not None and len(scores) != len(gold)):
        raise ValueError("gold, predicted (and scores) must have one entry per example")
    if any(label not in (YES, NO) for label in gold):
        raise ValueError("every gold label must be 'yes' or 'no'; parse and filter the gold answers first")
    gold_positive = np.array([label == positive for label in gold], dtype=bool)
    predicted_positive = np.array([label == positive for label in predicted], dtype=bool)
    correct = np.array([truth == guess for truth, guess in zip(gold, predicted, strict=True)], dtype=bool)
    positive_scores = None
    if scores is not None:
        positive_scores = np.asarray(scores, dtype=np.float64)
        if positive == NO:
            positive_scores = 1.0 - positive_scores

    def compute(rows: np.ndarray | slice) -> dict[str, np.ndarray]:
        values = _counting_metrics(gold_positive[rows], predicted_positive[rows], correct[rows])
        if positive_scores is not None:
            values["auc"] = _auc(gold_positive[rows], positive_scores[rows])
        return values

    n = len(gold)
    point = {name: float(value) for name, value in compute(slice(None)).items()} if n else {}
    intervals: dict[str, tuple[float | None, float | None]] = {}
    if bootstrap > 0 and n:
        resamples = np.random.default_rng(seed).integers(0, n, size=(bootstrap, n))
        for name, values in compute(resamples).items():
            values = values[~np.isnan(values)]
            intervals[name] = (
                (float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))) if len(values) else (None, None)
            )
    estimates = {}
    for name in METRICS:
        if name not in point:
            continue
        value = None if np.isnan(point[name]) else point[name]
        estimates[name] = Estimate(value, *intervals.get(name, (None, None)))
    return {
        **estimates,
        "counts": {
            "n": n,
            "gold_yes": int(sum(label == YES for label in gold)),
            "gold_no": int(sum(label == NO for label in gold)),
            "predicted_yes": int(sum(label == YES for label in predicted)),
            "predicted_no": int(sum(label == NO for label in predicted)),
            "unparseable": int(sum(label is None for label in predicted)),
        },
    }


def metrics_to_dict(metrics: dict) -> dict:
    """The JSON form of :func:`yes_no_metrics`' result."""
    return {name: value.to_dict() if isinstance(value, Estimate) else value for name, value in metrics.items()}
