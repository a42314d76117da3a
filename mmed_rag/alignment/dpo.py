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
import re
import shutil
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from trl import DPOConfig, DPOTrainer

from mmed_rag.atomic import atomic_path, atomic_write_text, publish_directory
from mmed_rag.config import ConfigError
from mmed_rag.fingerprint import file_sha256

logger = logging.getLogger(__name__)

#: The language model's linear layers, as LLaVA's ``find_all_linear_names`` picks them (peft full-matches it).
LM_LINEAR = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PROJECTOR = "multi_modal_projector"
STAGE_MARKER = "stage.json"  # written last: a stage directory with it is complete
CONFIG_FILE = "dpo_config.json"
LOG_FILE = "log_history.json"
CURVES_FILE = "curves.png"
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


class DPOError(ValueError):
    """A DPO run that cannot start or continue; the message says what to change."""


class StageMismatchError(DPOError):
    """``output_dir`` holds a stage made from other data, another base model or other settings."""


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
            _warn_once("--tf32 True needs an Ampere (or newer) GPU; there is none, so it is dropped.")
            self.tf32 = None
        if self.bf16 is None:
            self.bf16 = False
        elif self.bf16 and not cuda and not self.use_cpu:
            _warn_once(
                "--bf16 True without a GPU: training in bfloat16 on the CPU (torch autocast; slow, for checking "
                "a setup only). Pass --bf16 False for fp32."
            )
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


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """Log a warning once per process (the config is rebuilt per stage; its warnings are not news the second time)."""
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning(message)


# -- the original's architecture flags, checked against the model --------------------------------------------


def _vision_tower_shape(name: str) -> dict[str, int]:
    """What a CLIP tower name says about its shape, e.g. clip-vit-large-patch14-336: patch 14, 336 px, 1024 wide."""
    shape = {}
    patch = re.search(r"patch(\d+)(?:-(\d+))?", name)
    if patch:
        shape["patch_size"] = int(patch.group(1))
        shape["image_size"] = int(patch.group(2) or 224)
    widths = {"base": 768, "large": 1024, "huge": 1280}
    width = re.search(r"vit-(base|large|huge)", name)
    if width:
        shape["hidden_size"] = widths[width.group(1)]
    return shape


def _known_templates() -> dict[str, str]:
    from mmed_rag.chat_templates import LLAVA_MED_MISTRAL, VICUNA_V1, load_chat_template

    return {name: load_chat_template(name).strip() for name in (LLAVA_MED_MISTRAL, VICUNA_V1)}


#: LLaVA-Med's conversation names (llava/conversation.py conv_templates) -> our chat template of the same format.
VERSION_TEMPLATES = {"mistral_instruct": "llava_med_mistral", "v1": "vicuna_v1", "vicuna_v1": "vicuna_v1"}


