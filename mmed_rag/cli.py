"""``mmed-rag <stage>``: one command, one subcommand per working stage.

Each subcommand only parses arguments into the stage's config dataclass (defaults < ``--config`` YAML < options)
and calls the stage's Python function, which users can call directly with the same arguments.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

from mmed_rag.config import add_config_arguments, config_from_args
from mmed_rag.errors import EXIT_BAD_INPUT, MMedRAGError
from mmed_rag.launch import is_main_process


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    # Returns the stage's config class from a module that imports no torch, transformers or open_clip (so a
    # stage's --help is fast); the stage's code is imported by `run`, when the stage runs.
    config: Callable[[], type]
    run: Callable[[object], int]


def _validate_config() -> type:
    from mmed_rag.data.validate import ValidateConfig

    return ValidateConfig


def _run_validate(config) -> int:
    from mmed_rag.data.validate import validate_data

    report = validate_data(**vars(config))
    print(report.render())
    return 0 if report.ok else 1


def _phantom_config() -> type:
    from mmed_rag.data.phantoms import PhantomConfig

    return PhantomConfig


def _run_phantoms(config) -> int:
    from mmed_rag.data.phantoms import make_phantoms

    manifest = make_phantoms(config)
    counts = ", ".join(f"{modality}: {sum(splits.values())}" for modality, splits in manifest["counts"].items())
    print(f"wrote phantom data set to {config.out} ({counts})")
    return 0


def _longitudinal_config() -> type:
    from mmed_rag.damon.phantoms import LongitudinalConfig

    return LongitudinalConfig


def _run_longitudinal(config) -> int:
    from mmed_rag.damon.phantoms import make_longitudinal_phantoms

    out = make_longitudinal_phantoms(config)
    print(f"wrote {config.patients} patient pairs (MIMIC-Diff-VQA and DAMON layouts) to {out}")
    return 0


def _tiny_model_config() -> type:
    from mmed_rag.generation.configs import TinyModelConfig

    return TinyModelConfig


def _run_tiny_model(config) -> int:
    from mmed_rag.testing import make_tiny_model

    print(f"wrote a tiny LLaVA with random weights (seed {config.seed}) to {make_tiny_model(config)}")
    return 0


def _demo_config() -> type:
    from mmed_rag.demo.config import DemoConfig

    return DemoConfig


def _run_demo(config) -> int:
    from mmed_rag.demo import run_demo

    return run_demo(config)


def _build_index_config() -> type:
    from mmed_rag.retrieval.configs import BuildIndexConfig

    return BuildIndexConfig


def _run_build_index(config) -> int:
    from mmed_rag.retrieval.index import build_index

    index = build_index(config)
    print(
        f"indexed {len(index)} unique {config.modality} report(s) ({index.kind}, dim {index.embed_dim}) -> {config.out}"
    )
    return 0


def _print_pending(parts: tuple[int, ...], output: str) -> None:
    """A split run's part that finished before the others: say which parts the merge into ``output`` waits for."""
    if parts:
        print(
            f"parts {', '.join(map(str, parts))} are not finished yet: the last part to finish merges all of them "
            f"into {output} (rerun an interrupted part with the same command to resume it)"
        )


def _retrieve_config() -> type:
    from mmed_rag.retrieval.configs import RetrieveConfig

    return RetrieveConfig


def _run_retrieve(config) -> int:
    from mmed_rag.retrieval.batch import retrieve

    summary = retrieve(config)
    print(
        f"wrote {summary.written} record(s) with reference reports to {summary.output_path}"
        f" ({summary.resumed} from an earlier run, {len(summary.skipped)} skipped); index: {summary.index_dir}"
    )
    _print_pending(summary.pending_parts, config.output_path)
    for problem in summary.skipped:
        print(f"  skipped: {problem}")
    return 0


def _eval_retrieval_config() -> type:
    from mmed_rag.retrieval.configs import EvalRetrievalConfig

    return EvalRetrievalConfig


def _run_eval_retrieval(config) -> int:
    from mmed_rag.retrieval.evaluate import eval_retrieval

    scores = eval_retrieval(config)
    print(
        f"{scores.queries} queries against {scores.index_size} reports; {scores.answerable} have their ground "
        "truth in the index (recall is over these):"
    )
    for k, value in scores.recall.items():
        print(f"  recall@{k}: {value:.3f} (chance {scores.chance[k]:.3f})")
    print(f"metrics and similarity.png in {config.out}")
    return 0


def _finetune_config() -> type:
    from mmed_rag.retrieval.configs import FinetuneConfig

    return FinetuneConfig


