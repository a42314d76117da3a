"""``mmed-rag eval``: score prediction files and write ``metrics.json``, ``metrics.md``, per-example scores and plots.

Three tasks, all reading ``mmed-rag generate`` outputs directly:

- ``vqa``: yes/no accuracy, precision, recall, F1 (and AUC with ``yes_probability``), bootstrap 95% intervals,
  overall and per dataset (one ``--pred`` file each) and per modality;
- ``report``: BLEU-1..4, ROUGE-L, METEOR, CIDEr (pycocoevalcap), plus the approximate clinical-finding F1 for
  chest X-ray reports, overall and per dataset and modality;
- ``copying``: the copy-reliance analyses from the runs with/without retrieval and with a noised image.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mmed_rag.atomic import atomic_write_text
from mmed_rag.config import ConfigError, save_config
from mmed_rag.eval import plots
from mmed_rag.eval.examples import EvalInputError, Example, ExampleSet, read_examples
from mmed_rag.eval.yesno import HOWS, gold_rule
from mmed_rag.outputs import claim_outputs

logger = logging.getLogger(__name__)

REPORT_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "METEOR", "CIDEr")
CHEST_XRAY_MODALITIES = ("radiology",)


@dataclass
class EvalConfig:
    """What to score and how; every default is here."""

    task: Literal["vqa", "report", "copying"] = field(
        default="vqa", metadata={"help": "vqa (yes/no metrics), report (text metrics) or copying (copy reliance)"}
    )
    pred: tuple[str, ...] = field(
        default=(),
        metadata={"help": "prediction file(s) (generate's output); one per dataset. copying: the run with retrieval"},
    )
    gold: tuple[str, ...] = field(
        default=(), metadata={"help": "gold file(s), one per --pred (default: the gold answers in the --pred files)"}
    )
    out: str = field(default="eval", metadata={"help": "directory for metrics.json, metrics.md and plots"})
    prediction_field: str = field(
        default="prediction", metadata={"help": "field holding the answer ('answer' scores gold against itself)"}
    )
    positive: Literal["yes", "no"] = field(default="yes", metadata={"help": "positive class of precision/recall/F1"})
    yes_no_rule: Literal["standard", "strict", "authors"] = field(
        default="standard",
        metadata={
            "help": "how free-text answers are read as yes/no (vqa, copying): standard; strict, which counts a "
            "finding word in text without sentence structure (an untrained model's word salad) as unparseable; "
            "or authors, the MMed-RAG authors' own rule (gold answers read by it too)"
        },
    )
    bootstrap: int = field(default=1000, metadata={"help": "bootstrap resamples for the 95%% intervals (0: none)"})
    seed: int = field(default=0, metadata={"help": "seed of the bootstrap"})
    report_metrics: tuple[str, ...] = field(default=REPORT_METRICS, metadata={"help": "report metrics to compute"})
    report_bootstrap: int = field(
        default=200,
        metadata={
            "help": "report task: bootstrap resamples for the text metrics' 95%% intervals, each rescored as a "
            "corpus (METEOR through Java makes them slower than VQA's; 0: none)"
        },
    )
    clinical_f1: bool = field(
        default=True, metadata={"help": "report task: CheXpert-label F1 (rule-based approximation) for chest X-rays"}
    )
    copying_task: Literal["vqa", "report"] = field(
        default="vqa", metadata={"help": "copying: judge answers as VQA (yes/no) or reports (similarity)"}
    )
    pred_no_retrieval: str | None = field(default=None, metadata={"help": "copying: run without retrieval"})
    pred_noised: str | None = field(default=None, metadata={"help": "copying: run with retrieval and noised images"})
    pred_no_retrieval_noised: str | None = field(
        default=None, metadata={"help": "copying: run without retrieval, noised images (optional)"}
    )
    judge_metric: str = field(default="BLEU-4", metadata={"help": "copying reports: similarity metric of 'good'"})
    judge_threshold: str = field(
        default="mean", metadata={"help": "copying reports: 'good' above this score, or 'mean' of all runs' scores"}
    )
    on_error: Literal["raise", "skip"] = field(
        default="raise", metadata={"help": "a record that cannot be scored: stop, or leave it out and list it"}
    )

    def __post_init__(self) -> None:
        if self.bootstrap < 0 or self.report_bootstrap < 0:
            raise ConfigError("bootstrap and report_bootstrap must be 0 or more")
        unknown = set(self.report_metrics) - set(REPORT_METRICS)
        if unknown:
            raise ConfigError(f"unknown report metric(s) {sorted(unknown)}; choose from {', '.join(REPORT_METRICS)}")


@dataclass
class EvalResult:
    metrics: dict
    out: Path
    files: list[Path]


# -- VQA ---------------------------------------------------------------------------------------------------------


def _groups(examples: Sequence[Example], attribute: str) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for position, example in enumerate(examples):
        groups[str(getattr(example, attribute) or "unknown")].append(position)
    return dict(groups)


def _vqa(config: EvalConfig, examples: ExampleSet, out: Path) -> tuple[dict, list[dict], list[Path]]:
    from mmed_rag.eval.vqa import metrics_to_dict, yes_no_metrics
    from mmed_rag.eval.yesno import parse_yes_no, read_yes_no

    kept, gold, predicted, readings = [], [], [], []
    for example in examples.examples:
        label = parse_yes_no(example.gold, gold_rule(config.yes_no_rule))
        if label is None:
            message = (
                f"{example.where}: field 'answer': gold answer {example.gold!r} of id {example.key!r} is not yes/no"
            )
            if config.on_error == "raise":
                raise EvalInputError(message + " (use --on-error skip to leave such questions out)")
            examples.problems.append(message)
            continue
        kept.append(example)
        gold.append(label)
        readings.append(read_yes_no(example.prediction, config.yes_no_rule))
        predicted.append(readings[-1].label)
    if not kept:
        raise EvalInputError("no question with a yes/no gold answer to score")
    scored = [example.yes_probability for example in kept]
    scores = scored if all(score is not None for score in scored) else None
    if scores is None and any(score is not None for score in scored):
        logger.warning("only some predictions have yes_probability: no AUC (generate all with --yes-no-scores)")

    def measure(rows: Sequence[int]) -> dict:
        return metrics_to_dict(
            yes_no_metrics(
                [gold[row] for row in rows],
                [predicted[row] for row in rows],
                None if scores is None else [scores[row] for row in rows],
                positive=config.positive,
                bootstrap=config.bootstrap,
                seed=config.seed,
            )
        )

    everything = list(range(len(kept)))
    metrics = {"overall": measure(everything)}
    for attribute in ("dataset", "modality"):
        metrics[f"by_{attribute}"] = {name: measure(rows) for name, rows in _groups(kept, attribute).items()}
    per_example = [
        {
            "id": example.key,
            "dataset": example.dataset,
            "modality": example.modality,
            "prediction": example.prediction,  # the text, so each verdict can be checked by eye
            "gold": label,
            "predicted": guess,
            "read_as": reading.how,  # which step of the yes/no rule gave `predicted` (mmed_rag.eval.yesno)
            "correct": label == guess,
        }
        for example, label, guess, reading in zip(kept, gold, predicted, readings, strict=True)
    ]
    metrics["yes_no_rule"] = config.yes_no_rule
    metrics["read_as"] = {how: count for how in HOWS if (count := sum(r.how == how for r in readings))}
    figures = [
        plots.confusion_matrix(out / "confusion_matrix.png", gold, predicted, title="yes/no answers"),
        _accuracy_by_group(metrics, out / "accuracy.png"),
    ]
    if scores is not None and metrics["overall"].get("auc", {}).get("value") is not None:
        positive_scores = scores if config.positive == "yes" else [1 - score for score in scores]
        figures.append(
            plots.roc_curve(
                out / "roc.png",
                [label == config.positive for label in gold],
                positive_scores,
                auc=metrics["overall"]["auc"]["value"],
                title=f"ROC ({config.positive} = positive)",
            )
        )
    return metrics, per_example, figures


def _labelled_groups(metrics: dict, separator: str = " ") -> list[tuple[str, dict]]:
    """("overall", ...), then ("dataset NAME", ...) and ("modality NAME", ...): the rows of tables and charts."""
    rows = [("overall", metrics["overall"])]
    for attribute in ("dataset", "modality"):
        rows += [(f"{attribute}{separator}{name}", group) for name, group in metrics[f"by_{attribute}"].items()]
    return rows


def accuracy_bars(metrics: dict) -> list[tuple[str, dict]]:
    """The groups ``accuracy.png`` draws: overall, then each dataset and modality, except that one holding every
    question is the overall bar again, so it is named on that bar ("overall = dataset: chest") instead."""
    (_, overall), *groups = _labelled_groups(metrics, ": ")
    same = [label for label, group in groups if group["counts"]["n"] == overall["counts"]["n"]]
    return [(" = ".join(["overall", *same]), overall)] + [
        (label, group) for label, group in groups if label not in same
    ]


def _accuracy_by_group(metrics: dict, path: Path) -> Path:
    bars = accuracy_bars(metrics)
    values = {label: group["accuracy"]["value"] for label, group in bars}
    intervals = {label: tuple(group["accuracy"]["ci95"]) for label, group in bars}
    baselines = {label: _majority_share(group["counts"]) for label, group in bars}
    return plots.bar_chart(
        path,
        values,
        intervals,
        title="VQA accuracy (95% bootstrap interval)",
        ylabel="accuracy",
        baselines=baselines,
        baseline_label="always the commoner gold answer",
    )


def _majority_share(counts: dict) -> float:
    """Accuracy of answering every question with the group's commoner gold answer: the bar to beat."""
    return max(counts["gold_yes"], counts["gold_no"]) / counts["n"]


