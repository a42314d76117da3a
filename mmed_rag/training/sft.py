"""Supervised fine-tuning of an image-text-to-text model on LLaVA-style conversations, in stages.

Data: the LLaVA / LLaVA-Med instruct format (:class:`~mmed_rag.data.records.ConversationRecord`): ``id``,
``image`` (a path or a list of paths, under ``image_folder``) and ``conversations``, whose human turns carry one
``<image>`` marker per image, where the image goes. Each gpt turn becomes one training row: the conversation up
to it is the prompt, the turn is the completion, and only the completion's tokens carry a loss (trl's
``completion_only_loss``; prompt and padding tokens have label -100). A k-turn conversation trains all k answers,
each once, as LLaVA does, at the cost of encoding its prompt k times.

Training is trl's :class:`~trl.SFTTrainer` (not forked): its vision prompt-completion collator, subclassed only to
open images from paths batch by batch. What trains is chosen per stage:

- ``projector``: the multimodal projector only (LLaVA's feature-alignment stage);
- ``language_model``: projector + language model, vision tower frozen (LLaVA's instruction-tuning stage);
- ``full``: every weight;
- ``lora``: LoRA on the language model's linear layers, the projector as a trained copy; the stage publishes the
  adapter, and the next stage starts from base + adapter merged.

A run is a list of stages (``stages`` in the YAML, each with its data files, their mix, epochs or steps, learning
rate and what trains), each starting from the previous stage's weights; without ``stages`` the top-level options
are the one stage. A stage's data may also be a DAMON data config (``damon_data``, :mod:`mmed_rag.training.sources`:
each dataset's images under its own root, its ``repeat_time`` as its mix). Given val data (``val_data`` files or
a ``damon_val_data`` config), a stage measures the answer-only loss on it with its starting weights and its
trained ones (and every ``eval_steps``): ``val_loss_before`` and ``val_loss_after`` in ``stage.json``, the points in
``curves.png``. Stages resume, skip when finished and publish whole (:mod:`mmed_rag.training.stages`)::

    output_dir/<stage>/              the model (or adapter) + processor + stage.json + curves.png
    output_dir/checkpoints/<stage>/  checkpoint-* of a running stage
"""

from __future__ import annotations

import gc
import logging
import random
import sys
from pathlib import Path
from typing import Any

import torch
from trl import SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from mmed_rag.alignment.collator import with_bos
from mmed_rag.config import ConfigError, save_config
from mmed_rag.data.images import ImagePathError, open_image, resolve_image_path
from mmed_rag.data.records import IMAGE_TOKEN, ConversationRecord, RecordError
from mmed_rag.divergence import StopOnDivergence
from mmed_rag.errors import MMedRAGError, model_directory_problem
from mmed_rag.fingerprint import file_sha256, path_fingerprint
from mmed_rag.launch import is_main_process
from mmed_rag.outputs import claim_outputs
from mmed_rag.training.sft_config import SFTConfig, SFTStage, Trainable
from mmed_rag.training.sources import DataSource, data_sources
from mmed_rag.training.stages import finished_summary, last_checkpoint, plot_loss, publish_stage, record_identity

logger = logging.getLogger(__name__)

PROJECTOR = "multi_modal_projector"
VISION_TOWER = "vision_tower"
LM_LINEAR = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
MODEL_WEIGHTS = "model.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class SFTError(MMedRAGError):
    """SFT data or settings that cannot train: no rows, a stage without data, an unknown base model."""


# -- data ------------------------------------------------------------------------------------------------------


def _content(text: str) -> list[dict[str, str]]:
    """A human turn as structured content: its text with an image block where each ``<image>`` marker was."""
    blocks: list[dict[str, str]] = []
    for index, piece in enumerate(text.split(IMAGE_TOKEN)):
        if index:
            blocks.append({"type": "image"})
        piece = piece.strip()
        if piece:
            blocks.append({"type": "text", "text": piece})
    return blocks


def conversation_rows(record: ConversationRecord, images: list[str]) -> list[dict[str, Any]]:
    """One prompt-completion row per gpt turn (trl's conversational format, images where the markers are)."""
    rows, messages = [], []
    for turn in record.conversations:
        if turn.speaker == "human":
            messages.append({"role": "user", "content": _content(turn.value)})
            continue
        rows.append(
            {
                "prompt": [dict(message) for message in messages],
                "completion": [{"role": "assistant", "content": [{"type": "text", "text": turn.value}]}],
                "images": list(images),
                "id": str(record.id),
            }
        )
        messages.append({"role": "assistant", "content": [{"type": "text", "text": turn.value}]})
    return rows


