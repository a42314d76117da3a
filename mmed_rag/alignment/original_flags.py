"""The original command line's LLaVA-architecture flags, checked against the loaded model and processor.

The original ``train_dpo_2stages.py`` builds its LLaVA from flags (``--vision_tower``, ``--mm_projector_type``,
``--version`` ...); here the model directory defines the architecture, so a flag that disagrees with it is reported
instead of silently ignored.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from mmed_rag.alignment.dpo_config import PROJECTOR, MMedRAGDPOConfig


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