def _reading_note(rule: str, read_as: dict[str, int]) -> str:
    """What the yes/no rule read the predictions from, and how many rest on a finding word in word salad."""
    total = sum(read_as.values())
    counts = ", ".join(f"{how} {count}" for how, count in read_as.items())
    note = f"Yes/no read with the {rule} rule ({total} predictions; read as: {counts}; per_example.jsonl 'read_as')."
    salad = read_as.get("unstructured", 0)
    if salad and rule == "standard":
        note += (
            f" {salad} were read from a finding word in text without sentence structure, as an untrained model "
            "writes; --yes-no-rule strict counts them as unparseable."
        )
        if salad > total / 4:
            logger.warning("%d of %d predictions read as yes/no from word salad: see metrics.md", salad, total)
    elif salad:
        note += f" {salad} without sentence structure were counted as unparseable."
    if rule == "authors":
        note += " The authors' rule reads every answer (and gold answer) as yes or no: none is unparseable."
    return note


def _vqa_table(metrics: dict) -> str:
    names = ("accuracy", "precision", "recall", "f1", "auc")
    lines = ["| group | n | unparseable | " + " | ".join(names) + " |", "|---" * (len(names) + 3) + "|"]

    def cell(entry: dict | None) -> str:
        if not entry or entry["value"] is None:
            return "n/a"
        low, high = entry["ci95"]
        return f"{entry['value']:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None else "")

    for name, group in _labelled_groups(metrics):
        counts = group["counts"]
        lines.append(
            f"| {name} | {counts['n']} | {counts['unparseable']} | "
            + " | ".join(cell(group.get(metric)) for metric in names)
            + " |"
        )
    return "\n".join(lines)