def architecture_warnings(config: MMedRAGDPOConfig, model, processor) -> list[str]:
    """Where the original's LLaVA flags disagree with the loaded model and processor (empty: all agree).

    Reads configs and module structure only, so it works on a model partitioned by ZeRO-3.
    """
    found: list[str] = []
    model_config = model.config
    vision = getattr(model_config, "vision_config", None)

    def disagree(flag: str, value: Any, actual: str, consequence: str) -> None:
        found.append(f"--{flag} {value} disagrees with the model: {actual}; {consequence}")

    if config.mm_vision_select_layer is not None:
        layer = getattr(model_config, "vision_feature_layer", None)
        if layer != config.mm_vision_select_layer:
            disagree(
                "mm_vision_select_layer",
                config.mm_vision_select_layer,
                f"vision_feature_layer is {layer}",
                "the model's value is used",
            )
    if config.mm_vision_select_feature is not None:
        strategy = getattr(model_config, "vision_feature_select_strategy", None)
        wanted = {"patch": "default", "cls_patch": "full"}.get(config.mm_vision_select_feature)
        if strategy != wanted:
            disagree(
                "mm_vision_select_feature",
                config.mm_vision_select_feature,
                f"vision_feature_select_strategy is {strategy!r}",
                "the model's value is used",
            )
    if config.mm_projector_type is not None:
        found += _projector_warnings(config.mm_projector_type, model)
    if config.vision_tower is not None and vision is not None:
        expected = _vision_tower_shape(config.vision_tower)
        actual = {key: getattr(vision, key, None) for key in expected}
        if expected != actual:
            disagree(
                "vision_tower",
                config.vision_tower,
                f"its vision config has {actual}, the name says {expected}",
                "the model's own vision tower is used",
            )
    if config.image_aspect_ratio is not None:
        pads = bool(getattr(processor.image_processor, "do_pad", False))
        if (config.image_aspect_ratio == "pad") != pads:
            disagree(
                "image_aspect_ratio",
                config.image_aspect_ratio,
                f"the image processor {'pads' if pads else 'does not pad'} images to square (do_pad={pads})",
                "the processor decides (convert-llava-med writes a LlavaImageProcessor with do_pad)",
            )
    vocabulary = processor.tokenizer.get_vocab()
    image_tokens = {"mm_use_im_start_end": ("<im_start>", "<im_end>"), "mm_use_im_patch_token": ("<im_patch>",)}
    for flag, tokens in image_tokens.items():
        value = getattr(config, flag)
        has = all(token in vocabulary for token in tokens)
        if value is not None and value != has:
            disagree(
                flag,
                value,
                f"the tokenizer {'has' if has else 'has no'} {'/'.join(tokens)}",
                "prompts get the processor's image tokens",
            )
    if config.version is not None:
        found += _template_warnings(config.version, processor)
    limit = getattr(model_config.get_text_config(), "max_position_embeddings", None)
    if config.max_length is not None and limit is not None and config.max_length > limit:
        found.append(f"max_length {config.max_length} is over the model's max_position_embeddings {limit}")
    if config.group_by_modality_length:
        found.append(
            "--group_by_modality_length True has no effect: every RAG-PT pair has an image (the original's "
            "modality_lengths looked for an 'images' key the records lack, so it grouped nothing either); "
            "batches are drawn at random"
        )
    return found


def _projector_warnings(projector_type: str, model) -> list[str]:
    projector = next((module for name, module in model.named_modules() if name.endswith(PROJECTOR)), None)
    if projector is None:
        return [f"--mm_projector_type {projector_type}: the model has no {PROJECTOR} module to check"]
    linears = sum(isinstance(module, torch.nn.Linear) for module in projector.modules())
    activation = getattr(model.config, "projector_hidden_act", None)
    mlp = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    if projector_type == "linear":
        expected, wanted_activation = 1, None
    elif mlp:
        expected, wanted_activation = int(mlp.group(1)), "gelu"
    else:
        return [f"--mm_projector_type {projector_type}: unknown type (linear or mlpNx_gelu); not checked"]
    if linears != expected or (wanted_activation and activation != wanted_activation):
        return [
            f"--mm_projector_type {projector_type} disagrees with the model: its projector has {linears} linear "
            f"layer(s) and activation {activation!r}; the model's projector is trained"
        ]
    return []


def _template_warnings(version: str, processor) -> list[str]:
    templates = _known_templates()
    current = (getattr(processor, "chat_template", None) or "").strip()
    in_use = next((name for name, text in templates.items() if text == current), "a custom template")
    wanted = VERSION_TEMPLATES.get(version)
    if wanted is None:
        return [f"--version {version}: unknown conversation template; prompts use the processor's ({in_use})"]
    if wanted != in_use:
        return [
            f"--version {version} asks for the {wanted} conversation format but the processor's chat template is "
            f"{in_use}; training renders prompts with the processor's template, the one inference uses"
        ]
    return []


# -- the trainer ------------------------------------------------------------------------------------------------