def _run_finetune(config) -> int:
    from mmed_rag.retrieval.finetune import finetune_clip

    retriever = finetune_clip(config)
    if is_main_process():  # under torchrun, once
        print(f"fine-tuned {config.dataset_type} retriever: {retriever}")
    return 0


def _generate_config() -> type:
    from mmed_rag.generation.configs import PipelineConfig

    return PipelineConfig


def _run_generate(config) -> int:
    from mmed_rag.pipeline import generate

    summary = generate(config)
    print(
        f"wrote {summary.written} prediction(s) to {summary.output} ({summary.resumed} from an earlier run, "
        f"{len(summary.skipped)} skipped)"
    )
    _print_pending(summary.pending_parts, config.output)
    for problem in summary.skipped:
        print(f"  skipped: {problem}")
    return 0


def _eval_config() -> type:
    from mmed_rag.eval.run import EvalConfig

    return EvalConfig


def _run_eval(config) -> int:
    from mmed_rag.eval.run import evaluate

    result = evaluate(config)
    print((result.out / "metrics.md").read_text(encoding="utf-8"))
    print(f"wrote {', '.join(path.name for path in result.files)} to {result.out}")
    return 0


def _make_pairs_config() -> type:
    from mmed_rag.alignment.make_pairs import MakePairsConfig

    return MakePairsConfig


def _run_make_pairs(config) -> int:
    from mmed_rag.alignment.make_pairs import make_pairs

    result = make_pairs(config)
    print(result.summary["table"])
    print(f"wrote {result.stage1} and {result.stage2}")
    return 0


def _train_sft_config() -> type:
    from mmed_rag.training.sft_config import SFTConfig

    return SFTConfig


def _run_train_sft(config, kind: str = "SFT") -> int:
    from mmed_rag.training.sft import train_sft

    result = train_sft(config)
    if not is_main_process():  # under torchrun, the report once
        return 0
    for name, directory in result["stages"].items():
        summary = result["summaries"][name]
        before, after = summary.get("val_loss_before"), summary.get("val_loss_after")
        val = f", val loss {before:.4f} -> {after:.4f}" if before is not None else ""
        print(f"{kind} stage {name}: {directory} ({summary['global_step']} steps{val})")
    return 0


def _run_damon_train(config) -> int:
    """DAMON's stages are SFT stages on its data configs (``damon_data``): the same runner, its own report."""
    return _run_train_sft(config, kind="DAMON")


def _merge_lora_config() -> type:
    from mmed_rag.alignment.merge import MergeLoraConfig

    return MergeLoraConfig


def _run_merge_lora(config) -> int:
    from mmed_rag.alignment.merge import run_merge_lora

    out = run_merge_lora(config)
    print(f"merged {config.adapter} into {config.base} -> {out}")
    return 0


def _convert_config() -> type:
    from mmed_rag.generation.configs import ConvertConfig

    return ConvertConfig


def _run_convert(config) -> int:
    from mmed_rag.generation.convert import convert_llava_med

    destination = convert_llava_med(config)
    print(f"converted {config.src} -> {destination} (transformers LlavaForConditionalGeneration + processor)")
    return 0


def _train_domain_config() -> type:
    from mmed_rag.domain.config import TrainDomainConfig

    return TrainDomainConfig


def _run_train_domain(config) -> int:
    from mmed_rag.domain.classifier import train_domain

    print(f"domain classifier: {train_domain(config)}")
    return 0


def _predict_domain_config() -> type:
    from mmed_rag.domain.config import PredictDomainConfig

    return PredictDomainConfig


def _run_predict_domain(config) -> int:
    from mmed_rag.domain.classifier import predict_domain

    for prediction in predict_domain(config):
        print(f"{prediction.image}\t{prediction.modality}\t{prediction.probability:.3f}")
    return 0


def _train_findings_config() -> type:
    from mmed_rag.damon.configs import TrainFindingsConfig

    return TrainFindingsConfig


def _run_train_findings(config) -> int:
    from mmed_rag.damon.findings import train_findings

    print(f"finding classifier: {train_findings(config)}")
    return 0


def _diagnose_config() -> type:
    from mmed_rag.damon.configs import DiagnoseConfig

    return DiagnoseConfig


def _run_diagnose(config) -> int:
    from mmed_rag.damon.findings import describe, diagnose

    metrics = diagnose(config)
    print(f"predictions: {config.out}/predictions.jsonl" + (f"; {describe(metrics)}" if metrics else ""))
    return 0