def mixed(groups: list[list[dict]], weights: list[float], seed: int) -> list[dict]:
    """Each file's rows ``weight`` times (whole copies, then a seeded sample of the rest), shuffled together."""
    rng = random.Random(seed)
    rows: list[dict] = []
    for group, weight in zip(groups, weights, strict=True):
        copies, rest = int(weight), weight - int(weight)
        rows += group * copies + rng.sample(group, round(rest * len(group)))
    rng.shuffle(rows)
    return rows


def load_rows(sources: list[DataSource], on_error: str, seed: int) -> tuple[list[dict], list[str]]:
    """The rows of ``sources``, mixed by their weights, and one message per record left out (``on_error="skip"``)."""
    groups, skipped = [], []
    for source in sources:
        result = source.read(on_error)
        skipped += [str(error) for error in result.errors]
        rows = []
        for record, position in zip(result.records, result.positions, strict=True):
            try:
                images = [str(resolve_image_path(source.image_folder, image)) for image in record.image_paths]
                missing = [image for image in images if not Path(image).is_file()]
                if missing:
                    raise ImagePathError(f"image not found: {missing[0]}")
            except ImagePathError as error:
                where = f" ({source.origin}, images under its root {source.image_folder})" if source.origin else ""
                problem = RecordError(source.path, position, "image", f"{error}{where}")
                if on_error == "raise":
                    raise problem from None
                skipped.append(str(problem))
                continue
            rows += conversation_rows(record, images)
        groups.append(rows)
    for message in skipped:
        logger.warning("skipping %s", message)
    return mixed(groups, [source.weight for source in sources], seed), skipped


def stage_sources(stage: SFTStage, image_folder: str) -> tuple[list[DataSource], list[DataSource]]:
    """The stage's training and val sources: its files and its DAMON data configs' datasets."""
    return (
        data_sources(stage.data, stage.mix, stage.damon_data, image_folder, stage.name),
        data_sources(stage.val_data, (), stage.damon_val_data, image_folder, stage.name),
    )


