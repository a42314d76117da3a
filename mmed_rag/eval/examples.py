"""Prediction files joined to their gold answers: the input of every ``mmed-rag eval`` task.

``mmed-rag generate`` writes each test record back with a ``prediction`` (and ``modality``, ``reference_reports``,
optionally ``yes_probability``), so its output is read directly: the gold answer (``answer`` for VQA, ``report``
for report generation) is already there. A separate gold file, when given, is joined by id and its answer wins.
Any other field can stand in for the prediction (``prediction_field``): scoring the released answers against
themselves is ``prediction_field="answer"``.

Nothing is dropped silently: an id without gold, a duplicate id, a missing or empty prediction and a gold answer
that the task cannot score are errors naming the file, line and id; with ``on_error="skip"`` they are left out
and listed in :attr:`ExampleSet.problems` (written to ``metrics.json``). An empty prediction is not a skipped
record but a (wrong) answer, counted in :attr:`ExampleSet.empty_predictions`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mmed_rag.data.records import RecordError, read_records
from mmed_rag.errors import MMedRAGError

logger = logging.getLogger(__name__)

Task = Literal["vqa", "report"]
GOLD_FIELD: dict[str, str] = {"vqa": "answer", "report": "report"}


class EvalInputError(MMedRAGError, ValueError):
    """Prediction or gold files that cannot be scored as they are."""


@dataclass
class Example:
    """One scored item: a model's prediction and the gold answer (VQA) or report."""

    key: str | int
    prediction: str
    gold: str
    dataset: str
    modality: str | None = None
    yes_probability: float | None = None
    reference_reports: list[str] | None = None
    prompt: str | None = None  # the human turn the model saw (generate writes it)
    images: list[str] = field(default_factory=list)
    where: str = ""  # file and line, for messages
    image_id: str | int | None = None  # the record's image_id, when it has one (the authors' 2b/2c pair ids)


@dataclass
class ExampleSet:
    examples: list[Example]
    problems: list[str] = field(default_factory=list)
    empty_predictions: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)


def _read(path: Path, task: Task, on_error: str):
    result = read_records(path, task, on_error=on_error)  # the task names are record kinds
    return result, [str(error) for error in result.errors]


def _gold_of(record, task: Task) -> str:
    return record.answer if task == "vqa" else record.report


def read_examples(
    predictions: Sequence[str | Path],
    task: Task,
    gold: Sequence[str | Path] = (),
    *,
    prediction_field: str = "prediction",
    on_error: Literal["raise", "skip"] = "raise",
) -> ExampleSet:
    """The examples of ``predictions`` (one file per dataset), joined to ``gold`` (none, or one file per file).

    The dataset of an example is its record's ``dataset`` field, else its prediction file's name without suffix.
    """
    if task not in GOLD_FIELD:
        raise ValueError(f"task must be 'vqa' or 'report', got {task!r}")
    if gold and len(gold) != len(predictions):
        raise EvalInputError(
            f"give one gold file per prediction file (got {len(predictions)} prediction and {len(gold)} gold)"
        )
    problems: list[str] = []
    empty: list[str] = []
    examples: list[Example] = []

    def fail(message: str) -> None:
        if on_error == "raise":
            raise EvalInputError(message)
        problems.append(message)

    seen_datasets: dict[str, Path] = {}
    for index, prediction_path in enumerate(map(Path, predictions)):
        try:
            result, errors = _read(prediction_path, task, on_error)
            gold_records = None
            if gold:
                gold_result, gold_errors = _read(Path(gold[index]), task, on_error)
                errors += gold_errors
                gold_records = {record.key: record for record in gold_result.records}
        except RecordError as error:
            raise EvalInputError(str(error)) from None
        problems += errors
        answered: set = set()
        for record, position in zip(result.records, result.positions, strict=True):
            where = f"{prediction_path}, {position}"
            values = record.to_dict()
            if prediction_field not in values:
                fail(f"{where}: field '{prediction_field}': missing (the model's answer for id {record.key!r})")
                continue
            prediction = values[prediction_field]
            if not isinstance(prediction, str):
                fail(f"{where}: field '{prediction_field}': expected a string, got {type(prediction).__name__}")
                continue
            answer = _gold_of(record, task)
            if gold_records is not None:
                if record.key not in gold_records:
                    fail(f"{where}: id {record.key!r} is not in the gold file {gold[index]}")
                    continue
                answer = _gold_of(gold_records[record.key], task)
            if not answer.strip():
                fail(f"{where}: field '{GOLD_FIELD[task]}': the gold answer of id {record.key!r} is empty")
                continue
            if not prediction.strip():
                empty.append(f"{where}: id {record.key!r}")
            dataset = str(values.get("dataset") or prediction_path.stem)
            if dataset in seen_datasets and seen_datasets[dataset] != prediction_path:
                raise EvalInputError(
                    f"{prediction_path} and {seen_datasets[dataset]} both hold dataset {dataset!r}; "
                    f"rename one file or give its records a 'dataset' field"
                )
            seen_datasets[dataset] = prediction_path
            score = values.get("yes_probability")
            examples.append(
                Example(
                    key=record.key,
                    prediction=prediction,
                    gold=answer,
                    dataset=dataset,
                    modality=values.get("modality"),
                    yes_probability=float(score) if isinstance(score, int | float) else None,
                    reference_reports=values.get("reference_reports"),
                    prompt=values.get("prompt"),
                    images=record.image_paths,
                    where=where,
                    image_id=values.get("image_id"),
                )
            )
            answered.add(record.key)
        if gold_records is not None:
            unanswered = [key for key in gold_records if key not in answered]
            if unanswered:
                shown = ", ".join(map(repr, unanswered[:10])) + (" ..." if len(unanswered) > 10 else "")
                fail(f"{gold[index]}: {len(unanswered)} gold id(s) have no prediction in {prediction_path}: {shown}")
    if empty:
        logger.warning("%d empty prediction(s), scored as wrong answers: %s", len(empty), "; ".join(empty[:5]))
    return ExampleSet(examples, problems, empty)
