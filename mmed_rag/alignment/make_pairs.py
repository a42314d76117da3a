"""``mmed-rag make-pairs``: the ``generate`` runs of a training set in, one preference file per stage out.

Two recipes (:mod:`mmed_rag.alignment.pairs`):

- ``paper`` (default): run ``mmed-rag generate`` on the training questions (or reports) three times: as deployed,
  with ``--no-retrieval`` and with ``--noised-image``. Each answer is judged (the parsed yes/no for VQA; a report
  similarity above the runs' mean for reports, see :mod:`mmed_rag.eval.correctness`).
- ``authors``: the authors' own recipe, from four runs: the three above plus ``--no-retrieval --noised-image``;
  answers judged by their rules unless ``yes_no_rule`` / ``judge_metric`` say otherwise.

Writes ``stage1.json``, ``stage2.json`` (release format), ``summary.json`` and ``summary.md``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mmed_rag.alignment.pairs import (
    AUTHORS_SEED,
    AnsweredItem,
    FourRunItem,
    FourRunVerdicts,
    Judged,
    Verdicts,
    authors_summary_table,
    build_authors_stages,
    build_pairs,
    count_types,
    split_stages,
    summary_table,
)
from mmed_rag.atomic import atomic_write_text
from mmed_rag.config import ConfigError, save_config
from mmed_rag.data.records import write_records
from mmed_rag.eval.examples import EvalInputError, Example, read_examples
from mmed_rag.outputs import claim_outputs

logger = logging.getLogger(__name__)

RUNS = ("with_retrieval", "without_retrieval", "noised")
# The authors' recipe adds a fourth run: without reports, on the noise image.
AUTHORS_RUNS = ("without_retrieval", "without_retrieval_noised", "with_retrieval", "noised")
# The generate options each run must have been made with: (no_retrieval, noised_image).
MODES = {
    "with_retrieval": (False, False),
    "without_retrieval": (True, False),
    "noised": (False, True),
    "without_retrieval_noised": (True, True),
}
# What must be the same in the three runs' saved configs: one question set, one model.
SHARED = ("input", "model", "adapter", "task")


@dataclass
class MakePairsConfig:
    """Where the three runs are, how answers are judged, and how stage 2 mixes the pair types."""

    with_retrieval: str = field(default="", metadata={"help": "generate output: retrieved reports, real image"})
    without_retrieval: str = field(default="", metadata={"help": "generate output run with --no-retrieval"})
    noised: str = field(default="", metadata={"help": "generate output run with --noised-image"})
    without_retrieval_noised: str = field(
        default="", metadata={"help": "authors recipe: generate output run with --no-retrieval --noised-image"}
    )
    recipe: Literal["paper", "authors"] = field(
        default="paper",
        metadata={"help": "paper: the paper's description (3 runs); authors: their deleted pair builder (4 runs)"},
    )
    out: str = field(default="pairs", metadata={"help": "directory for stage1.json, stage2.json and the summary"})
    task: Literal["vqa", "report"] = field(default="vqa", metadata={"help": "how answers are judged"})
    gold: str | None = field(default=None, metadata={"help": "gold file (default: the answers in the runs)"})
    yes_no_rule: Literal["standard", "strict", "authors"] | None = field(
        default=None,
        metadata={"help": "vqa: how answers are read as yes/no (default: standard; authors recipe: authors)"},
    )
    judge_metric: str | None = field(
        default=None,
        metadata={
            "help": "report task: similarity metric of a good report (default: BLEU-4; authors recipe: 'authors', "
            "their first-sentence nltk BLEU, good at or above the mean)"
        },
    )
    judge_threshold: str = field(
        default="mean", metadata={"help": "report task: good above this score, or 'mean' over the runs compared"}
    )
    stage2_cross_ratio: float = field(
        default=0.5,
        metadata={
            "help": "paper: share of the cross-modality pairs stage 2 also trains on; authors: 2a pairs kept = "
            "int(ratio x (|2b| + |2c|)) (seeded sample)"
        },
    )
    seed: int | None = field(
        default=None, metadata={"help": "seed of the stage-2 sample (default: 0; authors recipe: 42, as theirs)"}
    )
    on_error: Literal["raise", "skip"] = field(
        default="raise", metadata={"help": "a record that cannot be judged: stop, or leave it out and list it"}
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.stage2_cross_ratio <= 1.0:
            raise ConfigError("stage2_cross_ratio must be in [0, 1]")
        if self.without_retrieval_noised and self.recipe != "authors":
            raise ConfigError("--without-retrieval-noised is a run of the authors recipe: add --recipe authors")
        self.report_judge()

    @property
    def runs(self) -> tuple[str, ...]:
        return AUTHORS_RUNS if self.recipe == "authors" else RUNS

    @property
    def rule(self) -> str:
        """The yes/no rule answers are read with: as given, else the recipe's."""
        return self.yes_no_rule or ("authors" if self.recipe == "authors" else "standard")

    @property
    def stage2_seed(self) -> int:
        return self.seed if self.seed is not None else (AUTHORS_SEED if self.recipe == "authors" else 0)

    def report_judge(self):
        """The judge of reports: as given, else the recipe's."""
        from mmed_rag.eval.correctness import AUTHORS_JUDGE, ReportJudge

        metric = self.judge_metric or (AUTHORS_JUDGE if self.recipe == "authors" else "BLEU-4")
        try:
            return ReportJudge.from_options(metric, self.judge_threshold)
        except ValueError as error:
            raise ConfigError(f"judge_threshold: {error}") from None


