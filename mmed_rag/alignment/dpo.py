"""RAG-based preference tuning (RAG-PT): two stages of DPO with one LoRA adapter on a LLaVA, as MMed-RAG trains it.

Stage 1 trains a new LoRA adapter on the cross-modality pairs (the rejected answer paired with a noise image), so
that the model stops answering from the retrieved reports alone; stage 2 continues the same adapter on the overall
alignment pairs. The pair files come from ``make-pairs``; each stage reads one.

The method, as implemented on trl's :class:`~trl.DPOTrainer` (subclassed, not forked):

- loss: sigmoid DPO, ``beta`` 0.1, log-probs summed over the answer tokens (trl's defaults, the original's too);
- reference: the same model with the adapter disabled, so no second copy in memory; in stage 2 too by default
  (``stage2_reference="base"``, the original's choice), or the stage-1 adapter (``"stage1"``, trl's default for a
  loaded adapter);
- LoRA r 128, alpha 256 on the language model's q/k/v/o/gate/up/down projections (never ``lm_head``, never the
  vision tower); the multimodal projector is trained too, as a peft ``modules_to_save`` copy with its own learning
  rate (``mm_projector_lr`` 2e-5), so the reference keeps the original projector and the adapter file holds both;
- learning rate 1e-7 (VQA stage 2: 2e-7), 3 epochs, cosine schedule, 3% warm-up, batch 1 (the original script).

Layout of ``output_dir``::

    stage1/, stage2/     the adapter (peft format) + processor + dpo_config.json + log_history.json + curves.png,
                         and stage.json, written last: a stage directory with it is finished and skipped on rerun
    checkpoints/stageN/  the trainer's checkpoint-* of a running stage; a rerun resumes from the last one
    merged/              base + final adapter merged into one model directory (``merge=True``)

:func:`parse_dpo_args` accepts the original ``train_dpo_2stages.py`` command line unchanged (see docs/DPO.md).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from mmed_rag.adapters import load_lora
from mmed_rag.alignment.dpo_config import PROJECTOR, DPOError, MMedRAGDPOConfig, warn_once
from mmed_rag.alignment.original_flags import architecture_warnings
from mmed_rag.alignment.trainer import MMedRAGDPOTrainer
from mmed_rag.atomic import atomic_path
from mmed_rag.config import ConfigError
from mmed_rag.divergence import StopOnDivergence
from mmed_rag.errors import model_directory_problem
from mmed_rag.fingerprint import file_sha256
from mmed_rag.outputs import claim_outputs
from mmed_rag.training.stages import finished_summary, last_checkpoint, publish_stage, record_identity

logger = logging.getLogger(__name__)

CONFIG_FILE = "dpo_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Changing any of these changes what a stage computes: a finished stage or a checkpoint made with other values is
# not silently reused.
IDENTITY_FIELDS = (
    "lora_r",
    "lora_alpha",
    "lora_target_modules",
    "freeze_mm_mlp_adapter",
    "mm_projector_lr",
    "beta",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "seed",
)


# -- stages ----------------------------------------------------------------------------------------------------


def lora_config(config: MMedRAGDPOConfig):
    """The stage-1 adapter: LoRA on the language model, the projector as a trained copy (``modules_to_save``)."""
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        bias=config.lora_bias,
        target_modules=config.lora_target_modules,
        modules_to_save=None if config.freeze_mm_mlp_adapter else [PROJECTOR],
        task_type="CAUSAL_LM",
    )


def load_processor(config: MMedRAGDPOConfig):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(
        config.model_name_or_path, trust_remote_code=config.trust_remote_code, cache_dir=config.cache_dir
    )


def load_base_model(config: MMedRAGDPOConfig):
    """The base model, in bfloat16 when training in bf16 (as the original loads it), else float32."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(
        config.model_name_or_path,
        dtype=torch.bfloat16 if config.bf16 else torch.float32,
        trust_remote_code=config.trust_remote_code,
        cache_dir=config.cache_dir,
    )


@dataclass(frozen=True)
class StagePlan:
    """One stage of a run: its number, its pairs, and the adapter it continues (None: a new adapter)."""

    number: int
    data_path: Path
    start_adapter: Path | None
    learning_rate: float

    def directory(self, output_dir: Path) -> Path:
        return output_dir / f"stage{self.number}"

    def checkpoints(self, output_dir: Path) -> Path:
        return output_dir / "checkpoints" / f"stage{self.number}"