def _damon_eval_config() -> type:
    from mmed_rag.damon.configs import DamonEvalConfig

    return DamonEvalConfig


def _run_damon_eval(config) -> int:
    from mmed_rag.damon.evaluate import evaluate

    metrics = evaluate(config)
    print(f"{config.out}/metrics.md ({metrics['all']['n']} questions, prior: {metrics['prior']})")
    return 0


def _damon_study_config() -> type:
    from mmed_rag.damon.configs import DamonStudyConfig

    return DamonStudyConfig


def _run_damon_study(config) -> int:
    from mmed_rag.damon.study import run_study, table

    print(table(run_study(config)), end="")
    print(f"report: {config.out}/REPORT.md")
    return 0


STAGES = (
    Stage(
        "validate-data",
        "check data files (and images) in the MMed-RAG release formats",
        _validate_config,
        _run_validate,
    ),
    Stage(
        "make-phantoms", "write the procedural phantom data set in the release layout", _phantom_config, _run_phantoms
    ),
    Stage(
        "make-longitudinal-phantoms",
        "write prior/current chest-film pairs with difference questions (MIMIC-Diff-VQA and DAMON layouts)",
        _longitudinal_config,
        _run_longitudinal,
    ),
    Stage(
        "train-findings",
        "train DAMON's finding classifier (one sigmoid per finding) for the preliminary diagnosis",
        _train_findings_config,
        _run_train_findings,
    ),
    Stage(
        "damon-diagnose",
        "label each image's findings (finding classifier, or the VLM asked per condition) and score them",
        _diagnose_config,
        _run_diagnose,
    ),
    Stage(
        "damon-eval",
        "answer multi-image questions (with a preliminary diagnosis or without) and score them per question type",
        _damon_eval_config,
        _run_damon_eval,
    ),
    Stage(
        "damon-study",
        "DAMON on longitudinal phantoms end to end (stand-in model, four stages, both priors) and its table",
        _damon_study_config,
        _run_damon_study,
    ),
    Stage(
        "make-tiny-model",
        "write a tiny random LLaVA (model + processor) to try generate and training on",
        _tiny_model_config,
        _run_tiny_model,
    ),
    Stage(
        "train-domain",
        "train the domain classifier that routes images to their modality",
        _train_domain_config,
        _run_train_domain,
    ),
    Stage(
        "predict-domain",
        "predict the modality of images (or 'unknown')",
        _predict_domain_config,
        _run_predict_domain,
    ),
    Stage(
        "finetune-clip",
        "fine-tune one modality's CLIP retriever on image-report pairs",
        _finetune_config,
        _run_finetune,
    ),
    Stage(
        "build-index",
        "encode a modality's report corpus once into a FAISS index",
        _build_index_config,
        _run_build_index,
    ),
    Stage(
        "retrieve",
        "retrieve reference reports for every record of a VQA or report file",
        _retrieve_config,
        _run_retrieve,
    ),
    Stage(
        "eval-retrieval",
        "recall@k of a retriever and its similarity distribution",
        _eval_retrieval_config,
        _run_eval_retrieval,
    ),
    Stage(
        "convert-llava-med",
        "convert an original llava-med-v1.5 checkpoint into a transformers LLaVA directory",
        _convert_config,
        _run_convert,
    ),
    Stage(
        "generate",
        "answer a VQA or report test file with MMed-RAG (route, retrieve, prompt, generate)",
        _generate_config,
        _run_generate,
    ),
    Stage(
        "eval",
        "score predictions: VQA yes/no metrics, report metrics, or the copy-reliance analyses",
        _eval_config,
        _run_eval,
    ),
    Stage(
        "make-pairs",
        "RAG-PT preference pairs (one file per stage) from generate runs with/without retrieval and noise",
        _make_pairs_config,
        _run_make_pairs,
    ),
    Stage(
        "train-sft",
        "supervised fine-tuning of an image-text-to-text model on LLaVA conversations, in stages",
        _train_sft_config,
        _run_train_sft,
    ),
    Stage(
        "damon-train",
        "DAMON's staged fine-tuning (MCA, DCA, DSL, DPM) on its data configs, each stage's val loss before -> after",
        _train_sft_config,
        _run_damon_train,
    ),
    Stage(
        "merge-lora",
        "fold a RAG-PT LoRA adapter into its base model (one directory, no peft needed)",
        _merge_lora_config,
        _run_merge_lora,
    ),
    Stage(
        "demo",
        "MMed-RAG end to end on generated phantoms (retrievers, stand-in model, RAG, RAG-PT) and a REPORT.md",
        _demo_config,
        _run_demo,
    ),
)


