"""``mmed-rag convert-llava-med``: an original LLaVA-Med-1.5 checkpoint as a transformers LLaVA model.

LLaVA-Med-1.5 (``llava-med-v1.5-mistral-7b``) is published in the layout of the LLaVA code base: ``config.json``
with ``model_type: llava_mistral`` and ``mm_*`` fields, weights named after LLaVA's own modules, and a Mistral
tokenizer without an image token (the original splices image features in at the id -200). This module turns such a
directory into one that ``AutoModelForImageTextToText`` and ``AutoProcessor`` load without ``trust_remote_code``
and that computes the same logits.

Weights (every name is checked against a live ``LlavaForConditionalGeneration(config).state_dict()``; a name that
maps nowhere, or a parameter that nothing fills, is an error listing them)::

    model.embed_tokens.* / model.layers.* / model.norm.*   ->  model.language_model.*
    lm_head.*                                              ->  lm_head.*
    model.mm_projector.0.*  (mlp2x_gelu: Linear)           ->  model.multi_modal_projector.linear_1.*
    model.mm_projector.2.*  (GELU in between, no weights)  ->  model.multi_modal_projector.linear_2.*
    model.vision_tower.vision_tower.vision_model.*         ->  model.vision_tower.*
    ...rotary_emb.inv_freq, ...embeddings.position_ids     ->  dropped (buffers the model recomputes)

The CLIP vision tower comes from the source when it was saved inside it, otherwise from ``--vision-tower DIR`` (a
transformers ``CLIPVisionModel`` or ``CLIPModel`` directory; only its ``vision_model`` weights are used). Nothing is
downloaded. The tower's architecture and preprocessing come from that directory (its ``config.json`` alone is
enough when the weights are in the source), or, when none is given, from the built-in preset for the tower the
source names in ``mm_vision_tower`` (``openai/clip-vit-large-patch14-336``); shapes are checked either way.

Tokenizer: ``<image>`` is added as a special token (id = the old vocabulary size), the embedding and output
matrices grow to the next multiple of 64 rows, and the new rows are the mean of the old ones (the old transformers
conversion script sampled them from a normal distribution of that mean with 1e-5 of the covariance; the mean
itself is the deterministic version of that). The ``<image>`` embedding is never read (image features replace it);
a new ``lm_head`` row gives a logit equal to the mean of the original logits, so padding ids are never favoured.

Preprocessing: ``image_aspect_ratio: pad`` is LLaVA's ``expand2square`` (paste the image centred on a square of
colour ``tuple(int(x * 255) for x in image_mean)``) before CLIP's resize, centre crop and normalisation, on
images opened with ``.convert("RGB")`` as MMed-RAG's code does. (microsoft/LLaVA-Med's own ``mm_utils`` differs:
it shifts the pasted image by a random 0 or 1 pixel and pads grayscale images with one grey level; MMed-RAG's
copy of LLaVA does neither, and that is what is reproduced.)
transformers' own ``LlavaImageProcessor`` does exactly that with ``do_pad=True``, so the converted processor is a
plain ``LlavaProcessor`` with a ``LlavaImageProcessor(do_pad=True)``: it loads with ``AutoProcessor`` and needs
no code of ours. Load it with ``backend="pil"`` to get the original's pixels exactly (PIL resize, as the CLIP
processor of the original); the default torchvision backend resizes differently by up to one grey level.

Output directory (published by renaming a finished temporary directory beside it)::

    config.json, generation_config.json, model*.safetensors   LlavaForConditionalGeneration.save_pretrained, in the
                                                              llava-hf layout vLLM serves (served_layout)
    tokenizer.json, tokenizer_config.json, processor_config.json, chat_template.jinja   LlavaProcessor.save_pretrained
    conversion_report.json   what was converted, key counts, vocabulary sizes, the ConvertConfig
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import shutil
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import (
    AddedToken,
    AutoTokenizer,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessor,
    LlavaProcessor,
    PreTrainedConfig,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from mmed_rag.atomic import atomic_write_text
from mmed_rag.chat_templates import load_chat_template
from mmed_rag.config import config_to_dict
from mmed_rag.errors import MMedRAGError
from mmed_rag.generation.configs import DTYPE_NAMES, ConvertConfig
from mmed_rag.generation.served_layout import save_for_serving
from mmed_rag.outputs import claim_outputs

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
REPORT_FILE = "conversion_report.json"
IMAGE_TOKEN = "<image>"
#: Embedding rows are padded to a multiple of this (tensor-core friendly, as the transformers conversions do).
PAD_VOCAB_TO = 64

#: LLaVA's model types and the transformers text model inside them.
TEXT_MODEL_TYPES = {"llava_mistral": "mistral", "llava_llama": "llama"}

#: Original name prefix -> transformers 5.x name prefix; the first matching rule wins.
KEY_RULES: tuple[tuple[str, str], ...] = (
    ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower."),
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.", "model.language_model."),
    ("lm_head.", "lm_head."),
)
#: Buffers that older checkpoints saved and transformers now recomputes at load time.
RECOMPUTED_BUFFERS = ("rotary_emb.inv_freq", "embeddings.position_ids")
VISION_PREFIX = "model.vision_tower."
PROJECTOR_PREFIX = "model.multi_modal_projector."
EMBED_KEY = "model.language_model.embed_tokens.weight"
HEAD_KEY = "lm_head.weight"
#: LLaVA's mm_vision_select_feature -> transformers' vision_feature_select_strategy.
SELECT_STRATEGIES = {"patch": "default", "cls_patch": "full"}

#: The vision towers LLaVA-Med names in ``mm_vision_tower``, so a source that carries its tower's weights converts
#: without ``--vision-tower``. Shapes are checked against the weights, so a wrong preset fails loudly.
VISION_TOWER_PRESETS: dict[str, dict[str, dict]] = {
    "openai/clip-vit-large-patch14-336": {
        "vision_config": {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "image_size": 336,
            "patch_size": 14,
            "projection_dim": 768,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
        },
        "image_processor": {
            "size": {"shortest_edge": 336},
            "crop_size": {"height": 336, "width": 336},
            "image_mean": list(OPENAI_CLIP_MEAN),
            "image_std": list(OPENAI_CLIP_STD),
            "resample": int(PILImageResampling.BICUBIC),
        },
    },
}
#: Settings of a CLIP ``preprocessor_config.json`` that carry over to the converted image processor.
IMAGE_PROCESSOR_KEYS = (
    "do_resize",
    "size",
    "resample",
    "do_center_crop",
    "crop_size",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_convert_rgb",
)
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


class ConversionError(MMedRAGError, ValueError):
    """The source cannot be converted as asked: a file, a weight or a setting is missing or unsupported."""


# -- reading the original checkpoint ----------------------------------------------------------------------------


def read_llava_config(src: Path) -> dict[str, Any]:
    """``SRC/config.json``, checked for the settings this conversion reproduces."""
    path = src / "config.json"
    if not path.is_file():
        raise ConversionError(f"{src} has no config.json; is it an original LLaVA-Med checkpoint directory?")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path} is not valid JSON: {error}") from None
    model_type = config.get("model_type")
    if model_type not in TEXT_MODEL_TYPES:
        hint = " (it is already in transformers' format)" if model_type == "llava" and "text_config" in config else ""
        raise ConversionError(
            f"{path}: model_type {model_type!r} is not an original LLaVA model type "
            f"({', '.join(TEXT_MODEL_TYPES)}){hint}."
        )
    if "mm_vision_tower" not in config and "mm_hidden_size" not in config:
        raise ConversionError(f"{path} has no mm_vision_tower / mm_hidden_size: it is not a multimodal LLaVA model.")
    unsupported = {
        "mm_projector_type": (config.get("mm_projector_type", "linear"), {"mlp2x_gelu"}),
        "mm_vision_select_feature": (config.get("mm_vision_select_feature", "patch"), {"patch", "cls_patch"}),
        "mm_use_im_start_end": (config.get("mm_use_im_start_end", False), {False}),
        "mm_patch_merge_type": (config.get("mm_patch_merge_type", "flat"), {"flat"}),
        "image_aspect_ratio": (config.get("image_aspect_ratio", "square"), {"pad", "square", None}),
    }
    for name, (value, supported) in unsupported.items():
        if value not in supported:
            raise ConversionError(
                f"{path}: {name} = {value!r} is not supported; transformers' LLaVA reproduces "
                f"{' or '.join(map(repr, sorted(supported, key=str)))}."
            )
    return config


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory: the shards of an index, or a single file."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ConversionError(f"{index} is not a weight index (no 'weight_map'): {error}") from None
            files = [directory / name for name in sorted(set(weight_map.values()))]
            absent = [str(path) for path in files if not path.is_file()]
            if absent:
                raise ConversionError(f"{index} lists shard(s) that are not there: {', '.join(absent)}")
            return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return [directory / name]
    raise ConversionError(
        f"{directory} has no weights: expected model.safetensors, pytorch_model.bin, or a *.index.json with shards."
    )


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read one weight file safely: safetensors, or ``torch.load(weights_only=True)`` for ``.bin``."""
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except Exception as error:  # safetensors raises its own SafetensorError (and OSError)
            raise ConversionError(f"{path} is not a readable safetensors file: {error}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ConversionError(
            f"{path} holds more than tensors, so it is not loaded (weights_only=True): {error}"
        ) from None
    except (RuntimeError, KeyError, EOFError, ValueError) as error:
        raise ConversionError(f"{path} is not a PyTorch checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ConversionError(f"{path} is not a state dict (a mapping of names to tensors).")
    return state


def read_checkpoint(directory: Path) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """All tensors of a checkpoint directory, with the files they came from."""
    files = weight_files(directory)
    state: dict[str, torch.Tensor] = {}
    for path in files:
        tensors = read_tensors(path)
        duplicated = sorted(set(tensors) & set(state))
        if duplicated:
            raise ConversionError(f"{path} repeats tensors of an earlier shard: {', '.join(duplicated[:10])}")
        state.update(tensors)
    return state, files


def rename_original_key(name: str) -> str | None:
    """The transformers name of an original LLaVA weight, or None when no rule applies."""
    for old, new in KEY_RULES:
        if name.startswith(old):
            return new + name.removeprefix(old)
    return None


# -- the pieces of the converted model ----------------------------------------------------------------------------


def text_config_from(llava_config: dict[str, Any]) -> PreTrainedConfig:
    """The Mistral (or Llama) config inside an original LLaVA config: its own fields, without LLaVA's extras."""
    config_class = CONFIG_MAPPING[TEXT_MODEL_TYPES[llava_config["model_type"]]]
    known = set(config_class.__dataclass_fields__) | {"rope_theta", "rope_scaling"}
    # use_cache: false is a training setting of the original; architectures and dtype describe the LLaVA wrapper.
    skipped = {"architectures", "dtype", "torch_dtype", "use_cache", "transformers_version", "model_type"}
    return config_class.from_dict({key: value for key, value in llava_config.items() if key in known - skipped})


@dataclass(frozen=True)
class VisionSetup:
    """Architecture, preprocessing and weights (possibly none) of the vision tower, and where each came from."""

    config: CLIPVisionConfig
    image_processor: dict[str, Any]
    origin: str
    weights: dict[str, torch.Tensor]
    weight_files: tuple[str, ...] = ()


def vision_setup(llava_config: dict[str, Any], vision_tower: Path | None, need_weights: bool) -> VisionSetup:
    """Config, preprocessing and (when ``need_weights``) weights of the vision tower.

    From the ``vision_tower`` directory when given, else from the preset named by ``mm_vision_tower``.
    """
    name = llava_config.get("mm_vision_tower")
    if vision_tower is None:
        if need_weights:
            raise ConversionError(
                f"The source has no vision tower weights (model.vision_tower.vision_tower.vision_model.*): pass "
                f"--vision-tower DIR, a local copy of its vision tower ({name or 'a CLIP ViT'}) saved by "
                f"transformers (CLIPVisionModel or CLIPModel). Nothing is downloaded."
            )
        if name not in VISION_TOWER_PRESETS:
            raise ConversionError(
                f"The source names its vision tower {name!r}, whose architecture is not built in "
                f"({', '.join(VISION_TOWER_PRESETS)} are): pass --vision-tower DIR, a local copy of it saved by "
                f"transformers (its config.json is enough when the weights are in the source)."
            )
        preset = VISION_TOWER_PRESETS[name]
        return VisionSetup(
            CLIPVisionConfig(**preset["vision_config"]), dict(preset["image_processor"]), f"preset:{name}", {}
        )
    if not (vision_tower / "config.json").is_file():
        raise ConversionError(f"--vision-tower {vision_tower} has no config.json; pass a transformers CLIP directory.")
    try:
        config = CLIPVisionConfig.from_pretrained(vision_tower)
    except (OSError, ValueError, TypeError) as error:
        raise ConversionError(f"--vision-tower {vision_tower}: not a CLIP config ({error}).") from None
    processor_path = vision_tower / "preprocessor_config.json"
    if processor_path.is_file():
        saved = json.loads(processor_path.read_text(encoding="utf-8"))
        image_processor = {key: saved[key] for key in IMAGE_PROCESSOR_KEYS if key in saved}
    else:
        logger.warning(
            "%s has no preprocessor_config.json; using CLIP's defaults at %d px.", vision_tower, config.image_size
        )
        image_processor = {
            "size": {"shortest_edge": config.image_size},
            "crop_size": {"height": config.image_size, "width": config.image_size},
            "image_mean": list(OPENAI_CLIP_MEAN),
            "image_std": list(OPENAI_CLIP_STD),
            "resample": int(PILImageResampling.BICUBIC),
        }
    if not need_weights:
        return VisionSetup(config, image_processor, str(vision_tower), {})
    weights, files = read_clip_vision_tower(vision_tower)
    return VisionSetup(config, image_processor, str(vision_tower), weights, tuple(str(path) for path in files))


def read_clip_vision_tower(directory: Path) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """The vision weights of a transformers CLIP directory, under their names in ``LlavaForConditionalGeneration``."""
    state, files = read_checkpoint(directory)
    # CLIPModel (and transformers 4.x CLIPVisionModel) files prefix the tower with "vision_model."; a 5.x
    # CLIPVisionModel saves it without. The text tower and projections of a CLIPModel are not LLaVA's.
    if any(key.startswith("vision_model.") for key in state):
        state = {
            key.removeprefix("vision_model."): value for key, value in state.items() if key.startswith("vision_model.")
        }
    return {VISION_PREFIX + key: value for key, value in state.items()}, files


def pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` with rows appended up to ``rows``, each the mean of the original rows (computed in float32)."""
    extra = rows - weight.shape[0]
    if extra <= 0:
        return weight
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(extra, -1)], dim=0)


def build_processor(
    tokenizer, vision: VisionSetup, image_aspect_ratio: str | None, select_strategy: str, chat_template: str
) -> LlavaProcessor:
    """``LlavaProcessor``: CLIP preprocessing (padded to square for ``pad``) and one ``<image>`` per feature."""
    image_processor = LlavaImageProcessor(**vision.image_processor, do_pad=image_aspect_ratio == "pad")
    template = load_chat_template(chat_template)
    tokenizer.chat_template = template
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.config.patch_size,
        vision_feature_select_strategy=select_strategy,
        # The CLIP CLS token, counted here and removed again by the "default" strategy.
        num_additional_image_tokens=1,
        chat_template=template,
    )


# -- the stage ------------------------------------------------------------------------------------------------------


def convert_llava_med(config: ConvertConfig) -> Path:
    """Convert ``config.src`` into a transformers LLaVA directory at ``config.dst``; return ``config.dst``."""
    with claim_outputs("convert-llava-med", replaced=[config.dst], inputs=[config.src, config.vision_tower]):
        return _convert_llava_med(config)


def _convert_llava_med(config: ConvertConfig) -> Path:
    src, dst = Path(config.src), Path(config.dst)
    vision_dir = Path(config.vision_tower) if config.vision_tower else None
    _check_paths(src, dst, vision_dir, config.overwrite)
    llava_config = read_llava_config(src)

    source, source_files = read_checkpoint(src)
    logger.info("Read %d tensors from %d file(s) in %s", len(source), len(source_files), src)
    state, dropped = _rename_source(source, src)
    vision_in_source = any(key.startswith(VISION_PREFIX) for key in state)
    vision = vision_setup(llava_config, vision_dir, need_weights=not vision_in_source)
    if vision_in_source:
        vision_origin = "source"
        if vision_dir is not None and _has_weights(vision_dir):
            _warn_if_towers_differ(state, vision_dir)
    else:
        vision_origin = str(vision_dir)
        dropped += sorted(f"{vision_dir}:{key}" for key in vision.weights if key.endswith(RECOMPUTED_BUFFERS))
        state.update({key: value for key, value in vision.weights.items() if not key.endswith(RECOMPUTED_BUFFERS)})
    mm_hidden_size = llava_config.get("mm_hidden_size", vision.config.hidden_size)
    if mm_hidden_size != vision.config.hidden_size:
        raise ConversionError(
            f"{src}/config.json: mm_hidden_size {mm_hidden_size} differs from the vision tower's hidden_size "
            f"{vision.config.hidden_size} ({vision.origin}); pass the --vision-tower the model was trained with."
        )

    text_config = text_config_from(llava_config)
    tokenizer = _load_tokenizer(src, text_config)
    _tokenize_image_chunks_separately(tokenizer)
    tokenizer_before = len(tokenizer)
    if IMAGE_TOKEN in tokenizer.get_vocab():
        logger.warning("The source tokenizer already has %s; reusing its id.", IMAGE_TOKEN)
    else:
        tokenizer.add_special_tokens(
            {"extra_special_tokens": [AddedToken(IMAGE_TOKEN, special=True, normalized=False)]},
            replace_extra_special_tokens=False,
        )
    if tokenizer.pad_token is None:
        # LLaVA pads with the unknown token when the tokenizer has no pad token of its own.
        tokenizer.pad_token = tokenizer.unk_token
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    rows_before = state[EMBED_KEY].shape[0]
    rows_after = math.ceil(max(rows_before, len(tokenizer)) / PAD_VOCAB_TO) * PAD_VOCAB_TO
    for key in (EMBED_KEY, HEAD_KEY):
        if key in state:
            state[key] = pad_rows(state[key], rows_after)
    dtype = DTYPES[config.dtype] if config.dtype else state[EMBED_KEY].dtype
    state = {key: value.to(dtype) if value.is_floating_point() else value for key, value in state.items()}

    text_config.vocab_size = rows_after
    text_config.pad_token_id = tokenizer.pad_token_id
    model_config = LlavaConfig(
        vision_config=vision.config,
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=(vision.config.image_size // vision.config.patch_size) ** 2,
        projector_hidden_act="gelu",  # the nn.GELU() of mlp2x_gelu: the exact (erf) GELU
        vision_feature_layer=llava_config.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy=SELECT_STRATEGIES[llava_config.get("mm_vision_select_feature", "patch")],
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    model_config.dtype = dtype
    model = _model_from_state_dict(model_config, state, src)
    processor = build_processor(
        tokenizer,
        vision,
        llava_config.get("image_aspect_ratio"),
        model_config.vision_feature_select_strategy,
        config.chat_template,
    )

    report = {
        "format_version": FORMAT_VERSION,
        "source": str(src),
        "source_model_type": llava_config["model_type"],
        "source_files": [path.name for path in source_files],
        "vision_tower": {
            "mm_vision_tower": llava_config.get("mm_vision_tower"),
            "weights": vision_origin,
            "weight_files": [] if vision_in_source else list(vision.weight_files),
            "config": vision.origin,
        },
        "keys": {
            "source": len(source),
            "written": len(state),
            "text": sum(key.startswith(("model.language_model.", "lm_head.")) for key in state),
            "projector": sum(key.startswith(PROJECTOR_PREFIX) for key in state),
            "vision": sum(key.startswith(VISION_PREFIX) for key in state),
            "dropped": dropped,
        },
        "vocab": {
            "tokenizer_before": tokenizer_before,
            "tokenizer_after": len(tokenizer),
            "embedding_rows_before": rows_before,
            "embedding_rows_after": rows_after,
            "new_rows": "mean of the original rows",
            "image_token": IMAGE_TOKEN,
            "image_token_id": image_token_id,
            "pad_token": tokenizer.pad_token,
        },
        "dtype": str(dtype).removeprefix("torch."),
        "preprocessing": {
            "image_aspect_ratio": llava_config.get("image_aspect_ratio"),
            "pad_to_square": processor.image_processor.do_pad,
            "pad_colour": [int(x * 255) for x in processor.image_processor.image_mean],
            "exact_with": 'AutoProcessor.from_pretrained(DST, backend="pil")',
        },
        "chat_template": config.chat_template,
        "config": config_to_dict(config),
        "versions": {package: metadata.version(package) for package in ("torch", "transformers", "safetensors")},
    }
    _publish(dst, config.overwrite, model, processor, report)
    logger.info(
        "Converted %s -> %s: %d tensors (text %d, projector %d, vision %d from %s), %d dropped; vocabulary %d -> %d "
        "rows, %s = %d; %s",
        src,
        dst,
        report["keys"]["written"],
        report["keys"]["text"],
        report["keys"]["projector"],
        report["keys"]["vision"],
        vision_origin,
        len(dropped),
        rows_before,
        rows_after,
        IMAGE_TOKEN,
        image_token_id,
        report["dtype"],
    )
    return dst


def _rename_source(source: dict[str, torch.Tensor], src: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The source's weights under transformers names, and the recomputed buffers left out."""
    dropped = sorted(key for key in source if key.endswith(RECOMPUTED_BUFFERS))
    state, unmapped = {}, []
    for key, tensor in source.items():
        if key in dropped:
            continue
        new_key = rename_original_key(key)
        if new_key is None:
            unmapped.append(key)
        else:
            state[new_key] = tensor
    if unmapped:
        raise ConversionError(f"{src}: weights with no transformers counterpart: {', '.join(sorted(unmapped))}")
    if not any(key.startswith(PROJECTOR_PREFIX) for key in state):
        raise ConversionError(
            f"{src} has no multimodal projector weights (model.mm_projector.0.* and .2.*): it is not a complete "
            f"LLaVA-Med checkpoint (a text-only model, or one whose projector was saved apart as mm_projector.bin)."
        )
    if EMBED_KEY not in state:
        raise ConversionError(f"{src} has no text embeddings (model.embed_tokens.weight).")
    return state, dropped


def _has_weights(directory: Path) -> bool:
    try:
        return bool(weight_files(directory))
    except ConversionError:
        return False


def _check_paths(src: Path, dst: Path, vision_dir: Path | None, overwrite: bool) -> None:
    if not src.is_dir():
        raise ConversionError(f"Source {src} is not a directory.")
    if vision_dir is not None and not vision_dir.is_dir():
        raise ConversionError(f"--vision-tower {vision_dir} is not a directory.")
    resolved = dst.resolve()
    for protected in filter(None, (src, vision_dir)):
        protected = protected.resolve()
        if resolved == protected or resolved in protected.parents or protected in resolved.parents:
            raise ConversionError(f"Destination {dst} overlaps the input {protected}; write it elsewhere.")
    if dst.exists() and not overwrite:
        raise ConversionError(f"Destination {dst} exists; pass --overwrite to replace it.")


def _declared_tokenizer_class(src: Path) -> str | None:
    config = src / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class")
    except json.JSONDecodeError as error:
        raise ConversionError(f"{config} is not valid JSON: {error}") from None


def _load_tokenizer(src: Path, text_config: PreTrainedConfig):
    """The source's tokenizer, as the class its tokenizer_config.json declares.

    The declared class comes first: given the Mistral text config, AutoTokenizer would load a ``LlamaTokenizer``
    shipped as a sentencepiece ``tokenizer.model`` only (LLaVA-Med's) through the generic tokenizers backend, which
    encodes differently (no word-start ``▁`` on the first word: ``▁The`` becomes ``T`` + ``he``). The text config
    tells AutoTokenizer the family only when nothing is declared, and keeps it from reading SRC/config.json, whose
    llava_mistral model type transformers does not know.
    """
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    declared = _declared_tokenizer_class(src)
    tokenizer_class = None
    if declared is not None:
        tokenizer_class = tokenizer_class_from_name(declared) or tokenizer_class_from_name(declared + "Fast")
        if tokenizer_class is None:
            raise ConversionError(
                f"{src}/tokenizer_config.json declares tokenizer_class {declared!r}, which transformers does not "
                f"have (remote tokenizer code is not run)."
            )
    try:
        if tokenizer_class is None:
            return AutoTokenizer.from_pretrained(src, config=text_config)
        return tokenizer_class.from_pretrained(src)
    except (OSError, ValueError, ImportError) as error:
        raise ConversionError(
            f"Cannot load the tokenizer of {src} ({type(error).__name__}: {error}). A tokenizer given only as a "
            f"sentencepiece tokenizer.model needs the sentencepiece and protobuf packages (dependencies of mmed-rag)."
        ) from None


def _tokenize_image_chunks_separately(tokenizer) -> None:
    """Give the text after ``<image>`` the word-start marker, as LLaVA's ``tokenizer_image_token`` did.

    LLaVA tokenises the prompt chunk by chunk between ``<image>`` markers, so each chunk starts like a fresh sequence
    (sentencepiece's ``▁`` prefix). A Metaspace pre-tokenizer does the same with ``prepend_scheme="always"``;
    transformers 5 builds LLaVA-Med's LlamaTokenizer with ``"first"`` (``legacy=False``), which would drop that ``▁``
    and shift every prompt the model was trained on.
    """
    from tokenizers import pre_tokenizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre_tokenizer = backend.pre_tokenizer if backend is not None else None
    if isinstance(pre_tokenizer, pre_tokenizers.Metaspace) and pre_tokenizer.prepend_scheme == "first":
        pre_tokenizer.prepend_scheme = "always"
        backend.pre_tokenizer = pre_tokenizer
        tokenizer.legacy = True  # what transformers rebuilds "always" from
        logger.info("Tokenizer: text after <image> starts a new word, as LLaVA tokenised prompt chunks.")


def _warn_if_towers_differ(renamed: dict[str, torch.Tensor], vision_dir: Path) -> None:
    """The original ignores a tower saved in the checkpoint and loads ``mm_vision_tower``: say if they differ."""
    tower, _files = read_clip_vision_tower(vision_dir)
    differing = [
        key for key, value in tower.items() if key in renamed and not torch.equal(renamed[key].to(value.dtype), value)
    ]
    if differing:
        logger.warning(
            "The vision tower saved in the source differs from %s in %d tensors (e.g. %s); using the source's. "
            "The original LLaVA-Med code loads the tower named by mm_vision_tower instead.",
            vision_dir,
            len(differing),
            differing[0],
        )


def _model_from_state_dict(
    config: LlavaConfig, state: dict[str, torch.Tensor], src: Path
) -> LlavaForConditionalGeneration:
    """A ``LlavaForConditionalGeneration`` holding exactly ``state``: every parameter filled, nothing left over."""
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    unknown = sorted(state.keys() - expected.keys())
    missing = sorted(expected.keys() - state.keys())
    mismatched = sorted(
        f"{key}: {tuple(state[key].shape)} vs {expected[key]}"
        for key in state.keys() & expected.keys()
        if tuple(state[key].shape) != expected[key]
    )
    problems = []
    if unknown:
        problems.append(f"unknown keys (not in LlavaForConditionalGeneration): {', '.join(unknown)}")
    if missing:
        problems.append(f"missing keys (nothing in the source fills them): {', '.join(missing)}")
    if mismatched:
        problems.append(f"shape mismatches (source vs model): {', '.join(mismatched)}")
    if problems:
        raise ConversionError(f"Converting {src} does not give a complete LLaVA model: " + "; ".join(problems))
    # assign=True puts the loaded tensors in place of the meta parameters without a copy; buffers that are not
    # saved (rotary frequencies, position ids) stay on meta and are recomputed by from_pretrained.
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _publish(dst: Path, overwrite: bool, model, processor, report: dict) -> None:
    """Write everything into a temporary directory beside ``dst``, then rename it to ``dst``.

    A reader never sees a half-written model: until the rename, ``dst`` is absent (or still the old one).
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        save_for_serving(model, tmp)
        processor.save_pretrained(tmp)
        atomic_write_text(tmp / REPORT_FILE, json.dumps(report, indent=2) + "\n")
        if dst.exists():
            if not overwrite:
                raise ConversionError(f"Destination {dst} appeared during the conversion; pass --overwrite.")
            old = dst.parent / f".{dst.name}.{uuid.uuid4().hex[:8]}.old"
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
