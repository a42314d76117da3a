"""Whether one answer is right: the judgement that the copy-reliance analyses and preference pairs are built on.

VQA: the yes/no parsed from the answer's first sentence equals the gold one (an unparseable answer is wrong).
Report generation has no right or wrong, so MMed-RAG counts a report as good when its similarity to the gold
report is above the mean of the set it was generated in; the metric (BLEU in the original; which order is not
published, BLEU-4 here) and the threshold are parameters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mmed_rag.eval.yesno import parse_yes_no


def vqa_correct(prediction: str, gold: str, yes_no_rule: str = "standard") -> bool:
    """The answer's yes/no (read by ``yes_no_rule``) is the gold one; False when either does not parse."""
    label = parse_yes_no(gold)
    return label is not None and parse_yes_no(prediction, yes_no_rule) == label


@dataclass(frozen=True)
class ReportJudge:
    """Good report = ``metric`` against the gold report above ``threshold`` ("mean": the judged set's mean)."""

    metric: str = "BLEU-4"
    threshold: float | str = "mean"

    def __post_init__(self) -> None:
        if isinstance(self.threshold, str) and self.threshold != "mean":
            raise ValueError(f"threshold must be a number or 'mean', got {self.threshold!r}")

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
        with ReportScorer((self.metric,)) as scorer:  # one METEOR process for all runs, when METEOR judges
            for run, (predictions, golds) in runs.items():
                rows = scorer.score(predictions, golds).per_example if len(predictions) else []
                scores[run] = [row[self.metric] for row in rows]
        pooled = [score for values in scores.values() for score in values]
        if not pooled:
            return {run: [] for run in runs}
        cutoff = self.cutoff(pooled)
        return {run: [score > cutoff for score in values] for run, values in scores.items()}


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