def plan_stages(config: MMedRAGDPOConfig) -> list[StagePlan]:
    """Which stages run on which data, continuing which adapter; every missing input is an error here."""
    for name in ("model_name_or_path", "image_folder", "output_dir"):
        if not getattr(config, name):
            raise DPOError(f"--{name} is required")
    if not Path(config.image_folder).is_dir():
        raise DPOError(f"--image_folder {config.image_folder} is not a directory")
    problem = model_directory_problem(config.model_name_or_path)
    if problem:
        raise DPOError(f"--model_name_or_path {problem}")
    output_dir = Path(config.output_dir)
    stages = config.stages
    if stages == ["1", "2"] and not config.stage2_data_path:
        raise DPOError("--stage both needs --stage2_data_path (the stage-2 pairs) besides --data_path")
    stage2_lr = config.stage2_learning_rate if config.stage2_learning_rate is not None else config.learning_rate
    plans = []
    if "1" in stages:
        if not config.data_path:
            raise DPOError("stage 1 needs --data_path (the stage-1 pairs)")
        plans.append(StagePlan(1, Path(config.data_path), None, config.learning_rate))
    if "2" in stages:
        data = config.stage2_data_path if "1" in stages else (config.stage2_data_path or config.data_path)
        if not data:
            raise DPOError("stage 2 needs --stage2_data_path (or --data_path when it runs alone)")
        if "1" in stages:
            start = plans[0].directory(output_dir)
        else:
            given = config.stage1_adapter or config.lora_checkpoint_path
            start = Path(given) if given else output_dir / "stage1"
            if not (start / "adapter_config.json").is_file():
                where = f"{start} has no adapter_config.json" if given else f"there is no finished {start}"
                raise DPOError(
                    f"stage 2 continues the stage-1 LoRA adapter, but {where}. Give --stage1_adapter DIR (the "
                    f"original's --lora_checkpoint_path DIR), or run stage 1 first (--stage 1 or --stage both)."
                )
            if (start / "non_lora_trainables.bin").is_file() or not (start / ADAPTER_WEIGHTS).is_file():
                raise DPOError(
                    f"{start} is not an adapter written by this trainer (no {ADAPTER_WEIGHTS}, or the original "
                    f"code's non_lora_trainables.bin): the original's adapters name the weights of its own LLaVA "
                    f"classes and cannot continue on a transformers LLaVA. Run stage 1 here."
                )
        plans.append(StagePlan(2, Path(data), start, stage2_lr))
    for plan in plans:
        if not plan.data_path.is_file():
            raise DPOError(f"stage {plan.number}: preference file not found: {plan.data_path}")
    return plans


def _identity(config: MMedRAGDPOConfig, plan: StagePlan, data_sha256: str) -> dict[str, Any]:
    start = plan.start_adapter
    return {
        "stage": plan.number,
        "base_model": str(Path(config.model_name_or_path).resolve()),
        "data_sha256": data_sha256,
        "start_adapter_sha256": file_sha256(start / ADAPTER_WEIGHTS) if start else None,
        "learning_rate": plan.learning_rate,
        "reference": config.stage2_reference if plan.number == 2 else "base",
        **{name: getattr(config, name) for name in IDENTITY_FIELDS},
        # The processes share each step's pairs: their number changes the batch. Recorded only when several, so
        # stages finished by one process before this entry existed still count as finished.
        **({"world_size": config.world_size} if config.world_size > 1 else {}),
    }


def _stage_args(config: MMedRAGDPOConfig, plan: StagePlan, output_dir: Path) -> MMedRAGDPOConfig:
    return dataclasses.replace(
        config,
        output_dir=str(plan.checkpoints(output_dir)),
        learning_rate=plan.learning_rate,
        run_name=f"{output_dir.name}-stage{plan.number}",
    )


def _check_trainable(model) -> None:
    """LoRA must sit on the language model only: no vision-tower or lm_head parameter may train."""
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    wrong = [name for name in trainable if "vision_tower" in name or "lm_head" in name]
    if wrong:
        raise DPOError(f"lora_target_modules selects the vision tower or lm_head ({wrong[0]}, ...); narrow it")
    if not any("lora_" in name for name in trainable):
        raise DPOError("no LoRA parameter is trainable: lora_target_modules matched no language-model layer")


