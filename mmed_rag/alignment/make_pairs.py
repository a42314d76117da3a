"""``mmed-rag make-pairs``: the three ``generate`` runs of a training set in, one preference file per stage out.

Run ``mmed-rag generate`` on the training questions (or reports) three times: as deployed, with
``--no-retrieval`` and with ``--noised-image``. Each answer is judged (the parsed yes/no for VQA; a report
similarity above the runs' mean for reports, see :mod:`mmed_rag.eval.correctness`) and
:mod:`mmed_rag.alignment.pairs` turns the verdicts into pairs. Writes ``stage1.json``, ``stage2.json`` (release
format), ``summary.json`` and ``summary.md``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mmed_rag.alignment.pairs import AnsweredItem, Verdicts, build_pairs, count_types, split_stages, summary_table
from mmed_rag.atomic import atomic_write_text
from mmed_rag.config import ConfigError, save_config
from mmed_rag.data.records import write_records
from mmed_rag.eval.examples import EvalInputError, read_examples
from mmed_rag.outputs import claim_outputs

logger = logging.getLogger(__name__)

RUNS = ("with_retrieval", "without_retrieval", "noised")
# The generate options each run must have been made with: (no_retrieval, noised_image).
MODES = {"with_retrieval": (False, False), "without_retrieval": (True, False), "noised": (False, True)}
# What must be the same in the three runs' saved configs: one question set, one model.
SHARED = ("input", "model", "adapter", "task")


@dataclass
class MakePairsConfig:
    """Where the three runs are, how answers are judged, and how stage 2 mixes the pair types."""

    with_retrieval: str = field(default="", metadata={"help": "generate output: retrieved reports, real image"})
    without_retrieval: str = field(default="", metadata={"help": "generate output run with --no-retrieval"})
    noised: str = field(default="", metadata={"help": "generate output run with --noised-image"})
    out: str = field(default="pairs", metadata={"help": "directory for stage1.json, stage2.json and the summary"})
    task: Literal["vqa", "report"] = field(default="vqa", metadata={"help": "how answers are judged"})
    gold: str | None = field(default=None, metadata={"help": "gold file (default: the answers in the runs)"})
    judge_metric: str = field(default="BLEU-4", metadata={"help": "report task: similarity metric of a good report"})
    judge_threshold: str = field(
        default="mean", metadata={"help": "report task: good above this score, or 'mean' over the three runs"}
    )
    stage2_cross_ratio: float = field(
        default=0.5, metadata={"help": "share of the cross-modality pairs stage 2 also trains on (seeded sample)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the stage-2 sample"})
    on_error: Literal["raise", "skip"] = field(
        default="raise", metadata={"help": "a record that cannot be judged: stop, or leave it out and list it"}
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.stage2_cross_ratio <= 1.0:
            raise ConfigError("stage2_cross_ratio must be in [0, 1]")
        from mmed_rag.eval.correctness import ReportJudge

        try:
            ReportJudge.from_options(self.judge_metric, self.judge_threshold)
        except ValueError as error:
            raise ConfigError(f"judge_threshold: {error}") from None


@dataclass
class PairsResult:
    stage1: Path
    stage2: Path
    summary: dict
    problems: list[str]


def _answered_items(config: MakePairsConfig) -> tuple[list[AnsweredItem], list[str]]:
    paths = {run: getattr(config, run) for run in RUNS}
    missing = [f"--{run.replace('_', '-')}" for run, path in paths.items() if not path]
    if missing:
        raise ConfigError(f"make-pairs needs the three generate outputs; missing {', '.join(missing)}")
    gold = (config.gold,) if config.gold else ()
    runs = {run: read_examples([path], config.task, gold, on_error=config.on_error) for run, path in paths.items()}
    check_run_modes(paths, {run: list(examples) for run, examples in runs.items()})
    problems = [problem for examples in runs.values() for problem in examples.problems]
    by_key = {run: {example.key: example for example in examples} for run, examples in runs.items()}
    keys = [key for key in by_key["with_retrieval"] if all(key in by_key[run] for run in RUNS)]
    for run in RUNS:
        unmatched = [key for key in by_key[run] if key not in keys]
        if unmatched:
            message = (
                f"{paths[run]}: {len(unmatched)} id(s) not answered in all three runs, e.g. {unmatched[:5]}; "
                f"run generate on the same input in every mode"
            )
            if config.on_error == "raise":
                raise EvalInputError(message)
            problems.append(message)
    items = []
    for key in keys:
        reference = by_key["with_retrieval"][key]
        if not reference.prompt:
            message = f"{reference.where}: field 'prompt': missing (regenerate with this version of mmed-rag generate)"
            if config.on_error == "raise":
                raise EvalInputError(message)
            problems.append(message)
            continue
        items.append(
            AnsweredItem(
                key=key,
                image=reference.images[0],
                gold=reference.gold,
                prompt=reference.prompt,
                with_retrieval=reference.prediction,
                without_retrieval=by_key["without_retrieval"][key].prediction,
                noised=by_key["noised"][key].prediction,
                modality=reference.modality,
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
    flag = {run: f"--{run.replace('_', '-')}" for run in RUNS}
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
    from mmed_rag.eval.correctness import ReportJudge, judge_runs

    golds = [item.gold for item in items]
    good = judge_runs(
        config.task,
        {run: ([getattr(item, run) for item in items], golds) for run in RUNS},
        ReportJudge.from_options(config.judge_metric, config.judge_threshold) if config.task == "report" else None,
    )
    return [Verdicts(*(good[run][index] for run in RUNS)) for index in range(len(items))]


def make_pairs(config: MakePairsConfig) -> PairsResult:
    """Judge the three runs, build the pairs, and write one preference file per stage plus the summary."""
    inputs = [config.with_retrieval, config.without_retrieval, config.noised, config.gold]
    with claim_outputs("make-pairs", directories=[config.out], inputs=inputs):
        return _make_pairs(config)


def _make_pairs(config: MakePairsConfig) -> PairsResult:
    items, problems = _answered_items(config)
    if not items:
        raise EvalInputError("no item is answered in all three runs: nothing to build pairs from")
    verdicts = _verdicts(config, items)
    pairs = build_pairs(items, verdicts)
    stages = split_stages(pairs, config.stage2_cross_ratio, config.seed)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    stage1 = write_records(out / "stage1.json", [pair.record for pair in stages.stage1])
    stage2 = write_records(out / "stage2.json", [pair.record for pair in stages.stage2])
    counts = count_types(pairs)
    summary = {
        "items": len(items),
        "accuracy": {run: sum(getattr(v, run) for v in verdicts) / len(verdicts) for run in RUNS},
        "pairs": {f"{modality}/{kind}": n for (modality, kind), n in sorted(counts.items())},
        "stage1": len(stages.stage1),
        "stage2": len(stages.stage2),
        "skipped": problems,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    table = summary_table(stages, pairs)
    atomic_write_text(out / "summary.md", f"# RAG-PT preference pairs ({len(items)} items)\n\n{table}\n")
    save_config(config, out, name="make-pairs.config.yaml")
    for problem in problems:
        logger.warning("left out: %s", problem)
    logger.info("Wrote %d stage-1 and %d stage-2 pairs to %s", len(stages.stage1), len(stages.stage2), out)
    return PairsResult(stage1, stage2, {**summary, "table": table}, problems)