# -- reports -----------------------------------------------------------------------------------------------------


def _report(config: EvalConfig, examples: ExampleSet, out: Path) -> tuple[dict, list[dict], list[Path]]:
    from mmed_rag.eval.report import ReportScorer

    kept = examples.examples
    if not kept:
        raise EvalInputError("no report to score")
    with ReportScorer(config.report_metrics) as scorer:  # one METEOR process for every group

        def measure(rows: Sequence[int]) -> tuple[dict, list[dict]]:
            scores = scorer.score(
                [kept[row].prediction for row in rows],
                [kept[row].gold for row in rows],
                ids=[kept[row].key for row in rows],
                bootstrap=config.report_bootstrap,
                seed=config.seed,
            )
            result = {"n": len(rows), **scores.corpus}
            if scores.intervals:
                result["ci95"] = {name: list(interval) for name, interval in scores.intervals.items()}
            if config.clinical_f1:
                chest = [row for row in rows if kept[row].modality in (None, *CHEST_XRAY_MODALITIES)]
                if chest:
                    result["clinical_f1"] = _clinical_f1(kept, chest)
            return result, scores.per_example

        overall, per_example = measure(range(len(kept)))
        metrics = {"overall": overall}
        for attribute in ("dataset", "modality"):
            groups = _groups(kept, attribute)
            # A group holding every report is the overall set again (same corpus-level scores, CIDEr's idf too).
            metrics[f"by_{attribute}"] = {
                name: overall if len(rows) == len(kept) else measure(rows)[0] for name, rows in groups.items()
            }
    for example, row in zip(kept, per_example, strict=True):
        row.update(dataset=example.dataset, modality=example.modality, prediction=example.prediction)
    # CIDEr runs 0-10; a tenth of it shares the 0-1 axis of the others.
    scale = {name: 10 if name == "CIDEr" else 1 for name in config.report_metrics}
    label = {name: "CIDEr / 10" if name == "CIDEr" else name for name in config.report_metrics}
    values = {label[name]: overall[name] / scale[name] for name in config.report_metrics}
    intervals = {
        label[name]: (low / scale[name], high / scale[name]) for name, (low, high) in overall.get("ci95", {}).items()
    }
    title = f"report metrics ({len(kept)} reports{', 95% bootstrap intervals' if intervals else ''})"
    figures = [plots.bar_chart(out / "report_metrics.png", values, intervals, title=title, ylabel="score")]
    return metrics, per_example, figures


