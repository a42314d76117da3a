"""Whether one answer is right: the judgement that the copy-reliance analyses and preference pairs are built on.

VQA: the yes/no parsed from the answer's first sentence equals the gold one (an unparseable answer is wrong).
Report generation has no right or wrong, so MMed-RAG counts a report as good when its similarity to the gold
report is above the mean of the set it was generated in; the metric and the threshold are parameters. Ours is
corpus-tokenised BLEU-4 above the mean; the authors' own judge (their deleted pair builder, read at commit
f2023ea) is :data:`AUTHORS_JUDGE`: nltk's sentence BLEU (4-gram, smoothing method 7) of the text before the first
"." (commas removed, whitespace tokens), good when at least the mean (``ReportJudge(metric="authors")``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mmed_rag.eval.yesno import gold_rule, parse_yes_no


def vqa_correct(prediction: str, gold: str, yes_no_rule: str = "standard") -> bool:
    """The answer's yes/no (read by ``yes_no_rule``) is the gold one; False when either does not parse."""
    label = parse_yes_no(gold, gold_rule(yes_no_rule))
    return label is not None and parse_yes_no(prediction, yes_no_rule) == label


AUTHORS_JUDGE = "authors"


def first_sentence_bleu(prediction: str, gold: str) -> float:
    """The authors' report score: nltk ``sentence_bleu`` with ``SmoothingFunction().method7`` (4-gram, equal
    weights) of the prediction's first sentence against the gold report's, each the text before its first "."
    with commas removed, split at whitespace."""
    import warnings

    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    def tokens(text: str) -> list[str]:
        return text.split(".")[0].replace(",", "").split()

    with warnings.catch_warnings():  # nltk warns about zero n-gram counts, which method 7 is there to smooth
        warnings.simplefilter("ignore", UserWarning)
        return float(sentence_bleu([tokens(gold)], tokens(prediction), smoothing_function=SmoothingFunction().method7))


@dataclass(frozen=True)
class ReportJudge:
    """Good report = ``metric`` against the gold report above ``threshold`` ("mean": the judged set's mean).

    ``metric="authors"`` is the authors' judge: :func:`first_sentence_bleu`, good when *at least* the threshold.
    """

    metric: str = "BLEU-4"
    threshold: float | str = "mean"

    def __post_init__(self) -> None:
        if isinstance(self.threshold, str) and self.threshold != "mean":
            raise ValueError(f"threshold must be a number or 'mean', got {self.threshold!r}")

    def _scores(self, predictions: Sequence[str], golds: Sequence[str], scorer) -> list[float]:
        if self.metric == AUTHORS_JUDGE:
            return [first_sentence_bleu(prediction, gold) for prediction, gold in zip(predictions, golds, strict=True)]
        rows = scorer.score(predictions, golds).per_example if len(predictions) else []
        return [row[self.metric] for row in rows]

    def good(self, score: float, cutoff: float) -> bool:
        return score >= cutoff if self.metric == AUTHORS_JUDGE else score > cutoff

    @classmethod
    def from_options(cls, metric: str, threshold: str) -> ReportJudge:
        """From command-line strings: ``threshold`` is "mean" or a number."""
        try:
            return cls(metric, threshold if threshold == "mean" else float(threshold))
        except ValueError:
            raise ValueError(f"threshold must be a number or 'mean', got {threshold!r}") from None

    def cutoff(self, scores: Sequence[float]) -> float:
        return sum(scores) / len(scores) if self.threshold == "mean" else float(self.threshold)

    def judge_runs(self, runs: Mapping[str, tuple[Sequence[str], Sequence[str]]]) -> dict[str, list[bool]]:
        """Good or not, for each report of several runs (``run -> (predictions, golds)``) against ONE cutoff.

        Runs are compared question by question (with and without retrieval, real or noise image), so "mean" is
        the mean over all runs' scores: a per-run mean would move the bar with the run being judged.
        """
        from mmed_rag.eval.report import ReportScorer

        scores: dict[str, list[float]] = {}
        authors = self.metric == AUTHORS_JUDGE
        with contextlib.nullcontext() if authors else ReportScorer((self.metric,)) as scorer:  # one METEOR process
            for run, (predictions, golds) in runs.items():
                scores[run] = self._scores(predictions, golds, scorer)
        pooled = [score for values in scores.values() for score in values]
        if not pooled:
            return {run: [] for run in runs}
        cutoff = self.cutoff(pooled)
        return {run: [self.good(score, cutoff) for score in values] for run, values in scores.items()}


def judge_runs(
    task: str,
    runs: Mapping[str, tuple[Sequence[str], Sequence[str]]],
    judge: ReportJudge | None = None,
    yes_no_rule: str = "standard",
) -> dict[str, list[bool]]:
    """Right or not, for every answer of several runs of one set (``run -> (predictions, golds)``).

    VQA answers are judged one by one (:func:`vqa_correct`, by ``yes_no_rule``); reports by ``judge``, against one
    cutoff for all runs (:meth:`ReportJudge.judge_runs`).
    """
    if task == "vqa":
        return {
            run: [vqa_correct(prediction, gold, yes_no_rule) for prediction, gold in zip(*pair, strict=True)]
            for run, pair in runs.items()
        }
    if task == "report":
        if judge is None:
            raise ValueError("judging reports needs a ReportJudge (metric and threshold)")
        return judge.judge_runs(runs)
    raise ValueError(f"task must be 'vqa' or 'report', got {task!r}")
