"""``damon-eval``: answer multi-image questions, with a preliminary diagnosis in the prompt or without, and score
the answers per question type.

Questions come from MIMIC-Diff-VQA's CSV (``mimic_pair_questions.csv`` + ``mimic_all.csv``: every question type),
or from DAMON's evaluation files (``mimicdiff_test.json``: difference questions; SLAKE / VQA-RAD: closed and open
questions). Each is answered greedily (DAMON evaluates with at most 90 new tokens) by any image-text-to-text model
that takes several images, its images in role order (main, reference). With ``diagnosis`` (the
``predictions.jsonl`` of ``damon-diagnose``, by the finding classifier or by the VLM) each image's labels go into
the prompt as the preliminary diagnosis (:func:`mmed_rag.damon.diagnosis.diagnosis_text`); without, the prompt
has none, so the two runs measure what the prior adds. Answers are written resumably (``predictions.jsonl``).

Scores, per question type and over all questions:

- BLEU-1..4, METEOR, ROUGE-L and CIDEr through :mod:`mmed_rag.eval.report` (pycocoevalcap's scorers on the PTB
  tokenisation: the path of DAMON's ``COCOEvalCap``);
- ``exact_match``: DAMON's accuracy (lower-cased strings equal);
- SLAKE / VQA-RAD's CLOSED questions, and any group whose gold answers are all yes or no (presence):
  ``closed_accuracy``, LLaVA-Med's rule (:func:`mmed_rag.eval.short_answers.closed_hit`);
- other short answers: ``recall``, LLaVA-Med's open-question token recall;
- difference questions: the finding-level ``difference`` F1 (:func:`mmed_rag.damon.metrics.difference_f1`), which
  n-gram metrics cannot replace: they reward the answer template whatever findings it names.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from mmed_rag.atomic import atomic_write_text
from mmed_rag.damon.configs import DamonEvalConfig
from mmed_rag.damon.data import DamonDataError, MultiImageRecord, read_damon_eval, read_mimic_diff_vqa
from mmed_rag.damon.diagnosis import diagnosis_text
from mmed_rag.damon.metrics import difference_f1
from mmed_rag.damon.prompts import record_prompt
from mmed_rag.data.images import open_image, resolve_image_path
from mmed_rag.eval.short_answers import closed_hit, exact_match, token_recall
from mmed_rag.fingerprint import file_sha256, path_fingerprint
from mmed_rag.outputs import claim_outputs
from mmed_rag.progress import progress_bar
from mmed_rag.resumable import ResumableOutput

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
YES_NO = frozenset({"yes", "no"})


def load_questions(config: DamonEvalConfig) -> list[MultiImageRecord]:
    """The questions of ``config.data`` to answer: of the chosen types, the first ``limit``."""
    if config.layout == "mimic-diff-vqa":
        found = read_mimic_diff_vqa(
            config.data,
            config.mimic_all,
            layout=config.image_layout,
            extension=config.image_extension,
            split=config.split,
            img_root=config.img_root,
        )
    else:
        found = read_damon_eval(config.data, config.layout, img_root=config.img_root)
    records = [
        record for record in found.records if not config.question_types or kind_of(record) in config.question_types
    ]
    if not records:
        raise DamonDataError(f"{config.data}: no question to answer (types: {list(config.question_types) or 'all'})")
    return records[: config.limit] if config.limit else records


def kind_of(record: MultiImageRecord) -> str:
    """A record's question type: MIMIC-Diff-VQA's own, "closed" / "open" (SLAKE, VQA-RAD), else "difference"."""
    if record.question_type:
        return record.question_type
    if record.closed is not None:
        return "closed" if record.closed else "open"
    return "difference"


def read_diagnoses(path: str) -> dict[str, list[str]]:
    """Each image's finding names from a ``damon-diagnose`` predictions file."""
    diagnoses = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        try:
            entry = json.loads(line)
            diagnoses[str(entry["id"])] = [str(name) for name in entry["names"]]
        except (ValueError, KeyError, TypeError) as error:
            raise DamonDataError(f"{path}, line {number}: not a damon-diagnose prediction ({error})") from None
    return diagnoses


def prior_text(record: MultiImageRecord, diagnoses: dict[str, list[str]], path: str) -> str:
    """The preliminary diagnosis of the record's images, role by role."""
    missing = [image for image in record.images if image not in diagnoses]
    if missing:
        raise DamonDataError(f"{path}: no diagnosis of {missing[0]} ({record.where}); run damon-diagnose on its images")
    names = sorted({name for image in record.images for name in diagnoses[image]})
    return diagnosis_text([[names.index(name) for name in diagnoses[image]] for image in record.images], names)


def evaluate(config: DamonEvalConfig) -> dict:
    """Answer the questions of ``config`` (resuming an interrupted run) and score them; return the metrics."""
    inputs = [config.data, config.mimic_all, config.img_root, config.model, config.diagnosis]
    with claim_outputs("damon-eval", directories=[config.out], inputs=inputs):
        return _evaluate(config)


