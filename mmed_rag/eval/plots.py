"""The PNG figures of ``mmed-rag eval``: what people look at before they read the JSON."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mmed_rag.atomic import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> Path:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(figure)
    return path


def bar_chart(
    path: Path,
    values: Mapping[str, float | None],
    intervals: Mapping[str, tuple[float | None, float | None]] | None = None,
    *,
    title: str,
    ylabel: str,
    ylim: tuple[float, float] | None = (0.0, 1.0),
    baselines: Mapping[str, float] | None = None,
    baseline_label: str = "chance",
) -> Path:
    """One bar per entry, with its 95% interval as an error bar where known; missing values are left blank.

    Each value is written above its bar and its error bar, so the two never cross. ``baselines`` draws a dashed
    mark across the bars that have one (what a trivial answerer scores there), labelled ``baseline_label``.
    """
    plt = _pyplot()
    names = list(values)
    heights = [values[name] if values[name] is not None else 0.0 for name in names]
    figure, axes = plt.subplots(figsize=(max(4.0, 1.1 * len(names) + 2), 3.6))
    bars = axes.bar(range(len(names)), heights, color="#4c72b0")
    tops = list(heights)
    for position, name in enumerate(names):
        low, high = (intervals or {}).get(name, (None, None))
        if values[name] is not None and low is not None and high is not None:
            # A percentile bootstrap interval need not contain the point value (small or skewed sets).
            below, above = max(0.0, values[name] - low), max(0.0, high - values[name])
            axes.errorbar(position, values[name], yerr=[[below], [above]], color="k", capsize=3)
            tops[position] = max(tops[position], high)
    marked = False
    for position, name in enumerate(names):
        if baselines and baselines.get(name) is not None:
            axes.hlines(
                baselines[name], position - 0.45, position + 0.45, colors="#dd8452", linestyles="--", linewidth=2,
                label=None if marked else baseline_label,
            )  # fmt: skip
            marked = True
    span = (ylim[1] - ylim[0]) if ylim is not None else max(tops + [1e-9])
    for bar, name, top in zip(bars, names, tops, strict=True):
        label = "n/a" if values[name] is None else f"{values[name]:.3f}"
        axes.annotate(label, (bar.get_x() + bar.get_width() / 2, top + 0.015 * span), ha="center", va="bottom")
    axes.set_xticks(range(len(names)), names, rotation=20, ha="right")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    if ylim is not None:
        axes.set_ylim(ylim[0], ylim[1] + 0.1 * span)  # room for the labels above a full bar
        axes.set_yticks(np.linspace(ylim[0], ylim[1], 6))
    if marked:
        axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return _save(figure, path)


def confusion_matrix(path: Path, gold: Sequence[str], predicted: Sequence[str | None], *, title: str) -> Path:
    """Gold yes/no against predicted yes/no/unparseable, with counts in the cells."""
    plt = _pyplot()
    rows, columns = ["yes", "no"], ["yes", "no", None]
    counts = np.array(
        [
            [sum(g == row and p == column for g, p in zip(gold, predicted, strict=True)) for column in columns]
            for row in rows
        ]
    )
    figure, axes = plt.subplots(figsize=(4.4, 3.4))
    axes.imshow(counts, cmap="Blues", vmin=0, vmax=max(int(counts.max()), 1))
    for (row, column), count in np.ndenumerate(counts):
        dark = count > counts.max() / 2  # white on the dark half of the colour map, black on the light half
        axes.text(column, row, str(count), ha="center", va="center", color="white" if dark else "black", fontsize=11)
    axes.set_xticks(range(3), ["yes", "no", "unparseable"])
    axes.set_yticks(range(2), rows)
    axes.set_xlabel("predicted")
    axes.set_ylabel("gold")
    axes.set_title(title)
    return _save(figure, path)


def roc_curve(path: Path, gold_positive: Sequence[bool], scores: Sequence[float], *, auc: float, title: str) -> Path:
    """The ROC curve of the yes/no scores (step curve over all thresholds)."""
    from sklearn.metrics import roc_curve as curve

    plt = _pyplot()
    false_positive, true_positive, _ = curve(gold_positive, scores)
    figure, axes = plt.subplots(figsize=(4.0, 4.0))
    axes.plot(false_positive, true_positive, label=f"AUC {auc:.3f}")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate")
    axes.set_title(title)
    axes.legend(loc="lower right")
    return _save(figure, path)