@dataclass
class PairsResult:
    stage1: Path
    stage2: Path
    summary: dict
    problems: list[str]


def _read_runs(config: MakePairsConfig) -> tuple[dict[str, dict], list[str], list[str]]:
    """Each run's examples by id, the problems met, and the ids answered in every run (in the first run's order)."""
    paths = {run: getattr(config, run) for run in config.runs}
    missing = [f"--{run.replace('_', '-')}" for run, path in paths.items() if not path]
    if missing:
        count = len(config.runs)
        raise ConfigError(
            f"make-pairs --recipe {config.recipe} needs {count} generate outputs; missing {', '.join(missing)}"
        )
    gold = (config.gold,) if config.gold else ()
    runs = {run: read_examples([path], config.task, gold, on_error=config.on_error) for run, path in paths.items()}
    check_run_modes(paths, {run: list(examples) for run, examples in runs.items()})
    problems = [problem for examples in runs.values() for problem in examples.problems]
    by_key = {run: {example.key: example for example in examples} for run, examples in runs.items()}
    first = config.runs[0]
    keys = [key for key in by_key[first] if all(key in by_key[run] for run in config.runs)]
    for run in config.runs:
        unmatched = [key for key in by_key[run] if key not in keys]
        if unmatched:
            message = (
                f"{paths[run]}: {len(unmatched)} id(s) not answered in all {len(config.runs)} runs, e.g. "
                f"{unmatched[:5]}; run generate on the same input in every mode"
            )
            if config.on_error == "raise":
                raise EvalInputError(message)
            problems.append(message)
    return by_key, problems, keys


def _prompt_of(example: Example, config: MakePairsConfig, problems: list[str]) -> str | None:
    """The human turn a run's answer was given to, or None (reported) when the run did not write it."""
    if example.prompt:
        return example.prompt
    message = f"{example.where}: field 'prompt': missing (regenerate with this version of mmed-rag generate)"
    if config.on_error == "raise":
        raise EvalInputError(message)
    problems.append(message)
    return None


def _answered_items(config: MakePairsConfig) -> tuple[list[AnsweredItem], list[str]]:
    by_key, problems, keys = _read_runs(config)
    items = []
    for key in keys:
        reference = by_key["with_retrieval"][key]
        prompt = _prompt_of(reference, config, problems)
        if prompt is None:
            continue
        items.append(
            AnsweredItem(
                key=key,
                image=reference.images[0],
                gold=reference.gold,
                prompt=prompt,
                with_retrieval=reference.prediction,
                without_retrieval=by_key["without_retrieval"][key].prediction,
                noised=by_key["noised"][key].prediction,
                modality=reference.modality,
            )
        )
    return items, problems


