"""The copy-reliance analyses of MMed-RAG (Sec. 3.3): does the model read the image, or copy the reports?

The same test set is answered in up to four runs (``mmed-rag generate`` with/without ``--no-retrieval`` and
``--noised-image``):

- ``retrieval``: retrieved reports, real image (the RAG system as deployed);
- ``no_retrieval``: real image, no reports;
- ``retrieval_noised``: retrieved reports, the image replaced by Gaussian noise;
- ``no_retrieval_noised`` (optional): noise, no reports: what the language prior alone gets right.

From their per-question correctness:

- **copy reliance**: among questions that retrieval fixed (wrong without it, right with it), the share still
  "right" when the image is noise. The model cannot have seen the answer, so it copied it from the reports.
- **misled**: among questions answered right without retrieval, the share that retrieval turned wrong: the
  reports (wrong for this image) overrode what the model saw.
- **noised still correct**: among questions right with retrieval, the share still right with a noised image.

Shares come with Wilson 95% intervals; a share whose condition holds for no question is None, not 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

RUNS = ("retrieval", "no_retrieval", "retrieval_noised", "no_retrieval_noised")
RUN_LABELS = {
    "retrieval": "reports + image",
    "no_retrieval": "image only",
    "retrieval_noised": "reports + noise image",
    "no_retrieval_noised": "noise image only",
}


@dataclass(frozen=True)
class Share:
    """``count`` of ``total`` questions, with its Wilson score 95% interval."""

    count: int
    total: int

    @property
    def value(self) -> float | None:
        return self.count / self.total if self.total else None

    def interval(self, z: float = 1.959963984540054) -> tuple[float | None, float | None]:
        if not self.total:
            return None, None
        p, n = self.count / self.total, self.total
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        # At p = 0 or 1 the bound is exact; computing it leaves a rounding residue (3e-18) outside the point.
        low = 0.0 if self.count == 0 else max(0.0, centre - half)
        high = 1.0 if self.count == self.total else min(1.0, centre + half)
        return low, high

    def to_dict(self) -> dict:
        return {"value": self.value, "count": self.count, "total": self.total, "ci95": list(self.interval())}


def _share(condition: list, outcome: list) -> Share:
    selected = [result for holds, result in zip(condition, outcome, strict=True) if holds]
    return Share(sum(selected), len(selected))


@dataclass
class CopyingReport:
    accuracy: dict[str, Share]
    copy_reliance: Share | None
    misled: Share | None
    noised_still_correct: Share | None
    questions: int

    def to_dict(self) -> dict:
        ratios = {
            "copy_reliance": self.copy_reliance,
            "misled": self.misled,
            "noised_still_correct": self.noised_still_correct,
        }
        return {
            "questions": self.questions,
            "accuracy": {run: share.to_dict() for run, share in self.accuracy.items()},
            **{name: share.to_dict() if share else None for name, share in ratios.items()},
        }


def copy_reliance(correct: Mapping[str, Mapping[object, bool]]) -> CopyingReport:
    """The analyses from per-run correctness: ``correct[run][question id]`` for the runs of :data:`RUNS` given.

    ``retrieval`` and ``no_retrieval`` are required; every run must cover the same question ids (answer the
    same test file in every mode), so that each share compares a question with itself.
    """
    unknown = set(correct) - set(RUNS)
    if unknown:
        raise ValueError(f"unknown run(s) {sorted(unknown)}; expected some of {', '.join(RUNS)}")
    for required in ("retrieval", "no_retrieval"):
        if required not in correct:
            raise ValueError(f"the copy-reliance analyses need the {required!r} run")
    keys = list(correct["retrieval"])
    for run, answers in correct.items():
        if set(answers) != set(keys):
            missing = [key for key in keys if key not in answers][:5]
            extra = [key for key in answers if key not in correct["retrieval"]][:5]
            raise ValueError(
                f"run {run!r} does not answer the same questions as 'retrieval' (missing e.g. {missing}, "
                f"extra e.g. {extra}); answer the same test file in every mode"
            )
    column = {run: [bool(answers[key]) for key in keys] for run, answers in correct.items()}
    with_reports, without = column["retrieval"], column["no_retrieval"]
    helped = [rag and not plain for rag, plain in zip(with_reports, without, strict=True)]
    noised = column.get("retrieval_noised")
    return CopyingReport(
        accuracy={run: Share(sum(values), len(values)) for run, values in column.items()},
        copy_reliance=_share(helped, noised) if noised is not None else None,
        misled=_share(without, [not rag for rag in with_reports]),
        noised_still_correct=_share(with_reports, noised) if noised is not None else None,
        questions=len(keys),
    )