def train_stage(config: MMedRAGDPOConfig, plan: StagePlan, processor, callbacks: list | None = None) -> dict[str, Any]:
    """Train one stage (or resume it, or skip it when finished); return what its stage.json says."""

    from mmed_rag.alignment.dataset import load_preference_pairs

    output_dir = Path(config.output_dir)
    final = plan.directory(output_dir)
    identity = _identity(config, plan, file_sha256(plan.data_path))
    finished = finished_summary(final, identity, ADAPTER_WEIGHTS)
    if finished is not None:
        logger.info("Stage %d is finished (%s): skipped.", plan.number, final)
        return finished

    pairs = load_preference_pairs(
        plan.data_path,
        config.image_folder,
        processor=processor,
        max_length=config.max_length,
        on_error=config.data_on_error,
    )
    logger.info(
        "Stage %d: %d pairs from %s (%d with a noised image, %d left out).",
        plan.number,
        len(pairs.rows),
        plan.data_path,
        pairs.noised,
        len(pairs.errors),
    )
    from datasets import Dataset

    dataset = Dataset.from_list(pairs.rows)
    args = _stage_args(config, plan, output_dir)
    checkpoints = Path(args.output_dir)
    resume = last_checkpoint(checkpoints, identity)

    _share_process_group_with_deepspeed(args)
    model = load_base_model(config)
    for message in architecture_warnings(config, model, processor):
        warn_once(message)
    peft_config = None
    if plan.start_adapter is None:
        peft_config = lora_config(config)
    else:
        model = load_lora(model, plan.start_adapter, is_trainable=True)
    trainer = MMedRAGDPOTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=processor,
        peft_config=peft_config,
        callbacks=[StopOnDivergence(f"train-dpo stage {plan.number}"), *(callbacks or [])],
    )
    _check_trainable(trainer.model)
    plugin = trainer.accelerator.state.deepspeed_plugin
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.model.parameters() if p.requires_grad)
    logger.info(
        "Stage %d: %s trainable parameters, learning rate %g (projector %s), %s on %s, %d process(es).",
        plan.number,
        f"{trainable:,}",
        plan.learning_rate,
        config.mm_projector_lr if config.mm_projector_lr is not None else plan.learning_rate,
        f"DeepSpeed ZeRO-{plugin.zero_stage}" if plugin is not None else "no DeepSpeed",
        args.device.type,
        args.world_size,
    )
    if args.should_save:
        record_identity(checkpoints, identity)
    if resume:
        logger.info("Stage %d: resuming from %s.", plan.number, resume)
    result = trainer.train(resume_from_checkpoint=resume)

    summary = {
        "stage": plan.number,
        "data_path": str(plan.data_path),
        "pairs": len(pairs.rows),
        "noised_pairs": pairs.noised,
        "skipped_pairs": len(pairs.errors),
        "start_adapter": str(plan.start_adapter) if plan.start_adapter else None,
        "reference": "base model (adapter disabled)" if identity["reference"] == "base" else "stage-1 adapter",
        "global_step": trainer.state.global_step,
        "resumed_from": resume,
        "train_metrics": result.metrics,
        "identity": identity,
    }
    title = f"RAG-PT stage {plan.number}: {plan.data_path.name}"
    plot = (lambda history, path: plot_curves(history, path, title)) if config.plot else None
    publish_stage(trainer, final, summary, plot, args_file=CONFIG_FILE)
    if args.should_save:
        logger.info("Stage %d done: adapter in %s (%d steps).", plan.number, final, trainer.state.global_step)
    del trainer, model
    gc.collect()
    return summary


def train_dpo_2stages(config: MMedRAGDPOConfig, callbacks: list | None = None) -> dict[str, Any]:
    """Run the stages ``config`` asks for (stage 1, then stage 2 on the same adapter); rerunning resumes.

    Returns ``{"stage1": dir, "stage2": dir, "merged": dir, "metrics": {stage: stage.json content}}`` with the
    entries of the stages that exist. ``callbacks`` are passed to every stage's trainer.
    """
    inputs = [config.model_name_or_path, config.data_path, config.stage2_data_path, config.image_folder]
    inputs += [config.stage1_adapter, config.lora_checkpoint_path]
    # Every process of a distributed run trains; the one that writes (rank 0) holds the output's lock.
    with claim_outputs("train-dpo", directories=[config.output_dir], inputs=inputs, lock=config.should_save):
        return _train_dpo_2stages(config, callbacks)


