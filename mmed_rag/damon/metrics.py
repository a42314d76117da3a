"""Finding-level scoring of difference answers: what was added, removed or changed, compared as sets.

N-gram metrics reward a difference answer for its template ("the main image has an additional finding of ... than
the reference image") whatever findings it names. Here both the prediction and the reference are read back into
findings, by MIMIC-Diff-VQA's answer wording (its generator, Holipori/MIMIC-Diff-VQA ``question_gen.py``):

- "the main image has an additional finding of X than the reference image." / "... additional findings of X, Y and
  Z ..." -> X, Y, Z added;
- "the main image is missing the finding(s) of ..." -> removed;
- "the level of X has changed from A to B." -> X changed;
- "nothing has changed." -> nothing.

:func:`difference_f1` then scores ``(kind, finding)`` items over a set of answers: micro precision, recall and F1
(true positives summed over answers), and the share of answers whose whole set is right (an empty set counts: a
right "nothing has changed." is exact). A prediction the wording cannot read contributes no items: it is counted
in ``unread`` and can only lower recall.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

ADDED, REMOVED, CHANGED = "added", "removed", "changed"

_ADDED = re.compile(r"the main image has (?:an )?additional findings? of (?P<names>.+?) than the reference image")
_REMOVED = re.compile(r"the main image is missing the findings? of (?P<names>.+?) than the reference image")
_CHANGED = re.compile(r"the level of (?P<name>.+?) has changed from .+? to .+?(?:\.|$)")
_NOTHING = re.compile(r"\bnothing has changed\b")


@dataclass(frozen=True)
class Difference:
    """The findings a difference answer names, by kind; ``read`` is False when none of the wording was found."""

    items: frozenset[tuple[str, str]]
    read: bool


def _names(listed: str) -> list[str]:
    """ "a, b and c" -> [a, b, c] (names may hold spaces: "pleural effusion")."""
    parts = re.split(r",\s*|\s+and\s+", listed.strip())
    return [part.strip() for part in parts if part.strip()]


def parse_difference(answer: str) -> Difference:
    """The ``(kind, finding)`` items of one difference answer (lower-cased, whitespace collapsed)."""
    text = " ".join(answer.lower().split())
    items: set[tuple[str, str]] = set()
    for pattern, kind in ((_ADDED, ADDED), (_REMOVED, REMOVED)):
        for match in pattern.finditer(text):
            items.update((kind, name) for name in _names(match["names"]))
    items.update((CHANGED, match["name"].strip()) for match in _CHANGED.finditer(text))
    return Difference(frozenset(items), bool(items) or _NOTHING.search(text) is not None)


def difference_f1(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Micro precision / recall / F1 of the findings named as added, removed or changed, the share of answers
    exactly right, and how many predictions could not be read; every reference must be readable."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("no answers to score")
    true_positive = predicted = expected = exact = unread = 0
    for position, (prediction, reference) in enumerate(zip(predictions, references, strict=True)):
        gold = parse_difference(reference)
        if not gold.read:
            raise ValueError(f"reference {position} is not a difference answer: {reference!r}")
        guess = parse_difference(prediction)
        unread += not guess.read
        true_positive += len(guess.items & gold.items)
        predicted += len(guess.items)
        expected += len(gold.items)
        exact += guess.read and guess.items == gold.items
    precision = true_positive / predicted if predicted else 0.0
    recall = true_positive / expected if expected else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "exact": exact / len(references),
        "unread": unread,
        "n": len(references),
    }
