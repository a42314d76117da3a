"""The RAG-PT DPO run's settings: trl's DPOConfig plus MMed-RAG's stages, LoRA, projector learning rate and the
original ``train_dpo_2stages.py`` flags (mapped to transformers 5 names, checked, or refused with a reason).

One dataclass holds every default (see docs/DPO.md for their sources); YAML presets in ``configs/dpo/`` and the
command line override it through :func:`mmed_rag.alignment.dpo.parse_dpo_args`.
"""

from __future__ import annotations

import logging
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from trl import DPOConfig

from mmed_rag.config import ConfigError
from mmed_rag.errors import MMedRAGError

logger = logging.getLogger(__name__)

#: The language model's linear layers, as LLaVA's ``find_all_linear_names`` picks them (peft full-matches it).
LM_LINEAR = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PROJECTOR = "multi_modal_projector"


class DPOError(MMedRAGError, ValueError):
    """A DPO run that cannot start or continue; the message says what to change."""


def _strip_none(annotation: Any) -> Any:
    arguments = [argument for argument in typing.get_args(annotation) if argument is not type(None)]
    return arguments[0] if typing.get_origin(annotation) in (typing.Union, types.UnionType) else annotation


def _flag(help_text: str, default: Any = None, **metadata: Any) -> Any:
    return field(default=default, metadata={"help": help_text, **metadata})