def _evaluate(config: DamonEvalConfig) -> dict:
    records = load_questions(config)
    diagnoses = read_diagnoses(config.diagnosis) if config.diagnosis else None
    prompts = {}
    for record in records:
        prior = prior_text(record, diagnoses, config.diagnosis) if diagnoses is not None else None
        prompts[str(record.id)] = (record_prompt(record, prior), prior)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    identity = {
        "data": file_sha256(config.data),
        "model": path_fingerprint(config.model),
        "diagnosis": file_sha256(config.diagnosis) if config.diagnosis else None,
        "question_types": list(config.question_types),
        "limit": config.limit,
        "max_new_tokens": config.max_new_tokens,
    }
    with ResumableOutput(out / PREDICTIONS_FILE, identity, fresh=config.fresh) as sink:
        todo = [record for record in records if str(record.id) not in sink.done]
        if todo:
            generator = _generator(config)
            step = config.batch_size
            for start in progress_bar(range(0, len(todo), step), desc="damon-eval", unit="batch"):
                batch = todo[start : start + step]
                images = [[open_image(resolve_image_path(config.img_root, path)) for path in r.images] for r in batch]
                answers = generator.generate([prompts[str(r.id)][0] for r in batch], images)
                sink.append(
                    _line(record, prompts[str(record.id)], answer)
                    for record, answer in zip(batch, answers, strict=True)
                )
        sink.finish()
    lines = [json.loads(line) for line in (out / PREDICTIONS_FILE).read_text(encoding="utf-8").splitlines()]
    metrics = {"prior": "diagnosis" if config.diagnosis else "none", "diagnosis": config.diagnosis or None,
               **score(lines)}  # fmt: skip
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    atomic_write_text(out / "metrics.md", metrics_table(metrics, f"damon-eval: {config.data}"))
    return metrics


def _line(record: MultiImageRecord, prompt: tuple[str, str | None], answer: str) -> dict:
    return {
        "id": str(record.id),
        "question_type": kind_of(record),
        "images": list(record.images),
        "question": record.question,
        "diagnosis": prompt[1],
        "prompt": prompt[0],
        "prediction": answer,
        "answer": record.answer,
    }


def _generator(config: DamonEvalConfig):
    from mmed_rag.generation.generator import greedy_generator

    return greedy_generator(config.model, config.max_new_tokens, config.batch_size, config.device)


# -- scores ----------------------------------------------------------------------------------------------------


def score(lines: Sequence[dict]) -> dict:
    """Scores per question type and over all (``by_type``, ``all``); see the module docstring."""
    from mmed_rag.eval.report import ReportScorer

    groups: dict[str, list[dict]] = {}
    for line in lines:
        groups.setdefault(line["question_type"], []).append(line)
    with ReportScorer() as scorer:
        by_type = {kind: _group_scores(group, scorer) for kind, group in sorted(groups.items())}
        overall = _group_scores(lines, scorer)
    return {"by_type": by_type, "all": overall}


def _group_scores(lines: Sequence[dict], scorer) -> dict:
    predictions = [line["prediction"] for line in lines]
    golds = [line["answer"] for line in lines]
    scores: dict = {"n": len(lines)}
    scores.update(scorer.score(predictions, golds, ids=[line["id"] for line in lines]).corpus)
    scores["exact_match"] = _mean(exact_match(p, g) for p, g in zip(predictions, golds, strict=True))
    kinds = {line["question_type"] for line in lines}
    if kinds == {"closed"} or all(gold.strip().lower().rstrip(".") in YES_NO for gold in golds):
        scores["closed_accuracy"] = _mean(closed_hit(p, g) for p, g in zip(predictions, golds, strict=True))
    elif kinds.isdisjoint({"difference"}):
        scores["recall"] = _mean(token_recall(p, g) for p, g in zip(predictions, golds, strict=True))
    if kinds == {"difference"}:
        found = difference_f1(predictions, golds)
        scores["difference"] = {key: found[key] for key in ("precision", "recall", "f1", "exact", "unread")}
    return scores


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


METRIC_COLUMNS = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "exact_match")


def metrics_table(metrics: dict, title: str) -> str:
    """Per question type: the caption metrics, exact match, and the short-answer or difference score."""
    lines = [
        f"# {title}",
        "",
        f"Preliminary diagnosis in the prompt: {metrics['diagnosis'] or 'none'}.",
        "",
        "| type | n | " + " | ".join(METRIC_COLUMNS) + " | closed acc. | recall | difference F1 |",
        "|---|---|" + "---|" * (len(METRIC_COLUMNS) + 3),
    ]
    rows = {**metrics["by_type"], "all": metrics["all"]}
    for kind, scores in rows.items():
        cells = [f"{scores[name]:.3f}" for name in METRIC_COLUMNS]
        extra = [
            f"{scores['closed_accuracy']:.3f}" if "closed_accuracy" in scores else "",
            f"{scores['recall']:.3f}" if "recall" in scores else "",
            f"{scores['difference']['f1']:.3f}" if "difference" in scores else "",
        ]
        lines.append(f"| {kind} | {scores['n']} | " + " | ".join(cells + extra) + " |")
    return "\n".join(lines) + "\n"