def _train_dpo_2stages(config: MMedRAGDPOConfig, callbacks: list | None) -> dict[str, Any]:
    plans = plan_stages(config)
    output_dir = Path(config.output_dir)
    if "wandb" in config.report_to:  # transformers' WandbCallback reads these; keep runs beside the outputs
        os.environ.setdefault("WANDB_DIR", str(output_dir))
        os.environ.setdefault("WANDB_PROJECT", "mmed-rag")
        output_dir.mkdir(parents=True, exist_ok=True)
    processor = load_processor(config)
    result: dict[str, Any] = {"metrics": {}}
    for plan in plans:
        summary = train_stage(config, plan, processor, callbacks)
        result[f"stage{plan.number}"] = plan.directory(output_dir)
        result["metrics"][f"stage{plan.number}"] = summary
    if config.merge:
        from mmed_rag.alignment.merge import merge_lora

        final_adapter = plans[-1].directory(output_dir)
        result["merged"] = output_dir / "merged"
        if config.should_save:
            _release_zero3()
            merge_lora(config.model_name_or_path, final_adapter, result["merged"])
    return result


def _share_process_group_with_deepspeed(args: MMedRAGDPOConfig) -> None:
    """Let DeepSpeed use the processes' group before the model loads.

    ZeRO-3 partitions the model while ``from_pretrained`` builds it and reads the number of processes from
    DeepSpeed's own comm layer. On the CPU (``use_cpu``) accelerate starts torch.distributed over gloo but not that
    layer, so the partitioning would count one process and refuse the batch sizes; hand it the running group.
    """
    if not args.deepspeed or args.world_size == 1:
        return
    import torch.distributed
    from deepspeed import comm

    if not comm.is_initialized():
        comm.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)