@dataclass
class MMedRAGDPOConfig(DPOConfig):
    """trl's DPOConfig plus MMed-RAG's two stages, LoRA, the projector's learning rate and the original's flags.

    Defaults are MMed-RAG's (its ``scripts/train_dpo_2stages.sh`` and DPO trainer) where it sets them, and safe on a CPU
    otherwise: bf16 and gradient checkpointing stay off unless asked for (trl turns both on). The original
    LLaVA-architecture flags (``--vision_tower``, ``--mm_projector_type`` ...) do not build anything here, the model
    directory does; when given they are checked against the loaded model and every disagreement is logged.
    """

    # -- model and data ---------------------------------------------------------------------------------------
    model_name_or_path: str | None = _flag("local LLaVA model directory (AutoModelForImageTextToText + processor)")
    data_path: str | None = _flag("stage-1 preference pairs (release JSON format); the only stage when alone")
    stage2_data_path: str | None = _flag("stage-2 preference pairs; given with data_path, both stages run")
    image_folder: str | None = _flag("directory the pairs' image paths are relative to")
    data_on_error: Literal["raise", "skip"] = _flag(
        "a pair that cannot be trained on (missing image, too long, ...): stop (raise) or leave it out (skip)", "raise"
    )
    # -- stages -----------------------------------------------------------------------------------------------
    stage: Literal["both", "1", "2"] | None = _flag(
        "which stages to run; default: both with stage2_data_path, 2 with lora_checkpoint_path, else 1"
    )
    stage1_adapter: str | None = _flag("stage-1 adapter directory that stage 2 continues (stage 2 alone)")
    lora_checkpoint_path: str | None = _flag(
        "the original's stage-2 switch: continue this adapter on data_path (= --stage 2 --stage1_adapter DIR)"
    )
    stage2_learning_rate: float | None = _flag("stage-2 learning rate (default: learning_rate; VQA preset: 2e-7)")
    stage2_reference: Literal["base", "stage1"] = _flag(
        "stage-2 DPO reference: base = adapter disabled (the original), stage1 = the frozen stage-1 adapter", "base"
    )
    chosen_noised_mode: Literal["chosen", "both"] = _flag(
        "chosen_noised pairs: noise on the chosen side only, or on both sides (the original's code)", "chosen"
    )
    # -- LoRA and projector -----------------------------------------------------------------------------------
    lora_enable: bool = _flag("train a LoRA adapter (full fine-tuning is not supported)", True)
    lora_r: int = _flag("LoRA rank (MMed-RAG: 128)", 128)
    lora_alpha: int = _flag("LoRA alpha (MMed-RAG: 256)", 256)
    lora_dropout: float = _flag("LoRA dropout (0 in effect while disable_dropout is on, as in the original)", 0.05)
    lora_bias: Literal["none", "all", "lora_only"] = _flag("LoRA bias training", "none")
    lora_target_modules: str = _flag("regex (peft full-match) of the linear layers that get LoRA", LM_LINEAR)
    lora_weight_path: str = _flag("the original's unused LoRA weight path; must stay empty", "")
    mm_projector_lr: float | None = _flag(
        "learning rate of the multimodal projector (MMed-RAG: 2e-5); None: learning_rate", 2e-5
    )
    freeze_mm_mlp_adapter: bool = _flag("keep the multimodal projector frozen", False)
    model_max_length: int | None = _flag("the original's name for max_length (tokens per row, images included)")
    merge: bool = _flag("also write base + final adapter merged to output_dir/merged", False)
    plot: bool = _flag("draw curves.png (loss, reward margin, chosen/rejected rewards) per stage", True)
    # -- the original's LLaVA flags: checked against the model, never silently ignored -------------------------
    version: str | None = _flag("the original's conversation template name; checked against the chat template")
    vision_tower: str | None = _flag("the original's vision tower name; checked against the vision config")
    mm_vision_select_layer: int | None = _flag("checked against config.vision_feature_layer")
    mm_vision_select_feature: str | None = _flag("patch | cls_patch; checked against vision_feature_select_strategy")
    mm_projector_type: str | None = _flag("linear | mlpNx_gelu; checked against the projector's layers")
    mm_use_im_start_end: bool | None = _flag("checked against the tokenizer (<im_start>/<im_end> tokens)")
    mm_use_im_patch_token: bool | None = _flag("checked against the tokenizer (<im_patch> token)")
    mm_patch_merge_type: str | None = _flag("flat for LLaVA-1.5; anything else is LLaVA-NeXT and unsupported")
    image_aspect_ratio: str | None = _flag("square | pad; checked against the image processor's do_pad")
    group_by_modality_length: bool = _flag("the original's sampler option; every RAG-PT pair is multimodal", False)
    lazy_preprocess: bool = _flag("images are always decoded per batch; accepted for the original command", True)
    is_multimodal: bool = _flag("accepted for the original command; RAG-PT pairs are always multimodal", True)
    freeze_backbone: bool = _flag("accepted; with LoRA the base model is always frozen", False)
    tune_mm_mlp_adapter: bool = _flag("projector-only pre-training; not a DPO setting, must stay False", False)
    pretrain_mm_mlp_adapter: str | None = _flag("not supported: convert the model with its projector instead")
    bits: int = _flag("16 (4/8-bit quantised training is not supported)", 16)
    double_quant: bool = _flag("only meaningful with bits 4/8 (unsupported)", True)
    quant_type: str = _flag("only meaningful with bits 4/8 (unsupported)", "nf4")
    mpt_attn_impl: str = _flag("MPT-only option of the original; ignored for LLaVA", "triton")
    cache_dir: str | None = _flag("cache directory for from_pretrained (nothing is downloaded)")
    evaluation_strategy: str | None = _flag("the original's (transformers 4.x) name of eval_strategy")
    warmup_ratio: float | None = _flag("the original's warm-up share; becomes warmup_steps (a float < 1 is a ratio)")
    # -- trainer defaults: MMed-RAG's, or safe on CPU ---------------------------------------------------------
    learning_rate: float = _flag("LoRA learning rate (MMed-RAG: 1e-7)", 1e-7)
    num_train_epochs: float = _flag("epochs per stage (MMed-RAG: 3)", 3.0)
    lr_scheduler_type: str = _flag("learning-rate schedule (MMed-RAG: cosine)", "cosine")
    warmup_steps: float = _flag("warm-up steps, or a share of the steps when < 1 (MMed-RAG: 0.03)", 0.03)
    per_device_train_batch_size: int = _flag("pairs per device and step (MMed-RAG: 1)", 1)
    logging_steps: float = _flag("log every this many steps", 1)
    save_strategy: str = _flag("checkpoint strategy: steps keeps a stage resumable", "steps")
    save_steps: float = _flag("checkpoint every this many steps (MMed-RAG: 200)", 200)
    save_total_limit: int | None = _flag("checkpoints kept per stage (MMed-RAG: 1)", 1)
    optim: str = _flag("optimizer (the original's: adamw_torch)", "adamw_torch")
    report_to: None | str | list[str] = _flag("none, tensorboard, wandb (offline with WANDB_MODE=offline)", "none")
    bf16: bool | None = _flag("bfloat16 mixed precision; off unless set (on a CPU it is slow, for checks only)")
    gradient_checkpointing: bool | None = _flag("recompute activations in backward; off unless set")
    dataloader_pin_memory: bool | None = _flag("pin batches in memory; default: on with CUDA, off on a CPU")

    def __post_init__(self) -> None:
        if self.stage is not None:
            self.stage = str(self.stage)  # YAML and Python callers may give the number
        hints = typing.get_type_hints(MMedRAGDPOConfig)
        for name in ("stage", "stage2_reference", "chosen_noised_mode", "data_on_error", "lora_bias"):
            choices = typing.get_args(_strip_none(hints[name]))
            value = getattr(self, name)
            if value is not None and value not in choices:
                raise ConfigError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
        self._map_original_flags()
        self._refuse_unsupported()
        if self.disable_tqdm is None:  # in a log file, the Trainer's log lines instead of a carriage-return bar
            self.disable_tqdm = not sys.stderr.isatty()
        super().__post_init__()

    def _map_original_flags(self) -> None:
        """Translate the original's (transformers 4.x) flags and make CPU-safe choices, once, in place."""
        if self.evaluation_strategy is not None:
            self.eval_strategy, self.evaluation_strategy = self.evaluation_strategy, None
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise ConfigError(f"warmup_ratio: expected 0 <= warmup_ratio < 1, got {self.warmup_ratio}")
            self.warmup_steps, self.warmup_ratio = float(self.warmup_ratio), None
        if self.model_max_length is not None:
            if self.max_length not in (1024, self.model_max_length):  # 1024: DPOConfig's default, i.e. unset
                raise ConfigError(
                    f"model_max_length {self.model_max_length} and max_length {self.max_length} disagree; give one"
                )
            self.max_length = self.model_max_length
        if self.gradient_checkpointing is not None and self.activation_checkpointing is None:
            self.activation_checkpointing = self.gradient_checkpointing  # the new name; no deprecation warning
        self.gradient_checkpointing = None
        cuda = torch.cuda.is_available()
        if self.tf32 and not cuda:
            warn_once("--tf32 True needs an Ampere (or newer) GPU; there is none, so it is dropped.")
            self.tf32 = None
        if self.bf16 is None:
            self.bf16 = False
        elif self.bf16 and not cuda and not self.use_cpu:
            warn_once(
                "--bf16 True without a GPU: training in bfloat16 on the CPU (torch autocast; slow, for checking "
                "a setup only). Pass --bf16 False for fp32."
            )
            self.use_cpu = True
        if not torch.accelerator.is_available() or (self.deepspeed and os.environ.get("DS_ACCELERATOR") == "cpu"):
            # A launched process (deepspeed --num_gpus N, torchrun) on a machine without a GPU finds no distributed
            # backend in accelerate unless it is told to run on the CPU: each would count itself rank 0 of 1, train
            # on all the pairs and write the outputs. With use_cpu the processes join over gloo.
            self.use_cpu = True
        if self.dataloader_pin_memory is None:
            self.dataloader_pin_memory = cuda

    def _refuse_unsupported(self) -> None:
        refusals = {
            "lora_enable": (not self.lora_enable, "full fine-tuning is not supported; RAG-PT trains a LoRA adapter"),
            "bits": (self.bits != 16, f"{self.bits}-bit quantised training is not supported (use 16)"),
            "tune_mm_mlp_adapter": (
                self.tune_mm_mlp_adapter,
                "projector pre-training is not a DPO setting; the projector trains with mm_projector_lr anyway",
            ),
            "pretrain_mm_mlp_adapter": (
                self.pretrain_mm_mlp_adapter is not None,
                "not supported: the model directory must hold its projector (convert-llava-med)",
            ),
            "lora_weight_path": (
                bool(self.lora_weight_path),
                "not supported: continue an adapter with --stage1_adapter or --lora_checkpoint_path",
            ),
            "mm_patch_merge_type": (
                self.mm_patch_merge_type not in (None, "flat"),
                "only 'flat' (LLaVA-1.5) is supported",
            ),
        }
        for name, (refused, reason) in refusals.items():
            if refused:
                raise ConfigError(f"{name}: {reason}")

    @property
    def stages(self) -> list[str]:
        """The stages this config runs, in order."""
        stage = self.stage or ("2" if self.lora_checkpoint_path else "both" if self.stage2_data_path else "1")
        return ["1", "2"] if stage == "both" else [stage]


_WARNED_MESSAGES: set[str] = set()


def warn_once(message: str) -> None:
    """Log a warning once per process (the config is rebuilt per stage; its warnings are not news the second time)."""
    if message not in _WARNED_MESSAGES:
        _WARNED_MESSAGES.add(message)
        logger.warning(message)