class MMedRAGDPOTrainer(DPOTrainer):
    """trl's DPOTrainer with RAG-PT's collator, a projector learning rate and adapter-only saves.

    - the collator (:class:`~mmed_rag.alignment.collator.RAGPreferenceCollator`) scores each side of a pair on its
      own image; its columns are kept through ``remove_unused_columns``;
    - ``create_optimizer`` puts the projector's parameters in their own group at ``mm_projector_lr``, after the
      LoRA group, so the logged ``learning_rate`` is the LoRA one (like LLaVA's trainer);
    - a loaded adapter (stage 2) gets trl's frozen ``"ref"`` copy as reference only with
      ``stage2_reference="stage1"``; by default it is removed and the reference is the adapter disabled;
    - the fused log-prob head projects the answer tokens only on every eager device, CPU included
      (:mod:`~mmed_rag.alignment.answer_logprobs`);
    - saves write the trained ``"default"`` adapter only (trl's ``"ref"`` copy breaks ZeRO-3 saves otherwise).
    """

    def __init__(
        self,
        model,
        ref_model=None,
        args: MMedRAGDPOConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        **kwargs: Any,
    ) -> None:
        from transformers import ProcessorMixin

        from mmed_rag.alignment.collator import RAGPreferenceCollator

        if not isinstance(processing_class, ProcessorMixin):
            raise DPOError("MMedRAGDPOTrainer needs the model's processor (tokenizer + image processor)")
        args = args if args is not None else MMedRAGDPOConfig()
        if data_collator is None:
            data_collator = RAGPreferenceCollator(
                processor=processing_class,
                max_length=args.max_length,
                noise_seed=args.seed,
                chosen_noised_mode=getattr(args, "chosen_noised_mode", "chosen"),
            )
        super().__init__(
            model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        self._score_answer_tokens_only()
        if "ref" in getattr(self.model, "peft_config", {}):
            if getattr(self.args, "stage2_reference", "base") == "base":
                self.model.delete_adapter("ref")
                self.model.set_adapter("default")
                logger.info("Reference model: the base model (adapter disabled), as the original stage 2.")
            else:
                logger.info("Reference model: the frozen copy of the loaded (stage-1) adapter.")

    def _score_answer_tokens_only(self) -> None:
        from peft import PeftModel

        from mmed_rag.alignment.answer_logprobs import DPO_OUTPUTS, score_answer_tokens_only

        policy = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        score_answer_tokens_only(policy, DPO_OUTPUTS + (("log_sum_sq_probs",) if self.use_weighting else ()))
        if self.ref_model is not None:
            score_answer_tokens_only(self.ref_model, ("log_probs",))

    def _set_signature_columns_if_needed(self) -> None:
        from mmed_rag.alignment.dataset import PAIR_COLUMNS

        super()._set_signature_columns_if_needed()
        self._signature_columns += [column for column in PAIR_COLUMNS if column not in self._signature_columns]

    def create_optimizer(self, model=None):
        projector_lr = getattr(self.args, "mm_projector_lr", None)
        if self.optimizer is not None or projector_lr is None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        trainable = [(name, param) for name, param in opt_model.named_parameters() if param.requires_grad]
        groups = []
        for is_projector in (False, True):  # LoRA first: Trainer logs param_groups[0]'s lr
            for decays in (True, False):
                params = [p for n, p in trainable if (PROJECTOR in n) == is_projector and (n in decay) == decays]
                if params:
                    group = {"params": params, "weight_decay": self.args.weight_decay if decays else 0.0}
                    if is_projector:
                        group["lr"] = projector_lr
                    groups.append(group)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        from peft import PeftModel
        from transformers.trainer import TRAINING_ARGS_NAME

        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not isinstance(model, PeftModel):
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return None
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir, state_dict=state_dict, selected_adapters=["default"])
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None


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


def is_complete(stage_dir: Path) -> bool:
    return (stage_dir / STAGE_MARKER).is_file() and (stage_dir / ADAPTER_WEIGHTS).is_file()


def plan_stages(config: MMedRAGDPOConfig) -> list[StagePlan]:
    """Which stages run on which data, continuing which adapter; every missing input is an error here."""
    for name in ("model_name_or_path", "image_folder", "output_dir"):
        if not getattr(config, name):
            raise DPOError(f"--{name} is required")
    if not Path(config.image_folder).is_dir():
        raise DPOError(f"--image_folder {config.image_folder} is not a directory")
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
    }


def _check_identity(saved: dict[str, Any], wanted: dict[str, Any], where: Path) -> None:
    changed = [f"{key}: {saved.get(key)!r} -> {value!r}" for key, value in wanted.items() if saved.get(key) != value]
    if changed:
        raise StageMismatchError(
            f"{where} was made with other inputs or settings, so it is not reused: {'; '.join(changed)}. "
            f"Use another --output_dir, or delete {where} to redo it."
        )


def _stage_args(config: MMedRAGDPOConfig, plan: StagePlan, output_dir: Path) -> MMedRAGDPOConfig:
    return dataclasses.replace(
        config,
        output_dir=str(plan.checkpoints(output_dir)),
        learning_rate=plan.learning_rate,
        run_name=f"{output_dir.name}-stage{plan.number}",
    )


