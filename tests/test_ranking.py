"""Recall@k with ties broken at random in expectation: chance for a collapsed retriever, NaN an error.

Checked against open_clip's own validation metric and scikit-learn on tie-free data, and against every order
of the tied candidates on small data with ties.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from open_clip_train.train import get_clip_metrics
from sklearn.metrics import top_k_accuracy_score

from mmed_rag.retrieval.finetune import chance_recall, retrieval_recall, select_best
from mmed_rag.retrieval.ranking import NonFiniteScoresError


def normalised(rng, rows: int, dim: int = 16) -> np.ndarray:
    values = rng.normal(size=(rows, dim))
    return values / np.linalg.norm(values, axis=1, keepdims=True)


def images_per_report(rng, reports: int, images: int) -> np.ndarray:
    """Every report has at least one image; the rest are spread at random (several views per report)."""
    return rng.permutation(np.concatenate([np.arange(reports), rng.integers(0, reports, images - reports)]))


@pytest.mark.parametrize("reports, images", [(50, 50), (20, 50), (7, 30)])
def test_a_collapsed_retriever_scores_chance_both_ways(reports, images):
    image_report = images_per_report(np.random.default_rng(reports), reports, images)
    constant = np.ones((1, 8)) / np.sqrt(8)
    ks = (1, 2, 5, 10)
    recall = retrieval_recall(np.repeat(constant, images, 0), np.repeat(constant, reports, 0), image_report, ks)
    chance = chance_recall(image_report, ks)
    for key, value in chance.items():
        assert recall[key] == pytest.approx(value, abs=1e-9), key
    assert recall["image_to_report_R@1"] < 1.0


@pytest.mark.parametrize("where", ["all", "one image", "one report"])
def test_non_finite_embeddings_are_an_error_not_a_score(where):
    rng = np.random.default_rng(0)
    images, reports = normalised(rng, 10), normalised(rng, 10)
    if where == "all":
        images[:], reports[:] = np.nan, np.nan
    elif where == "one image":
        images[3, 0] = np.nan
    else:
        reports[2, 5] = np.inf
    with pytest.raises(NonFiniteScoresError, match="NaN or infinite"):
        retrieval_recall(images, reports, np.arange(10))


@pytest.mark.parametrize("seed", range(4))
def test_without_ties_it_is_open_clips_validation_recall(seed):
    rng = np.random.default_rng(seed)
    images, reports = normalised(rng, 64), normalised(rng, 64)
    ours = retrieval_recall(images, reports, np.arange(64))
    theirs = get_clip_metrics(torch.from_numpy(images), torch.from_numpy(reports), logit_scale=1.0)
    for k in (1, 5, 10):
        assert ours[f"image_to_report_R@{k}"] == pytest.approx(theirs[f"image_to_text_R@{k}"], abs=1e-12)
        assert ours[f"report_to_image_R@{k}"] == pytest.approx(theirs[f"text_to_image_R@{k}"], abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_without_ties_image_to_report_is_sklearns_top_k_accuracy(seed):
    rng = np.random.default_rng(seed)
    image_report = images_per_report(rng, 12, 40)
    images, reports = normalised(rng, 40), normalised(rng, 12)
    ours = retrieval_recall(images, reports, image_report, ks=(1, 3, 5))
    similarity = images @ reports.T
    for k in (1, 3, 5):
        expected = top_k_accuracy_score(image_report, similarity, k=k, labels=np.arange(12))
        assert ours[f"image_to_report_R@{k}"] == pytest.approx(expected, abs=1e-12)


def every_order_recall(similarity: np.ndarray, image_report: np.ndarray, k: int) -> tuple[float, float]:
    """Recall@k both ways averaged over every order of tied candidates (a stable sort after each permutation)."""
    n_images, n_reports = similarity.shape
    per_image = []
    for image in range(n_images):
        hits = []
        for order in itertools.permutations(range(n_reports)):
            ranked = sorted(order, key=lambda report: -similarity[image, report])  # stable: ties keep `order`
            hits.append(image_report[image] in ranked[:k])
        per_image.append(np.mean(hits))
    per_report = []
    for report in range(n_reports):
        hits = []
        for order in itertools.permutations(range(n_images)):
            ranked = sorted(order, key=lambda image: -similarity[image, report])
            hits.append(any(image_report[image] == report for image in ranked[:k]))
        per_report.append(np.mean(hits))
    return float(np.mean(per_image)), float(np.mean(per_report))


@pytest.mark.parametrize("seed", range(3))
def test_with_ties_it_is_the_mean_over_every_order_of_the_tied(seed):
    rng = np.random.default_rng(seed)
    image_report = np.array([0, 0, 1, 2, 3, 3])  # 6 images, 4 reports, two reports with two views
    # Coarse integer embeddings: many exact ties, between right and wrong candidates and among own views.
    images = rng.integers(0, 2, size=(6, 3)).astype(float)
    reports = rng.integers(0, 2, size=(4, 3)).astype(float)
    similarity = images @ reports.T
    for k in (1, 2, 3):
        ours = retrieval_recall(images, reports, image_report, ks=(k,))
        to_report, to_image = every_order_recall(similarity, image_report, k)
        assert ours[f"image_to_report_R@{k}"] == pytest.approx(to_report, abs=1e-12)
        assert ours[f"report_to_image_R@{k}"] == pytest.approx(to_image, abs=1e-12)


def test_a_collapsed_epoch_never_replaces_a_real_one_as_best():
    rng = np.random.default_rng(0)
    image_report = np.arange(30)
    reports = normalised(rng, 30)
    learned = reports + 0.3 * normalised(rng, 30)  # images near their own reports
    learned /= np.linalg.norm(learned, axis=1, keepdims=True)
    collapsed = np.repeat(reports[:1], 30, 0)
    real = {"loss": 1.0, **retrieval_recall(learned, reports, image_report)}
    degenerate = {"loss": 0.5, **retrieval_recall(collapsed, np.repeat(reports[:1], 30, 0), image_report)}
    first = select_best(None, real, 1, "image_to_report_R@5")
    assert select_best(first, degenerate, 2, "image_to_report_R@5") is None  # even with a lower val loss
    assert select_best(select_best(None, degenerate, 1, "image_to_report_R@5"), real, 2, "image_to_report_R@5")
