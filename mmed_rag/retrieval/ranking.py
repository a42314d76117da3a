"""Recall@k from similarity scores, with ties broken at random in expectation.

A rank is the number of candidates placed above the right one. Candidates scored strictly higher always are;
candidates tied with it are above it in some orders and below it in others. Counting ties as below ("ties favour
the query") gives a retriever whose embeddings have collapsed to one point recall 1.0 at every k: every candidate
ties. Counting them as above (the pessimistic rank) gives it 0, and punishes a real retriever for the exact ties
that quantised or duplicated embeddings produce. Here each recall is the expectation over a uniformly random order
of the tied candidates, which is what a retriever that cannot tell them apart would score in use: chance for a
collapsed model, and the plain recall when there are no ties.

Non-finite scores are errors, never ranks: NaN compares false with everything, so it would rank first.
"""

from __future__ import annotations

import math

import numpy as np

from mmed_rag.errors import MMedRAGError


class NonFiniteScoresError(MMedRAGError, ValueError):
    """Similarities (or the embeddings behind them) hold NaN or infinity: a model that diverged."""


def check_finite(values: np.ndarray, what: str) -> None:
    """Raise :class:`NonFiniteScoresError` naming ``what`` when ``values`` hold NaN or infinity."""
    bad = ~np.isfinite(values)
    if bad.any():
        raise NonFiniteScoresError(
            f"{what}: {int(bad.sum())} of {bad.size} values are NaN or infinite (the model has diverged)"
        )


def recall_at_k(above: np.ndarray, tied: np.ndarray, k: int) -> np.ndarray:
    """P(rank < k) per query, when ``above`` candidates score higher and ``tied`` others tie with the right one.

    With the ties in random order the right candidate's rank is uniform on ``above .. above + tied``.
    """
    return np.clip((k - above) / (tied + 1), 0.0, 1.0)


def any_in_top_k(above: np.ndarray, tied_own: np.ndarray, tied_other: np.ndarray, k: int) -> np.ndarray:
    """P(at least one right candidate in the top k), several right candidates per query.

    ``above``: wrong candidates scored higher than the best right one; at that best score tie ``tied_own`` right
    candidates (at least 1) and ``tied_other`` wrong ones, in random order. With ``r = k - above`` places left,
    the top k misses every right candidate when the first ``r`` of the tie group are all wrong.
    """
    result = np.empty(len(above))
    for position, (over, own, other) in enumerate(zip(above, tied_own, tied_other, strict=True)):
        places = k - int(over)
        if places <= 0:
            result[position] = 0.0
        else:
            group = int(own) + int(other)
            result[position] = 1.0 - math.comb(int(other), places) / math.comb(group, min(places, group))
    return result