def _last_checkpoint(directory: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(directory)) if directory.is_dir() else None


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
    from peft import PeftModel

    from mmed_rag.alignment.dataset import load_preference_pairs

    output_dir = Path(config.output_dir)
    final = plan.directory(output_dir)
    identity = _identity(config, plan, file_sha256(plan.data_path))
    if is_complete(final):
        summary = json.loads((final / STAGE_MARKER).read_text(encoding="utf-8"))
        _check_identity(summary["identity"], identity, final)
        logger.info("Stage %d is finished (%s): skipped.", plan.number, final)
        return summary

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
    resume = _last_checkpoint(checkpoints)
    identity_file = checkpoints / "stage_identity.json"
    if resume is not None and identity_file.is_file():
        _check_identity(json.loads(identity_file.read_text(encoding="utf-8")), identity, checkpoints)

    model = load_base_model(config)
    for message in architecture_warnings(config, model, processor):
        _warn_once(message)
    peft_config = None
    if plan.start_adapter is None:
        peft_config = lora_config(config)
    else:
        model = PeftModel.from_pretrained(model, plan.start_adapter, is_trainable=True)
    trainer = MMedRAGDPOTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=processor,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    _check_trainable(trainer.model)
    plugin = trainer.accelerator.state.deepspeed_plugin
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.model.parameters() if p.requires_grad)
    logger.info(
        "Stage %d: %s trainable parameters, learning rate %g (projector %s), %s on %s.",
        plan.number,
        f"{trainable:,}",
        plan.learning_rate,
        config.mm_projector_lr if config.mm_projector_lr is not None else plan.learning_rate,
        f"DeepSpeed ZeRO-{plugin.zero_stage}" if plugin is not None else "no DeepSpeed",
        args.device,
    )
    if args.should_save:
        checkpoints.mkdir(parents=True, exist_ok=True)
        atomic_write_text(identity_file, json.dumps(identity, indent=2) + "\n")
    if resume:
        logger.info("Stage %d: resuming from %s.", plan.number, resume)
    result = trainer.train(resume_from_checkpoint=resume)

    staging = final.with_name(final.name + ".partial")
    if args.should_save:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))  # every rank: ZeRO-3 gathers the adapter here
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
    if args.should_save:
        log_history = trainer.state.log_history
        atomic_write_text(staging / CONFIG_FILE, args.to_json_string())
        atomic_write_text(staging / LOG_FILE, json.dumps(log_history, indent=1) + "\n")
        if config.plot:
            plot_curves(log_history, staging / CURVES_FILE, f"RAG-PT stage {plan.number}: {plan.data_path.name}")
        atomic_write_text(staging / STAGE_MARKER, json.dumps(summary, indent=2) + "\n")
        publish_directory(staging, final)
        logger.info("Stage %d done: adapter in %s (%d steps).", plan.number, final, trainer.state.global_step)
    trainer.accelerator.wait_for_everyone()
    del trainer, model
    gc.collect()
    return summary


def train_dpo_2stages(config: MMedRAGDPOConfig, callbacks: list | None = None) -> dict[str, Any]:
    """Run the stages ``config`` asks for (stage 1, then stage 2 on the same adapter); rerunning resumes.

    Returns ``{"stage1": dir, "stage2": dir, "merged": dir, "metrics": {stage: stage.json content}}`` with the
    entries of the stages that exist. ``callbacks`` are passed to every stage's trainer.
    """
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
        if _is_main_process():
            _release_zero3()
            merge_lora(config.model_name_or_path, final_adapter, result["merged"])
    return result


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


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


def parse_dpo_args(argv: list[str] | None = None) -> MMedRAGDPOConfig:
    """The config of a command line: the original ``train_dpo_2stages.py`` flags, ours, and ``--config FILE.yaml``.

    YAML values are defaults that command-line flags override. ``--local_rank N`` (appended by the deepspeed
    launcher) is accepted; unknown options are errors.
    """
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
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


def main(argv: list[str] | None = None) -> int:
    """``train/dpo/train_dpo_2stages.py``: parse, train, report; errors in the input end with exit status 2."""
    from mmed_rag.alignment.dataset import PairSetError
    from mmed_rag.data.images import ImageLoadError
    from mmed_rag.data.records import RecordError

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("mmed_rag").setLevel(logging.INFO)
    try:
        config = parse_dpo_args(argv)
        result = train_dpo_2stages(config)
    except (ConfigError, DPOError, RecordError, PairSetError, ImageLoadError) as error:
        logger.error("%s", error)
        return 2
    for name in ("stage1", "stage2", "merged"):
        if name in result:
            logger.info("%s: %s", name, result[name])
    return 0