class PathImageCollator(DataCollatorForVisionLanguageModeling):
    """trl's vision collator, opening each batch's images from their paths (never all in memory), with the BOS
    that inference prompts start with (LLaVA-Med's template leaves it to the tokenizer; trl tokenises without)."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        examples = [{**example, "images": [open_image(path) for path in example["images"]]} for example in examples]
        return with_bos(super().torch_call(examples), self.processor.tokenizer, self.max_length)


class MMedRAGSFTTrainer(SFTTrainer):
    """trl's SFTTrainer, resuming a full-model stage with the weights of its checkpoint.

    transformers' Trainer reloads a full-model checkpoint by raw state-dict keys, but ``save_pretrained`` wrote
    the model's saved layout (LLaVA: ``language_model.model.*``), so every key misses, only a warning is logged,
    and a resumed stage trains on from the starting weights. Here the checkpoint is read as ``from_pretrained``
    reads it (with the model's key mapping) and loaded strictly. Adapters (peft) and DeepSpeed keep their own
    loading.
    """

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        from peft import PeftModel

        target = self.model if model is None else model
        target = self.accelerator.unwrap_model(target)
        if isinstance(target, PeftModel) or self.is_deepspeed_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        saved = type(target).from_pretrained(resume_from_checkpoint, dtype=next(target.parameters()).dtype)
        target.load_state_dict(saved.state_dict(), strict=True)
        return None


# -- models ----------------------------------------------------------------------------------------------------


def load_stage_model(source: Path, dtype: torch.dtype):
    """The weights a stage starts from: a model directory, or a LoRA stage's adapter merged into its base."""
    from transformers import AutoModelForImageTextToText

    from mmed_rag.adapters import load_lora

    adapter_config = source / "adapter_config.json"
    if adapter_config.is_file():
        import json

        base = json.loads(adapter_config.read_text(encoding="utf-8"))["base_model_name_or_path"]
        model = AutoModelForImageTextToText.from_pretrained(base, dtype=dtype)
        return load_lora(model, source).merge_and_unload()
    problem = model_directory_problem(source)
    if problem:
        raise SFTError(f"{problem}, nor a LoRA stage")
    return AutoModelForImageTextToText.from_pretrained(source, dtype=dtype)


def set_trainable(model, trainable: Trainable) -> None:
    """Freeze what this stage does not train (``lora`` is set up by peft instead)."""
    for name, parameter in model.named_parameters():
        if trainable == "full":
            parameter.requires_grad_(True)
        elif trainable == "projector":
            parameter.requires_grad_(PROJECTOR in name)
        elif trainable == "language_model":
            parameter.requires_grad_(VISION_TOWER not in name)
    if trainable != "lora" and not any(parameter.requires_grad for parameter in model.parameters()):
        raise SFTError(f"trainable {trainable!r} selects no parameter of {type(model).__name__}")


def _lora_config(config: SFTConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=LM_LINEAR,
        modules_to_save=[PROJECTOR],
        task_type="CAUSAL_LM",
    )


# -- stages ----------------------------------------------------------------------------------------------------


def _damon_sha256(damon_config: str, sources: list[DataSource]) -> list[str]:
    """The config (roots, repeat times) and its annotations."""
    return [file_sha256(damon_config), *(file_sha256(source.path) for source in sources if source.dataset)]


def _identity(
    config: SFTConfig, stage: SFTStage, source: Path, train: list[DataSource], val: list[DataSource]
) -> dict[str, Any]:
    """What decides the stage's result; the val data too, as the summary holds its losses. The keys that only
    DAMON configs and val data bring are left out without them, so a stage published without either still
    matches."""
    return {
        "stage": stage.name,
        "starts_from": path_fingerprint(source),
        "data_sha256": [file_sha256(path) for path in stage.data],
        "mix": list(stage.mix),
        **({"damon_data_sha256": _damon_sha256(stage.damon_data, train)} if stage.damon_data else {}),
        **({"val_data_sha256": [file_sha256(path) for path in stage.val_data]} if stage.val_data else {}),
        **({"damon_val_data_sha256": _damon_sha256(stage.damon_val_data, val)} if stage.damon_val_data else {}),
        "epochs": stage.epochs,
        "max_steps": stage.max_steps,
        "learning_rate": stage.learning_rate,
        "trainable": stage.trainable,
        **{
            name: getattr(config, name)
            for name in ("batch_size", "gradient_accumulation_steps", "max_length", "seed", "bf16")
        },
        **({"lora": [config.lora_r, config.lora_alpha, config.lora_dropout]} if stage.trainable == "lora" else {}),
    }


def _trainer_args(config: SFTConfig, stage: SFTStage, checkpoints: Path, validated: bool):
    from trl import SFTConfig as TrlSFTConfig

    return TrlSFTConfig(
        output_dir=str(checkpoints),
        num_train_epochs=stage.epochs,
        max_steps=stage.max_steps,
        learning_rate=stage.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup_ratio,
        weight_decay=config.weight_decay,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_length=config.max_length,
        completion_only_loss=True,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        save_strategy="steps",
        save_steps=config.save_steps,
        logging_steps=config.logging_steps,
        eval_strategy="steps" if validated and config.eval_steps > 0 else "no",
        eval_steps=config.eval_steps if validated and config.eval_steps > 0 else None,
        prediction_loss_only=True,  # the val loss only: no logits gathered over the val set
        seed=config.seed,
        data_seed=config.seed,
        bf16=config.bf16,
        # Under torchrun on a machine without a GPU, accelerate finds no distributed backend unless told to run on
        # the CPU: each process would count itself rank 0 of 1, train on every row and write. With use_cpu they
        # join over gloo.
        use_cpu=not torch.accelerator.is_available(),
        gradient_checkpointing=False,
        report_to=[] if config.report_to in ("", "none") else config.report_to.split(","),
        dataloader_num_workers=config.workers,
        run_name=f"{Path(config.output_dir).name}-{stage.name}",
        disable_tqdm=not sys.stderr.isatty(),  # in a log file, the Trainer's log lines instead of a redrawn bar
    )


def train_stage(config: SFTConfig, stage: SFTStage, source: Path, processor) -> tuple[Path, dict[str, Any]]:
    """Train one stage from ``source`` (or resume it, or skip it when finished); its directory and summary."""
    from datasets import Dataset

    output_dir = Path(config.output_dir)
    final, checkpoints = output_dir / stage.name, output_dir / "checkpoints" / stage.name
    train_sources, val_sources = stage_sources(stage, config.image_folder)
    identity = _identity(config, stage, source, train_sources, val_sources)
    weights = ADAPTER_WEIGHTS if stage.trainable == "lora" else MODEL_WEIGHTS
    finished = finished_summary(final, identity, weights)
    if finished is not None:
        logger.info("SFT stage %s is finished (%s): skipped.", stage.name, final)
        return final, finished
    rows, skipped = load_rows(train_sources, config.on_error, config.seed)
    if not rows:
        raise SFTError(f"stage {stage.name}: no training row in {', '.join(data.path for data in train_sources)}")
    val_rows, val_skipped = load_rows(val_sources, config.on_error, config.seed) if val_sources else ([], [])
    if val_sources and not val_rows:
        raise SFTError(f"stage {stage.name}: no val row in {', '.join(data.path for data in val_sources)}")
    _check_lengths(rows + val_rows, processor, config.max_length)  # before any model loads
    resume = last_checkpoint(checkpoints, identity)
    args = _trainer_args(config, stage, checkpoints, validated=bool(val_rows))
    model = load_stage_model(source, torch.bfloat16 if config.bf16 else torch.float32)
    if stage.trainable != "lora":
        set_trainable(model, stage.trainable)
    trainer = MMedRAGSFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(val_rows) if val_rows else None,
        processing_class=processor,
        data_collator=PathImageCollator(processor=processor, max_length=None, completion_only_loss=True),
        peft_config=_lora_config(config) if stage.trainable == "lora" else None,
        callbacks=[StopOnDivergence(f"train-sft stage {stage.name}")],
    )
    trainable = sum(parameter.numel() for parameter in trainer.model.parameters() if parameter.requires_grad)
    logger.info(
        "SFT stage %s: %d rows (%d records left out), %d val rows, %s trainable parameters (%s), learning rate %g.",
        stage.name,
        len(rows),
        len(skipped),
        len(val_rows),
        f"{trainable:,}",
        stage.trainable,
        stage.learning_rate,
    )
    if args.should_save:
        record_identity(checkpoints, identity)
    # Before train(): the checkpoint of a resumed stage is loaded inside it, so this is the starting weights' loss.
    val_before = trainer.evaluate()["eval_loss"] if val_rows else None
    result = trainer.train(resume_from_checkpoint=resume)
    val_after = None
    if val_rows:
        val_after = trainer.evaluate()["eval_loss"]  # logged at the last step
        # train() starts a fresh log history, so the loss before it is put back at step 0 (for the curves).
        trainer.state.log_history.insert(0, {"eval_loss": val_before, "step": 0})
    summary = {
        "stage": stage.name,
        "starts_from": str(source),
        "data": [data.path for data in train_sources],
        "rows": len(rows),
        "skipped": skipped,
        "val_data": [data.path for data in val_sources],
        "val_rows": len(val_rows),
        "val_skipped": val_skipped,
        "val_loss_before": val_before,
        "val_loss_after": val_after,
        "trainable": stage.trainable,
        "global_step": trainer.state.global_step,
        "resumed_from": resume,
        "train_metrics": result.metrics,
        "identity": identity,
    }
    title = f"SFT stage {stage.name}: {', '.join(Path(data.path).name for data in train_sources)}"
    plot = (lambda history, path: plot_loss(history, path, title)) if config.plot else None
    publish_stage(trainer, final, summary, plot)
    logger.info(
        "SFT stage %s done: %s (%d steps)%s.",
        stage.name,
        final,
        trainer.state.global_step,
        f", val loss {val_before:.4f} -> {val_after:.4f}" if val_rows else "",
    )
    del trainer, model
    gc.collect()
    return final, summary


