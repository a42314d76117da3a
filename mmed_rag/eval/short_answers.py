"""Short-answer VQA scores as LLaVA-Med and DAMON compute them (SLAKE, VQA-RAD, MIMIC-Diff-VQA's closed questions).

Read from LLaVA-Med (``llava/eval/run_eval.py`` and ``eval_metrics/`` at b9a98a7) and DAMON (``model/eval/slake.py``,
``vqarad.py``); written here from their definitions, nothing copied:

- :func:`vqa_normalise`: the VQA challenge's answer normalisation (Antol et al.'s evaluation script), which
  LLaVA-Med applies to both sides: lower case; each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` removed
  when it touches a space (or the text holds a digit-comma-digit), else replaced by a space; a period not followed
  by a digit removed; number words zero..ten as digits, "none" as 0; the articles a, an, the dropped; common
  contractions written without their apostrophe restored (``dont`` -> ``don't``); then every comma removed. (The
  original script's period rule stops after 32 periods, by accident; no answer has that many.)
- :func:`closed_hit` (LLaVA-Med's closed-question accuracy): 1 when the normalised prediction contains "yes" or
  "no" as a substring and the normalised gold answer is a substring of it. Substrings, as the original: "no" is
  found in "nodule", so a closed answer is judged by whether the gold word appears anywhere;
- :func:`token_recall` (LLaVA-Med's open-question "recall"): of the normalised gold answer's word occurrences, the
  share the prediction also has (word counts; 0 when either side is empty);
- :func:`exact_match` (DAMON's SLAKE / VQA-RAD accuracy, closed and open alike): the lower-cased prediction equals
  the lower-cased gold answer, with nothing else normalised.
"""

from __future__ import annotations

import re
from collections import Counter

_PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
_CONTRACTIONS = {
    word.replace("'", ""): word
    for word in (
        "ain't", "aren't", "can't", "couldn't", "didn't", "doesn't", "don't", "hadn't", "hasn't", "haven't",
        "isn't", "mightn't", "mustn't", "shouldn't", "wasn't", "weren't", "won't", "wouldn't", "he's", "she's",
        "that's", "there's", "they're", "we're", "what's", "where's", "who's", "you're", "i'm", "i've", "let's",
    )
}  # fmt: skip


def vqa_normalise(text: str) -> str:
    """An answer as the VQA evaluation compares it (see the module docstring)."""
    text = text.lower()
    strip_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        touching = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if touching or strip_all else " ")
    out = _PERIOD.sub("", out)
    words = [_NUMBERS.get(word, word) for word in out.split()]
    words = [_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES]
    return " ".join(words).replace(",", "")


def closed_hit(prediction: str, gold: str) -> int:
    """LLaVA-Med's closed-question hit (substring rules; see the module docstring)."""
    prediction, gold = vqa_normalise(prediction), vqa_normalise(gold)
    return int(("yes" in prediction or "no" in prediction) and gold in prediction)


def token_recall(prediction: str, gold: str) -> float:
    """LLaVA-Med's open-question recall: the share of the gold answer's word occurrences the prediction has."""
    predicted, wanted = Counter(vqa_normalise(prediction).split()), Counter(vqa_normalise(gold).split())
    if not predicted or not wanted:
        return 0.0
    hits = sum(predicted[word] for word in wanted if word in predicted)
    missed = sum(count for word, count in wanted.items() if word not in predicted)
    return hits / (hits + missed) if hits else 0.0


def exact_match(prediction: str, gold: str) -> int:
    """DAMON's accuracy: the lower-cased strings are equal."""
    return int(prediction.lower() == gold.lower())