def _clinical_f1(examples: Sequence[Example], rows: Sequence[int]) -> dict:
    from mmed_rag.eval.chexpert import clinical_f1

    return clinical_f1([examples[row].prediction for row in rows], [examples[row].gold for row in rows])


def _report_table(metrics: dict, names: Sequence[str]) -> str:
    extra = ["clinical F1 micro", "clinical F1 macro"]
    lines = ["| group | n | " + " | ".join([*names, *extra]) + " |", "|---" * (len(names) + len(extra) + 2) + "|"]
    for label, group in _labelled_groups(metrics):
        clinical = group.get("clinical_f1")
        intervals = group.get("ci95", {})
        cells = [
            f"{group[name]:.4f}"
            + (f" [{intervals[name][0]:.4f}, {intervals[name][1]:.4f}]" if name in intervals else "")
            for name in names
        ]
        cells += [f"{clinical['micro']['f1']:.4f}", f"{clinical['macro_f1']:.4f}"] if clinical else ["n/a", "n/a"]
        lines.append(f"| {label} | {group['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- copying -----------------------------------------------------------------------------------------------------


def _copying(config: EvalConfig, out: Path) -> tuple[dict, list[dict], list[Path], list[str]]:
    from mmed_rag.eval.copying import RUN_LABELS, copy_reliance
    from mmed_rag.eval.correctness import ReportJudge, judge_runs

    if len(config.pred) != 1 or len(config.gold) > 1:
        raise ConfigError("copying: give one --pred (the run with retrieval) and at most one --gold")
    if config.pred_no_retrieval is None:
        raise ConfigError("copying: give --pred-no-retrieval (and --pred-noised for the copy-reliance ratio)")
    paths = {
        "retrieval": config.pred[0],
        "no_retrieval": config.pred_no_retrieval,
        "retrieval_noised": config.pred_noised,
        "no_retrieval_noised": config.pred_no_retrieval_noised,
    }
    runs: dict[str, ExampleSet] = {}
    for run, path in paths.items():
        if path is not None:
            runs[run] = read_examples(
                [path],
                config.copying_task,
                config.gold,
                prediction_field=config.prediction_field,
                on_error=config.on_error,
            )
    problems = [problem for examples in runs.values() for problem in examples.problems]
    verdicts = judge_runs(
        config.copying_task,
        {run: ([e.prediction for e in s.examples], [e.gold for e in s.examples]) for run, s in runs.items()},
        ReportJudge.from_options(config.judge_metric, config.judge_threshold)
        if config.copying_task == "report"
        else None,
        config.yes_no_rule,
    )
    correct = {run: {e.key: good for e, good in zip(runs[run].examples, verdicts[run], strict=True)} for run in runs}
    try:
        report = copy_reliance(correct)
    except ValueError as error:
        raise EvalInputError(str(error)) from None
    metrics = report.to_dict()
    per_example = [{"id": key, **{run: correct[run][key] for run in correct}} for key in correct["retrieval"]]
    accuracy = {RUN_LABELS[run]: share.value for run, share in report.accuracy.items()}
    accuracy_intervals = {RUN_LABELS[run]: share.interval() for run, share in report.accuracy.items()}
    ratios = {
        "copy reliance": report.copy_reliance,
        "misled": report.misled,
        "noised still correct": report.noised_still_correct,
    }
    values = {**accuracy, **{name: share.value if share else None for name, share in ratios.items()}}
    intervals = {**accuracy_intervals, **{name: share.interval() for name, share in ratios.items() if share}}
    baselines = None
    if config.copying_task == "vqa":
        from mmed_rag.eval.yesno import parse_yes_no

        baselines = {}
        for run, examples in runs.items():
            golds = [parse_yes_no(example.gold, gold_rule(config.yes_no_rule)) for example in examples.examples]
            counts = {"n": len(golds), "gold_yes": golds.count("yes"), "gold_no": golds.count("no")}
            baselines[RUN_LABELS[run]] = _majority_share(counts) if golds else None
    figure = plots.bar_chart(
        out / "copying.png",
        values,
        intervals,
        title="accuracy by run, and copy-reliance shares",
        ylabel="share",
        baselines=baselines,
        baseline_label="always the commoner gold answer",
    )
    return metrics, per_example, [figure], problems


def _copying_table(metrics: dict) -> str:
    lines = ["| figure | value | count / total | 95% interval |", "|---|---|---|---|"]
    rows = [(f"accuracy: {run}", share) for run, share in metrics["accuracy"].items()]
    rows += [(name, metrics[name]) for name in ("copy_reliance", "misled", "noised_still_correct")]
    for name, share in rows:
        if share is None or share["value"] is None:
            lines.append(f"| {name} | n/a | | |")
            continue
        low, high = share["ci95"]
        lines.append(
            f"| {name} | {share['value']:.3f} | {share['count']} / {share['total']} | [{low:.3f}, {high:.3f}] |"
        )
    return "\n".join(lines)


# -- the stage ---------------------------------------------------------------------------------------------------


def evaluate(config: EvalConfig) -> EvalResult:
    """Score ``config.pred`` and write the results into ``config.out`` (atomically, file by file)."""
    inputs = [*config.pred, *config.gold, config.pred_no_retrieval, config.pred_noised, config.pred_no_retrieval_noised]
    with claim_outputs("eval", directories=[config.out], inputs=inputs):
        return _evaluate(config)


def shared_ids(examples: ExampleSet) -> str | None:
    """A warning when several prediction files answer the same questions (runs of one test set, not several sets).

    A question is its id, images and gold answer: test sets that merely reuse ids (0, 1, 2, ...) do not count.
    """
    ids_by_dataset: dict[str, set] = {}
    for example in examples:
        ids_by_dataset.setdefault(example.dataset, set()).add((example.key, tuple(example.images), example.gold))
    datasets = list(ids_by_dataset)
    pairs = [
        (first, second, len(ids_by_dataset[first] & ids_by_dataset[second]))
        for position, first in enumerate(datasets)
        for second in datasets[position + 1 :]
    ]
    shared = [(first, second, count) for first, second, count in pairs if count]
    if not shared:
        return None
    listed = "; ".join(f"{first} and {second}: {count}" for first, second, count in shared[:3])
    return (
        f"Several prediction files answer the same questions ({listed}): the overall row pools them as different "
        "questions. If they are runs of one test set, evaluate each run on its own."
    )


def _evaluate(config: EvalConfig) -> EvalResult:
    if not config.pred:
        raise ConfigError("give --pred (one or more prediction files)")
    out = Path(config.out)  # created by its first file (atomic writes make their folder), not before the input is read
    problems: list[str] = []
    empty: list[str] = []
    overlap: str | None = None
    if config.task == "copying":
        metrics, per_example, figures, problems = _copying(config, out)
        table = _copying_table(metrics)
    else:
        examples = read_examples(
            config.pred, config.task, config.gold, prediction_field=config.prediction_field, on_error=config.on_error
        )
        score: Callable = _vqa if config.task == "vqa" else _report
        metrics, per_example, figures = score(config, examples, out)
        problems, empty = examples.problems, examples.empty_predictions
        overlap = shared_ids(examples)
        table = _vqa_table(metrics) if config.task == "vqa" else _report_table(metrics, config.report_metrics)
    document = {
        "task": config.task,
        "pred": list(config.pred),
        "gold": list(config.gold),
        **metrics,
        "empty_predictions": empty,
        "skipped": problems,
    }
    files = [out / "metrics.json", out / "metrics.md", out / "per_example.jsonl"]
    atomic_write_text(files[0], json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    notes = [_reading_note(config.yes_no_rule, metrics["read_as"])] if config.task == "vqa" else []
    if empty:
        notes.append(f"{len(empty)} empty prediction(s), scored as wrong.")
    if problems:
        notes.append(f"{len(problems)} record(s) left out (listed under 'skipped' in metrics.json).")
    if overlap:
        notes.append(overlap)
        logger.warning("%s", overlap)

    atomic_write_text(files[1], f"# mmed-rag eval: {config.task}\n\n{table}\n" + "".join(f"\n{n}\n" for n in notes))
    atomic_write_text(files[2], "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in per_example))
    save_config(config, out, name="eval.config.yaml")
    for problem in problems:
        logger.warning("left out: %s", problem)
    return EvalResult(document, out, files + figures)