def _check_lengths(rows: list[dict], processor, max_length: int) -> None:
    """Refuse a row longer than ``max_length``: cutting it would drop its answer, and trl would not say."""
    from mmed_rag.alignment.dataset import sequence_lengths

    for row, length in zip(rows, sequence_lengths(rows, processor, answers=("completion",)), strict=True):
        if length > max_length:
            raise SFTError(
                f"record {row['id']!r}: {length} tokens, over max_length {max_length}; "
                "raise max_length or shorten it (a cut row would lose its answer)"
            )


def train_sft(config: SFTConfig) -> dict[str, Any]:
    """Run the stages of ``config`` in order, each from the previous stage's weights; rerunning resumes.

    Returns ``{"stages": {name: directory}, "final": directory, "summaries": {name: stage.json}}``.
    """
    stages = config.plan()
    for stage in stages:
        if not (stage.data or stage.damon_data):
            raise ConfigError(f"stage {stage.name}: give data (conversation JSON files) or damon_data (a DAMON config)")
    needed = ["model", "output_dir"]
    if any(stage.data or stage.val_data for stage in stages):  # a DAMON config's datasets name their own roots
        needed.append("image_folder")
    for name in needed:
        if not getattr(config, name):
            raise ConfigError(f"{name} is required (see `mmed-rag train-sft --help`)")
    inputs = [config.model, *([config.image_folder] if config.image_folder else [])]
    for stage in stages:  # every file is checked (and every DAMON config read) before any model loads
        for sources in stage_sources(stage, config.image_folder):
            inputs += [path for source in sources for path in (source.path, source.image_folder) if path]
        inputs += [path for path in (stage.damon_data, stage.damon_val_data) if path]
    # Every process of a distributed run trains; the one that writes (rank 0) holds the output's lock.
    with claim_outputs("train-sft", directories=[config.output_dir], inputs=inputs, lock=is_main_process()):
        return _train_sft(config, stages)


def _train_sft(config: SFTConfig, stages: list[SFTStage]) -> dict[str, Any]:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(config.model)
    source, result = Path(config.model), {"stages": {}, "summaries": {}}
    for stage in stages:
        directory, summary = train_stage(config, stage, source, processor)
        result["stages"][stage.name], result["summaries"][stage.name] = directory, summary
        source = directory
    if is_main_process():
        save_config(config, config.output_dir, name="sft_config.yaml")  # the run's record, once it produced something
    result["final"] = source
    return result
