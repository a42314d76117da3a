"""A pixel probe for phantom data: evidence that the labels live in the pixels, not only in the reports.

A linear classifier on pixel features is trained on the retriever train split and scored on the test split,
for the modality and for each finding. If the phantoms were noise (or the findings were only written in the
report), its accuracy would sit at the majority-class rate; the demo prints both side by side.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmed_rag.data.images import load_image
from mmed_rag.data.records import ImageReportRecord, read_report_test, read_retriever_train


@dataclass(frozen=True)
class ProbeScore:
    task: str  # "modality" or "<modality>:<finding>"
    accuracy: float  # on the test split
    majority: float  # accuracy of always answering the most frequent training label
    n_test: int


def pixel_features(image_root: str | Path, records: list[ImageReportRecord], side: int = 16) -> np.ndarray:
    """Each record's first image as downsampled pixels plus colour histograms, in [0, 1].

    The ``side`` x ``side`` RGB thumbnail carries findings that sit in one place (a large heart, a basal
    opacity); the per-channel histograms of the full image carry small ones whose position varies (a nodule,
    drusen, haemorrhages), which a linear model cannot find in raw pixels.
    """
    rows = []
    for record in records:
        image = load_image(image_root, record.images[0])
        thumbnail = np.asarray(image.resize((side, side)), dtype=np.float32).ravel() / 255.0
        pixels = np.asarray(image).reshape(-1, 3)
        histograms = [np.histogram(pixels[:, c], bins=_HISTOGRAM_BINS, range=(0, 256))[0] for c in range(3)]
        rows.append(np.concatenate([thumbnail, np.concatenate(histograms) / len(pixels)]))
    return np.stack(rows)


_HISTOGRAM_BINS = 32


def _score(task: str, train_x, train_y, test_x, test_y) -> ProbeScore:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    values, counts = np.unique(train_y, return_counts=True)
    majority = float(np.mean(test_y == values[np.argmax(counts)]))
    if len(values) < 2:  # a finding never drawn in training: nothing to learn
        return ProbeScore(task, majority, majority, len(test_y))
    # Strong regularisation: a few hundred images of a few hundred pixels each.
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000))
    model.fit(train_x, train_y)
    return ProbeScore(task, float(model.score(test_x, test_y)), majority, len(test_y))


def probe_phantoms(phantom_dir: str | Path, side: int = 16) -> list[ProbeScore]:
    """Scores for the modality and every finding of a ``make-phantoms`` output directory."""
    phantom_dir = Path(phantom_dir)
    manifest = json.loads((phantom_dir / "manifest.json").read_text(encoding="utf-8"))
    image_root = phantom_dir / manifest["image_root"]
    train, test = [], []
    for modality in manifest["findings"]:
        train += read_retriever_train(phantom_dir / "training/retriever" / modality / f"{modality}_train.json").records
        test += read_report_test(phantom_dir / "test/report" / f"{modality}_test.json").records
    train_x, test_x = pixel_features(image_root, train, side), pixel_features(image_root, test, side)
    train_modality = np.array([r.extra["modality"] for r in train])
    test_modality = np.array([r.extra["modality"] for r in test])
    scores = [_score("modality", train_x, train_modality, test_x, test_modality)]
    for modality, findings in manifest["findings"].items():
        train_rows, test_rows = train_modality == modality, test_modality == modality
        for finding in findings:
            train_y = np.array([finding in r.extra["findings"] for r in train])[train_rows]
            test_y = np.array([finding in r.extra["findings"] for r in test])[test_rows]
            scores.append(_score(f"{modality}:{finding}", train_x[train_rows], train_y, test_x[test_rows], test_y))
    return scores