def _four_run_items(config: MakePairsConfig) -> tuple[list[FourRunItem], list[str]]:
    by_key, problems, keys = _read_runs(config)
    items = []
    for key in keys:
        without, with_reports = by_key["without_retrieval"][key], by_key["with_retrieval"][key]
        prompt_without, prompt_with = _prompt_of(without, config, problems), _prompt_of(with_reports, config, problems)
        if prompt_without is None or prompt_with is None:
            continue
        items.append(
            FourRunItem(
                key=key,
                image=with_reports.images[0],
                gold=with_reports.gold,
                prompt_without=prompt_without,
                prompt_with=prompt_with,
                without_retrieval=without.prediction,
                without_retrieval_noised=by_key["without_retrieval_noised"][key].prediction,
                with_retrieval=with_reports.prediction,
                with_retrieval_noised=by_key["noised"][key].prediction,
                image_id="" if with_reports.image_id is None else with_reports.image_id,
                modality=with_reports.modality,
            )
        )
    return items, problems


def _describe(mode: tuple[bool, bool]) -> str:
    no_retrieval, noised = mode
    return ", ".join(
        ["without retrieval (--no-retrieval)" if no_retrieval else "with retrieval"]
        + ["on noise images (--noised-image)" if noised else "on the real images"]
    )