def _train_dpo(argv: list[str], verbose: bool = False) -> int:
    from mmed_rag.alignment.dpo import main as train_dpo_main

    return train_dpo_main(argv, verbose=verbose)


# Stages whose config is a transformers TrainingArguments subclass: HfArgumentParser parses their options (the
# original scripts' flags included), so the rest of the command line goes to them untouched.
PASSTHROUGH = {
    "train-dpo": (
        "RAG-PT: two-stage DPO + LoRA on preference pairs (the original train_dpo_2stages.py flags, or --config)",
        _train_dpo,
    ),
}


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The command line; only the ``selected`` stage gets its options.

    Building a stage's options imports its module (and with it torch, transformers, open_clip, ...): seconds per
    stage. So ``mmed-rag --help`` lists the stages without importing any, and ``mmed-rag STAGE ...`` imports one.
    """
    parser = argparse.ArgumentParser(prog="mmed-rag", description="MMed-RAG: multimodal RAG for medical VLMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"mmed-rag {metadata.version('mmed-rag')}")
    subparsers = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage in STAGES:
        sub = subparsers.add_parser(stage.name, help=stage.help, description=stage.help)
        if stage.name == selected:
            add_config_arguments(sub, stage.config())
        sub.set_defaults(stage_spec=stage)
    for name, (help_text, run) in PASSTHROUGH.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text, add_help=False)
        sub.set_defaults(passthrough=run)
    return parser


def _stage_token(argv: list[str]) -> tuple[str, int] | None:
    """The stage named on the command line and its position (the first word that is not an option)."""
    for position, token in enumerate(argv):
        if not token.startswith("-"):
            return token, position
    return None


def _split_passthrough(argv: list[str]) -> tuple[list[str], list[str]] | None:
    """(our options, the stage's arguments) when ``argv`` names a pass-through stage; argparse would read the
    stage's options as its own."""
    named = _stage_token(argv)
    if named is None or named[0] not in PASSTHROUGH:
        return None
    return argv[: named[1] + 1], argv[named[1] + 1 :]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    named = _stage_token(argv)
    parser = build_parser(named[0] if named else None)
    split = _split_passthrough(argv)
    args = parser.parse_args(split[0] if split else argv)
    # Our own progress at INFO; third-party libraries (open_clip logs every step of model creation through the
    # root logger) only at WARNING unless --verbose.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Under torchrun every process runs this; rank 0 reports progress, the others only warnings and errors.
    progress = logging.INFO if is_main_process() else logging.WARNING
    logging.getLogger("mmed_rag").setLevel(logging.DEBUG if args.verbose else progress)
    show_each_warning_once()
    if not sys.stderr.isatty():  # Hugging Face's own bars (loading weights, shards) in a log file: off
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if split is not None:
        return args.passthrough(split[1], verbose=args.verbose)
    stage: Stage = args.stage_spec
    return run_reporting_errors(stage.name, lambda: stage.run(config_from_args(stage.config(), args)), args.verbose)


def show_each_warning_once() -> None:
    """Print each distinct warning (category + message) once per process.

    Python already shows a warning once per code location, but every ``warnings.catch_warnings()`` block resets
    that memory, and transformers' Trainer opens one at every checkpoint: third-party deprecation warnings then
    repeat at every step of a long run.
    """
    if getattr(warnings.showwarning, "shows_each_once", False):
        return
    shown: set[tuple[type, str]] = set()
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        key = (category, str(message))
        if key not in shown:
            shown.add(key)
            original(message, category, filename, lineno, file, line)

    show.shows_each_once = True
    warnings.showwarning = show


def run_reporting_errors(stage: str, run: Callable[[], int], verbose: bool = False) -> int:
    """``run()``; bad input or a bad artefact (:class:`MMedRAGError`) becomes one line on stderr and exit code 2.

    The line is ``mmed-rag STAGE: message``; the traceback too with ``--verbose``. Any other exception is a bug
    and propagates with its traceback.
    """
    try:
        return run()
    except MMedRAGError as error:
        if verbose:
            traceback.print_exc()
        print(f"mmed-rag {stage}: {one_line(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT


def one_line(error: BaseException) -> str:
    """The error's message on one line (a KeyError's message without the quotes ``str`` adds)."""
    message = error.args[0] if isinstance(error, KeyError) and len(error.args) == 1 else str(error)
    return " ".join(str(message).split())


if __name__ == "__main__":
    sys.exit(main())