def _release_zero3() -> None:
    """After training, let from_pretrained load whole models again (ZeRO-3 partitions them while its config lives)."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    if is_deepspeed_zero3_enabled():
        unset_hf_deepspeed_config()


# -- curves ----------------------------------------------------------------------------------------------------


def plot_curves(log_history: list[dict], path: Path, title: str) -> None:
    """Loss, reward margin and chosen/rejected rewards per logged step (Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    logged = [entry for entry in log_history if "loss" in entry and "rewards/margins" in entry]
    steps = [entry["step"] for entry in logged]
    figure = Figure(figsize=(12, 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    loss_ax, margin_ax, reward_ax = figure.subplots(1, 3)
    loss_ax.plot(steps, [entry["loss"] for entry in logged], "o-", markersize=3)
    loss_ax.axhline(0.6931, color="grey", linestyle=":", label="ln 2 (policy = reference)")
    loss_ax.set(xlabel="step", ylabel="DPO loss", title="loss")
    loss_ax.legend(fontsize=7)
    margin_ax.plot(steps, [entry["rewards/margins"] for entry in logged], "o-", markersize=3, color="C2")
    margin_ax.axhline(0.0, color="grey", linestyle=":")
    margin_ax.set(xlabel="step", ylabel="reward margin", title="chosen - rejected reward")
    for key, colour in (("rewards/chosen", "C0"), ("rewards/rejected", "C3")):
        reward_ax.plot(steps, [entry[key] for entry in logged], "o-", markersize=3, color=colour, label=key[8:])
    reward_ax.axhline(0.0, color="grey", linestyle=":")
    reward_ax.set(xlabel="step", ylabel="beta * log-ratio", title="rewards")
    reward_ax.legend(fontsize=7)
    for ax in (loss_ax, margin_ax, reward_ax):
        ax.grid(alpha=0.3)
    figure.suptitle(title)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)


# -- command line ----------------------------------------------------------------------------------------------


def _yaml_arguments(path: Path) -> tuple[list[str], dict[str, None]]:
    """A YAML file's values as command-line tokens, to go before the real ones (which then win), and its nulls."""
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config {path} is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(MMedRAGDPOConfig) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown option(s) {', '.join(unknown)} (not fields of MMedRAGDPOConfig)")
    tokens: list[str] = []
    nulls = {name: None for name, value in values.items() if value is None}
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, list):
            tokens += [f"--{name}", *map(str, value)]
        elif isinstance(value, dict):
            tokens += [f"--{name}", json.dumps(value)]
        else:
            tokens += [f"--{name}", str(value)]
    return tokens, nulls


# The TrainingArguments a RAG-PT run usually sets (the rest: --help-all).
COMMON_TRAINING_OPTIONS = (
    "output_dir",
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "beta",
    "max_length",
    "bf16",
    "gradient_checkpointing",
    "save_steps",
    "logging_steps",
    "report_to",
    "deepspeed",
    "seed",
)


def dpo_help() -> str:
    """``train-dpo --help``: MMed-RAG's own options and the common training ones, not transformers' ~950 lines."""
    fields = {f.name: f for f in dataclasses.fields(MMedRAGDPOConfig)}
    own = [name for name in MMedRAGDPOConfig.__annotations__ if name in fields and fields[name].init]

    def line(name: str) -> str:
        f = fields[name]
        help_text = " ".join(str(f.metadata.get("help", "")).split())
        default = f.default if f.default is not dataclasses.MISSING else None
        return f"  --{name:<28} {help_text} (default: {default!r})"

    return "\n".join(
        [
            "usage: mmed-rag train-dpo [--config YAML] [--OPTION VALUE ...]",
            "",
            "RAG-PT: two-stage DPO + LoRA on preference pairs. Accepts the original train_dpo_2stages.py flags.",
            "",
            "  --config YAML                  a preset (configs/dpo/*.yaml); options given here override it",
            "  --help-all                     every option of transformers' TrainingArguments and trl's DPOConfig",
            "",
            "MMed-RAG's options:",
            *(line(name) for name in own),
            "",
            "Common training options (transformers / trl):",
            *(line(name) for name in COMMON_TRAINING_OPTIONS),
        ]
    )


def parse_dpo_args(argv: list[str] | None = None) -> MMedRAGDPOConfig:
    """The config of a command line: the original ``train_dpo_2stages.py`` flags, ours, and ``--config FILE.yaml``.

    YAML values are defaults that command-line flags override. ``--local_rank N`` (appended by the deepspeed
    launcher) is accepted; unknown options are errors.
    """
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help-all" in argv:
        HfArgumentParser(MMedRAGDPOConfig, prog="mmed-rag train-dpo").print_help()
        raise SystemExit(0)
    if "-h" in argv or "--help" in argv:
        print(dpo_help())
        raise SystemExit(0)
    tokens: list[str] = []
    config_file = None
    index = 0
    while index < len(argv):
        token = argv[index]
        if token == "--config":
            if index + 1 >= len(argv):
                raise ConfigError("--config needs a YAML file")
            config_file, index = Path(argv[index + 1]), index + 2
            continue
        if token.startswith("--config="):
            config_file = Path(token.split("=", 1)[1])
        elif token.startswith("--local-rank"):
            tokens.append(token.replace("--local-rank", "--local_rank", 1))
        else:
            tokens.append(token)
        index += 1
    parser = HfArgumentParser(MMedRAGDPOConfig)
    if config_file is not None:
        from_file, nulls = _yaml_arguments(config_file)
        tokens = from_file + tokens
        parser.set_defaults(**nulls)
    config, unused = parser.parse_args_into_dataclasses(args=tokens, return_remaining_strings=True)
    if unused:
        raise ConfigError(f"unknown option(s): {' '.join(unused)}")
    return config


def main(argv: list[str] | None = None, verbose: bool = False) -> int:
    """``train/dpo/train_dpo_2stages.py``: parse, train, report; bad input ends with one line and exit status 2."""
    from mmed_rag.cli import run_reporting_errors, show_each_warning_once

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("mmed_rag").setLevel(logging.INFO)
    show_each_warning_once()  # as `mmed-rag train-dpo` does: under the launcher too, not once per step
    return run_reporting_errors("train-dpo", lambda: _train(argv), verbose)


def _train(argv: list[str] | None) -> int:
    config = parse_dpo_args(argv)
    if not config.should_log:  # the other processes of a launched run: warnings only (transformers' replica level)
        logging.getLogger("mmed_rag").setLevel(logging.WARNING)
    result = train_dpo_2stages(config)
    for name in ("stage1", "stage2", "merged"):
        if name in result:
            logger.info("%s: %s", name, result[name])
    return 0