def _saved_config(path: str) -> dict | None:
    """The config ``generate`` saved beside its output (``OUT.config.yaml``), if it is there."""
    import yaml

    saved = Path(path).with_name(f"{Path(path).stem}.config.yaml")
    if not saved.is_file():
        return None
    try:
        loaded = yaml.safe_load(saved.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise EvalInputError(f"{saved}: cannot read the run's saved config: {error}") from None
    return loaded if isinstance(loaded, dict) else None


def check_run_modes(paths: dict[str, str], examples: dict[str, list]) -> None:
    """Refuse runs that are not what their flags say: one file in two roles, a run made in another mode (read
    from its saved config, else from whether its records hold reference reports), or runs of different
    questions or models."""
    flag = {run: f"--{run.replace('_', '-')}" for run in paths}
    seen: dict[Path, str] = {}
    for run, path in paths.items():
        resolved = Path(path).resolve()
        if resolved in seen:
            raise EvalInputError(
                f"{path} is given as both {flag[seen[resolved]]} and {flag[run]}: each run is its own file"
            )
        seen[resolved] = run
    configs = {run: _saved_config(path) for run, path in paths.items()}
    for run, path in paths.items():
        saved = configs[run]
        if saved is not None:
            mode = (bool(saved.get("no_retrieval")), bool(saved.get("noised_image")))
            if mode != MODES[run]:
                raise EvalInputError(
                    f"{path} was generated {_describe(mode)}, but {flag[run]} needs a run {_describe(MODES[run])}"
                )
            continue
        with_reports = any(example.reference_reports for example in examples[run])
        if with_reports == MODES[run][0]:
            found = "holds retrieved reports" if with_reports else "holds no retrieved reports"
            raise EvalInputError(f"{path} {found}, but {flag[run]} needs a run {_describe(MODES[run])}")
        logger.warning("%s: no saved config beside it; its image mode (real or noise) cannot be checked", path)
    known = {run: saved for run, saved in configs.items() if saved is not None}
    for name in SHARED:
        values = {run: saved.get(name) for run, saved in known.items()}
        if name != "task":  # paths, as saved: compared where they lead from here
            values = {run: value and os.path.realpath(value) for run, value in values.items()}
        if len(set(map(str, values.values()))) > 1:
            shown = "; ".join(f"{flag[run]}: {value}" for run, value in values.items())
            raise EvalInputError(
                f"the runs were made with different '{name}' ({shown}): pairs need one question set and one model"
            )


def _verdicts(config: MakePairsConfig, items: list[AnsweredItem]) -> list[Verdicts]:
    from mmed_rag.eval.correctness import judge_runs

    golds = [item.gold for item in items]
    good = judge_runs(
        config.task,
        {run: ([getattr(item, run) for item in items], golds) for run in RUNS},
        config.report_judge() if config.task == "report" else None,
        config.rule,
    )
    return [Verdicts(*(good[run][index] for run in RUNS)) for index in range(len(items))]


# The authors' three comparisons: (stage, first run, second run); for reports each is judged against its own mean.
COMPARISONS = (
    ("stage1", "without_retrieval", "without_retrieval_noised"),
    ("stage2a", "with_retrieval", "with_retrieval_noised"),
    ("stage2bc", "without_retrieval", "with_retrieval"),
)


def _four_run_verdicts(config: MakePairsConfig, items: list[FourRunItem]) -> list[FourRunVerdicts]:
    from mmed_rag.eval.correctness import judge_runs

    golds = [item.gold for item in items]
    judged = {}
    for stage, first, second in COMPARISONS:
        good = judge_runs(
            config.task,
            {run: ([getattr(item, run) for item in items], golds) for run in (first, second)},
            config.report_judge() if config.task == "report" else None,
            config.rule,
        )
        judged[stage] = [Judged(a, b) for a, b in zip(good[first], good[second], strict=True)]
    return [FourRunVerdicts(*(judged[stage][index] for stage, _, _ in COMPARISONS)) for index in range(len(items))]


def make_pairs(config: MakePairsConfig) -> PairsResult:
    """Judge the runs, build the pairs by the config's recipe, and write one preference file per stage plus the
    summary."""
    inputs = [getattr(config, run) for run in config.runs] + [config.gold]
    with claim_outputs("make-pairs", directories=[config.out], inputs=inputs):
        return _make_pairs(config)


def _make_pairs(config: MakePairsConfig) -> PairsResult:
    if config.recipe == "authors":
        return _make_authors_pairs(config)
    items, problems = _answered_items(config)
    if not items:
        raise EvalInputError("no item is answered in all three runs: nothing to build pairs from")
    verdicts = _verdicts(config, items)
    pairs = build_pairs(items, verdicts)
    stages = split_stages(pairs, config.stage2_cross_ratio, config.stage2_seed)
    counts = count_types(pairs)
    summary = {
        "recipe": "paper",
        "items": len(items),
        "accuracy": {run: sum(getattr(v, run) for v in verdicts) / len(verdicts) for run in RUNS},
        "pairs": {f"{modality}/{kind}": n for (modality, kind), n in sorted(counts.items())},
        "stage1": len(stages.stage1),
        "stage2": len(stages.stage2),
        "skipped": problems,
    }
    table = summary_table(stages, pairs)
    return _write(config, stages.stage1, stages.stage2, summary, table, len(items), problems)


def _make_authors_pairs(config: MakePairsConfig) -> PairsResult:
    items, problems = _four_run_items(config)
    if not items:
        raise EvalInputError("no item is answered in all four runs: nothing to build pairs from")
    verdicts = _four_run_verdicts(config, items)
    stages = build_authors_stages(items, verdicts, config.task, config.stage2_cross_ratio, config.stage2_seed)
    if stages.shortfall:
        logger.warning(
            "stage 2a: the sample asks for %d pairs more than the %d found; all kept (the authors' script raised "
            "ValueError here)",
            stages.shortfall,
            stages.found_2a,
        )
    counts = count_types([*stages.stage1, *stages.stage2])
    summary = {
        "recipe": "authors",
        "items": len(items),
        "yes_no_rule": config.rule if config.task == "vqa" else None,
        "judge_metric": config.report_judge().metric if config.task == "report" else None,
        "pairs": {f"{modality}/{kind}": n for (modality, kind), n in sorted(counts.items())},
        "found_2a": stages.found_2a,
        "shortfall_2a": stages.shortfall,
        "stage1": len(stages.stage1),
        "stage2": len(stages.stage2),
        "skipped": problems,
    }
    table = authors_summary_table(stages)
    return _write(config, stages.stage1, stages.stage2, summary, table, len(items), problems)


def _write(config: MakePairsConfig, stage1, stage2, summary: dict, table: str, items: int, problems) -> PairsResult:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    stage1_file = write_records(out / "stage1.json", [pair.record for pair in stage1])
    stage2_file = write_records(out / "stage2.json", [pair.record for pair in stage2])
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    title = f"# RAG-PT preference pairs ({items} items, {config.recipe} recipe)"
    atomic_write_text(out / "summary.md", f"{title}\n\n{table}\n")
    save_config(config, out, name="make-pairs.config.yaml")
    for problem in problems:
        logger.warning("left out: %s", problem)
    logger.info("Wrote %d stage-1 and %d stage-2 pairs to %s", len(stage1), len(stage2), out)
    return PairsResult(stage1_file, stage2_file, {**summary, "table": table}, problems)
