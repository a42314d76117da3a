"""The preliminary diagnosis: condition labels per image, asked of the VLM, scored, and put into the prompt.

DAMON puts a preliminary diagnosis of the images into the question's prompt. It gets the labels from its own
fine-tuned model, asked one binary question per condition (its DPM stage and ``model/eval/diagnosis.py``, which
asks "... If <condition> is present, output 1; otherwise, output 0."); the glue that turns the labels into prompt
text was never released. Here:

- :func:`condition_question` asks about one condition (our short wording, in the same answer convention) and
  :func:`parse_condition_answer` reads the reply: a leading 1 or 0 (or yes / no), else ``None``;
- :func:`diagnosis_text` writes the labels of each image as the prompt's preliminary diagnosis, role by role
  ("The main image shows signs of cardiomegaly and pleural effusion. The reference image shows signs of
  cardiomegaly."); the wording is ours;
- :func:`diagnosis_metrics` scores labels per condition as DAMON reports them: accuracy and the macro precision,
  recall and F1 over the two classes (absent, present), with scikit-learn's definitions, and their mean over the
  conditions.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from mmed_rag.damon.data import DAMON_CONDITIONS, ROLES, listed

_LEADING_DIGIT = re.compile(r"^\W*([01])(?!\d)")
_LEADING_WORD = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)


def condition_question(condition: str, image_token: bool = True) -> str:
    """The binary question about one condition, answered 1 (present) or 0 (absent)."""
    text = f"Does this chest X-ray show {condition}? If {condition} is present, output 1; otherwise, output 0."
    return f"<image>\n{text}" if image_token else text


def parse_condition_answer(text: str) -> int | None:
    """1 or 0 from a reply that starts with it (or with yes / no); ``None`` when it does neither."""
    digit = _LEADING_DIGIT.match(text)
    if digit:
        return int(digit.group(1))
    word = _LEADING_WORD.match(text)
    if word:
        return 1 if word.group(1).lower() == "yes" else 0
    return None


def diagnosis_text(labels_by_image: Sequence[Sequence[int]], conditions: Sequence[str] = DAMON_CONDITIONS) -> str:
    """The preliminary diagnosis of images in role order (main, reference, ...): one sentence per image.

    An image whose labels are empty, or only "no finding", "shows no sign of these conditions".
    """
    if len(labels_by_image) > len(ROLES):
        raise ValueError(f"at most {len(ROLES)} images, got {len(labels_by_image)}")
    sentences = []
    for role, labels in zip(ROLES, labels_by_image, strict=False):
        for label in labels:
            if not 0 <= label < len(conditions):
                raise ValueError(f"label {label} is outside the {len(conditions)} conditions")
        names = [conditions[label] for label in sorted(set(labels)) if conditions[label] != "no finding"]
        subject = f"The {role.replace('-', ' ')} image"
        if names:
            sentences.append(f"{subject} shows signs of {listed(names)}.")
        else:
            sentences.append(f"{subject} shows no sign of these conditions.")
    return " ".join(sentences)


def diagnosis_metrics(
    gold: Sequence[Sequence[int]],
    predicted: Sequence[Sequence[int] | None],
    conditions: Sequence[str] = DAMON_CONDITIONS,
) -> dict:
    """Per condition: accuracy and macro precision / recall / F1 over (absent, present); and their means.

    ``gold[i]`` and ``predicted[i]`` are the label indices of image ``i``; a prediction of ``None`` (no readable
    answer) counts as every condition absent, so it can only be right where the condition is absent.
    """
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    if len(gold) != len(predicted):
        raise ValueError(f"{len(predicted)} predictions for {len(gold)} images")
    if not gold:
        raise ValueError("no images to score")
    per_condition = {}
    for index, condition in enumerate(conditions):
        truth = [int(index in labels) for labels in gold]
        guess = [int(labels is not None and index in labels) for labels in predicted]
        precision, recall, f1, _ = precision_recall_fscore_support(
            truth, guess, labels=[0, 1], average="macro", zero_division=0
        )
        per_condition[condition] = {
            "accuracy": float(accuracy_score(truth, guess)),
            "precision": float(precision),
            "recall": float(recall),
            "f1": float(f1),
            "present": sum(truth),
        }
    means = {
        name: sum(scores[name] for scores in per_condition.values()) / len(per_condition)
        for name in ("accuracy", "precision", "recall", "f1")
    }
    return {"mean": means, "per_condition": per_condition, "n": len(gold)}
