"""How many retrieved reports to keep: MMed-RAG's adaptive retrieved-context selection, as pure functions.

Every rule looks at the similarities of the top candidates, best first, and keeps a prefix of them, capped at
``k``. The number kept is what batch retrieval writes as ``retrieve_k``.

======================  =====================================================  ============================
rule                    keeps candidate i (1-based) while                      original flag / source
======================  =====================================================  ============================
``fixed``               i <= k                                                 ``--fixed_k``
``ratio``               s_1 / s_i < threshold                                  ``--clip_threshold``
``gap``                 no earlier gap log(s_j / s_{j+1}) > gamma, j < i        the paper (Sec. 3.2)
``absolute``            s_i >= threshold                                       --
======================  =====================================================  ============================

On the scores ``[0.62, 0.60, 0.45, 0.44, 0.10, -0.05]`` with ``k = 5`` (``tests/test_select.py`` checks this
table):

========================  ====  ==================================================================
rule                      kept  why
========================  ====  ==================================================================
fixed                     5     the cap
ratio, threshold 1.5      4     0.62 / 0.10 = 6.2 >= 1.5 stops at the fifth
gap, gamma 0.25           2     log(0.60 / 0.45) = 0.29 > 0.25 is the first large gap
absolute, threshold 0.5   2     0.45 < 0.5
original ratio code       5     0.62 / -0.05 = -12.4 < 1.5, so the negative candidate is kept
========================  ====  ==================================================================

Similarities that are zero or negative: the ratio and gap rules compare magnitudes and only mean something for
positive similarities. The original code divided anyway (on logits scaled by CLIP's logit scale, which changes
nothing since the ratio is scale-invariant): a negative candidate gave a negative ratio, always below the
threshold, so it was kept, and a zero gave a division by zero. Here a non-positive similarity is never kept by
those two rules (it ends the prefix), except that the best candidate is always kept, as the original keeps it
whenever its threshold is above 1 (``s_1 / s_1 = 1``): MMed-RAG's prompts always carry at least one report. The
``absolute`` rule may keep none.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Rule = Literal["fixed", "ratio", "gap", "absolute"]
RULES: tuple[str, ...] = ("fixed", "ratio", "gap", "absolute")


def _checked(scores: Sequence[float] | np.ndarray, k: int) -> np.ndarray:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k!r}")
    values = np.asarray(scores, dtype=np.float64).ravel()
    if np.isnan(values).any():
        raise ValueError("similarity scores contain NaN")
    if values.size > 1 and np.any(np.diff(values) > 0):
        raise ValueError("similarity scores must be sorted best first (descending)")
    return values


def select_fixed(scores: Sequence[float] | np.ndarray, k: int) -> int:
    """Keep the top ``k`` (fewer when there are fewer candidates)."""
    return min(k, _checked(scores, k).size)


def select_ratio(scores: Sequence[float] | np.ndarray, k: int, threshold: float) -> int:
    """The original ``--clip_threshold`` rule: keep candidate i while ``s_1 / s_i < threshold``."""
    if not threshold > 1:
        raise ValueError(f"the ratio threshold must be above 1 (s_1 / s_1 = 1 is never below it), got {threshold}")
    values = _checked(scores, k)
    kept = min(1, k, values.size)
    best = values[0] if values.size else 0.0
    while kept < min(k, values.size) and best > 0 and values[kept] > 0 and best / values[kept] < threshold:
        kept += 1
    return kept


def select_gap(scores: Sequence[float] | np.ndarray, k: int, gamma: float) -> int:
    """The paper's rule: cut at the first large drop, ``log(s_i / s_{i+1}) > gamma``."""
    if not gamma > 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    values = _checked(scores, k)
    kept = min(1, k, values.size)
    while kept < min(k, values.size):
        previous, candidate = values[kept - 1], values[kept]
        if previous <= 0 or candidate <= 0 or math.log(previous / candidate) > gamma:
            break
        kept += 1
    return kept


def select_absolute(scores: Sequence[float] | np.ndarray, k: int, threshold: float) -> int:
    """Keep candidates whose similarity is at least ``threshold`` (possibly none)."""
    values = _checked(scores, k)
    return min(k, int(np.count_nonzero(values >= threshold)))


@dataclass(frozen=True)
class KSelection:
    """A selection rule with its parameters: ``threshold`` is the ratio, gamma or minimum similarity."""

    rule: Rule = "fixed"
    k: int = 5
    threshold: float | None = None

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown selection rule {self.rule!r}; expected one of {', '.join(RULES)}")
        if self.rule != "fixed" and self.threshold is None:
            raise ValueError(f"the {self.rule!r} rule needs a threshold")
        # Thresholds that can never select more than the best candidate, or never any: refused before any work.
        if self.rule == "ratio" and not self.threshold > 1:
            raise ValueError(
                f"the ratio threshold must be above 1 (s_1 / s_1 = 1 is never below it), got {self.threshold}"
            )
        if self.rule == "gap" and not self.threshold > 0:
            raise ValueError(f"gamma must be positive, got {self.threshold}")
        if self.rule == "absolute" and not -1 <= self.threshold <= 1:
            raise ValueError(f"a minimum cosine similarity must lie in [-1, 1], got {self.threshold}")

    @classmethod
    def from_original_flags(cls, fixed_k: int, clip_threshold: float | None = None) -> KSelection:
        """``--fixed_k K`` alone is a fixed k; with ``--clip_threshold T`` it is the ratio rule capped at K."""
        return cls("fixed", fixed_k) if clip_threshold is None else cls("ratio", fixed_k, clip_threshold)

    @classmethod
    def from_options(
        cls, fixed_k: int, clip_threshold: float | None, rule: Rule | None, threshold: float | None
    ) -> KSelection:
        """The options of batch retrieval and generation: an explicit rule, else the original flags.

        A bad value is a ``ValueError`` naming the option that holds it.
        """
        try:
            return cls.from_original_flags(fixed_k, clip_threshold) if rule is None else cls(rule, fixed_k, threshold)
        except ValueError as error:
            flag = "--clip_threshold" if rule is None else f"--select-threshold (rule {rule!r})"
            raise ValueError(f"{flag}: {error}") from None

    def __call__(self, scores: Sequence[float] | np.ndarray) -> int:
        """The number of leading candidates to keep."""
        if self.rule == "fixed":
            return select_fixed(scores, self.k)
        rule = {"ratio": select_ratio, "gap": select_gap, "absolute": select_absolute}[self.rule]
        return rule(scores, self.k, self.threshold)
