"""One factory for the CLIP retrievers: an open_clip name, a local copy of a hub model, or a saved retriever.

MMed-RAG retrieves with one open_clip model per modality (RN50-style ``hf-hub:thaottn/OpenCLIP-resnet50-CC12M``
by default), fine-tuned on image-report pairs. Two traps of the original are closed here:

- open_clip ignores ``pretrained=`` when the name is ``hf-hub:...``, so the original silently retrieved with the
  un-tuned model. Here a ``checkpoint`` is always loaded, explicitly, and any missing or unexpected key is an
  error, never a partially initialised model.
- open_clip downloads whatever it cannot find. Here nothing is ever downloaded: ``hf-hub:`` names are looked up
  in the local Hugging Face cache only, and a model that is not on disk is an error that says what to pass.

A retriever saved by :func:`save_clip` is a directory in the layout open_clip uses on the hub
(``open_clip_config.json`` + ``open_clip_model.safetensors``) plus a ``manifest.json`` that says what it is.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import pickle
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import open_clip
import torch
from huggingface_hub import try_to_load_from_cache
from open_clip.transform import PreprocessCfg, image_transform_v2
from safetensors.torch import load_file, save_file

from mmed_rag.atomic import atomic_path, atomic_write_text
from mmed_rag.errors import MMedRAGError, relative_base

logger = logging.getLogger(__name__)

HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
MANIFEST_FILE = "manifest.json"
# Weight files of an open_clip model directory, preferred first. Generic names such as pytorch_model.bin are left
# out on purpose: in hub repos that also host a transformers CLIPModel they hold that model, not the open_clip one.
_WEIGHT_FILES = (
    WEIGHTS_FILE,
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)
_MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"


class ClipNotFoundError(MMedRAGError, FileNotFoundError):
    """The model, its local copy, or its weights are not on this machine."""


class ClipCheckpointError(MMedRAGError, ValueError):
    """A weights file cannot be read safely, or does not fit the model's architecture."""


@dataclass(frozen=True)
class ClipSource:
    """Where a CLIP's architecture and weights come from, resolved without touching the network."""

    open_clip_name: str  # what open_clip's own factory is given: a registered config name or "local-dir:<path>"
    model_cfg: dict  # the architecture, in open_clip's model_configs format
    weights: Path | None  # the weights found beside a local copy's config; None for a bare architecture name


@functools.cache
def register_model_configs() -> None:
    """Make the package's model configs (``tiny-clip``, ``tiny-clip-rn``, ...) known to open_clip, once."""
    open_clip.add_model_config(_MODEL_CONFIG_DIR)


def resolve_clip(model: str, cache_dir: str | os.PathLike | None = None) -> ClipSource:
    """Find ``model`` on this machine: a directory, an ``hf-hub:`` name in the local HF cache, or a config name.

    ``cache_dir`` is the Hugging Face cache to look in (default: the standard one, ``HF_HUB_CACHE``).
    """
    path = Path(model.removeprefix(LOCAL_DIR_PREFIX))
    if path.is_dir():
        return _source_from_directory(path)
    if model.startswith(HF_HUB_PREFIX):
        repo_id = model.removeprefix(HF_HUB_PREFIX)
        cached_config = try_to_load_from_cache(repo_id, CONFIG_FILE, cache_dir=cache_dir)
        if not isinstance(cached_config, str):
            raise ClipNotFoundError(
                f"{model} is not in the local Hugging Face cache, and mmed-rag never downloads models. Download "
                f"it on a machine with network access (e.g. `hf download {repo_id}`), copy the directory here and "
                f"pass its path instead of the hf-hub name; or, to load a fine-tuned checkpoint, pass the name of "
                f"its open_clip architecture (e.g. 'RN50') together with checkpoint=."
            )
        return _source_from_directory(Path(cached_config).parent)
    if model.startswith(LOCAL_DIR_PREFIX):
        raise ClipNotFoundError(f"{model}: no such directory.")
    register_model_configs()
    model_cfg = open_clip.get_model_config(model)
    if model_cfg is None:
        raise ClipNotFoundError(
            f"Unknown CLIP model {model!r}: not a directory{relative_base(model)}, not an hf-hub: name, and not an "
            "open_clip model config (see open_clip.list_models())."
        )
    return ClipSource(open_clip_name=model, model_cfg=model_cfg, weights=None)


def _source_from_directory(directory: Path) -> ClipSource:
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise ClipNotFoundError(f"{directory} is not an open_clip model directory: it has no {CONFIG_FILE}.")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if "model_cfg" not in config:
        raise ClipCheckpointError(f"{config_path} has no 'model_cfg' entry, so the architecture is unknown.")
    weights = next((directory / f for f in _WEIGHT_FILES if (directory / f).is_file()), None)
    return ClipSource(open_clip_name=f"{LOCAL_DIR_PREFIX}{directory}", model_cfg=config["model_cfg"], weights=weights)


def create_clip(
    model: str,
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    cache_dir: str | os.PathLike | None = None,
):
    """Create a CLIP retriever; returns ``(model, preprocess_train, preprocess_val, tokenizer)``.

    ``model`` is one of
    - an open_clip config name (``"RN50"``, ``"ViT-B-32"``, ``"tiny-clip"``): random weights unless
      ``checkpoint`` is given;
    - ``"hf-hub:org/name"``: config and weights from the local Hugging Face cache (``cache_dir``), never the
      network;
    - a directory with ``open_clip_config.json`` and weights: a local copy of a hub model, or one written by
      :func:`save_clip`.

    ``checkpoint`` (a ``.safetensors``, ``.pt`` or ``.bin`` file, e.g. an open_clip training checkpoint with a
    ``state_dict`` entry and DDP ``module.`` prefixes) replaces the weights that come with ``model``. The model is
    returned in eval mode, ready to embed; call ``.train()`` to fine-tune it.
    """
    source = resolve_clip(model, cache_dir=cache_dir)
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise ClipNotFoundError(f"Checkpoint {checkpoint} does not exist.")
    weights = Path(checkpoint) if checkpoint is not None else source.weights
    if weights is None and source.open_clip_name.startswith(LOCAL_DIR_PREFIX):
        raise ClipNotFoundError(
            f"{model}: the directory has a config but no weights (looked for {', '.join(_WEIGHT_FILES)}); "
            f"pass checkpoint= to load weights from elsewhere."
        )
    # load_weights=False and pretrained_text=False: open_clip builds the architecture only and fetches nothing;
    # the weights are loaded below, strictly.
    with _quiet_random_init_warning(enabled=weights is not None):
        clip = open_clip.create_model(
            source.open_clip_name, load_weights=False, pretrained_text=False, precision=precision, device=device
        )
    if weights is None:
        logger.info("Created %s with random weights (no checkpoint given).", model)
    else:
        load_clip_weights(clip, weights)
    preprocess_cfg = PreprocessCfg(**clip.visual.preprocess_cfg)
    preprocess_train = image_transform_v2(preprocess_cfg, is_train=True)
    preprocess_val = image_transform_v2(preprocess_cfg, is_train=False)
    tokenizer = open_clip.get_tokenizer(source.open_clip_name)
    return clip.eval(), preprocess_train, preprocess_val, tokenizer


@contextlib.contextmanager
def _quiet_random_init_warning(enabled: bool):
    """Drop open_clip's "Model initialized randomly" warning when weights are loaded right after.

    A user loading a fine-tuned retriever must not be told it is random: that is the very failure this module
    exists to prevent, and a false alarm teaches people to ignore the real one.
    """

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")

    root = logging.getLogger()  # open_clip logs through the root logger
    if enabled:
        root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def read_clip_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read CLIP weights safely: safetensors, or ``torch.load(weights_only=True)`` for ``.pt``/``.bin``/``.pth``.

    Unwraps open_clip training checkpoints (``{"epoch": ..., "state_dict": ...}``) and strips the ``module.``
    prefix that DistributedDataParallel adds to every key.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            state = load_file(path)
        except Exception as error:  # safetensors raises its own SafetensorError (and OSError)
            raise ClipCheckpointError(f"{path} is not a readable safetensors file: {error}") from None
    else:
        if path.is_file() and not zipfile.is_zipfile(path):
            with open(path, "rb") as handle:  # torch.save writes a zip; older files are pickles (protocol 2+: 0x80)
                if handle.read(1) != b"\x80":
                    raise ClipCheckpointError(
                        f"{path} is not a PyTorch checkpoint (neither torch.save's zip nor a pickle)"
                    )
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            if "Weights only load failed" not in str(error):
                raise ClipCheckpointError(f"{path} is not a PyTorch checkpoint: {error}") from None
            raise ClipCheckpointError(
                f"{path} holds more than tensors and plain data, so it is not loaded (weights_only=True): "
                f"re-save its state dict as safetensors. ({error})"
            ) from error
        except Exception as error:  # torch.load fails on random bytes with IndexError, EOFError, RuntimeError, ...
            raise ClipCheckpointError(f"{path} is not a PyTorch checkpoint ({type(error).__name__}: {error})") from None
        state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ClipCheckpointError(f"{path} is not a CLIP state dict (a mapping of names to tensors).")
    if state and all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return state


def load_clip_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load the weights at ``path`` into ``model``, all of them and nothing else, or raise."""
    state = read_clip_state_dict(path)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches raise even when strict=False
        raise ClipCheckpointError(f"{path} does not fit the model's architecture: {error}") from error
    if result.missing_keys or result.unexpected_keys:
        raise ClipCheckpointError(
            f"{path} does not fit the model's architecture: missing keys {result.missing_keys}, "
            f"unexpected keys {result.unexpected_keys}. Is it a checkpoint of a different model?"
        )
    logger.info("Loaded CLIP weights from %s (%d tensors).", path, len(state))


def save_clip(
    model: torch.nn.Module,
    directory: str | os.PathLike,
    model_name: str,
    extra_manifest: dict | None = None,
) -> Path:
    """Save a CLIP retriever so that :func:`load_clip` re-creates it exactly, offline.

    ``model_name`` is the name ``model`` was created from (its architecture is taken from there). Writes
    ``open_clip_model.safetensors``, ``open_clip_config.json`` (``{"model_cfg", "preprocess_cfg"}``, open_clip's
    hub format) and, last, ``manifest.json``: name, embedding size, image size, context length, library versions
    and ``extra_manifest`` (e.g. the training data and epochs). Each file is written atomically.
    """
    directory = Path(directory)
    source = resolve_clip(model_name)
    if source.model_cfg.get("text_cfg", {}).get("hf_tokenizer_name"):
        raise ValueError(f"{model_name} uses a Hugging Face text tokenizer; saving its files is not supported.")
    manifest = {
        "model_name": _base_model_name(model_name),
        "embed_dim": source.model_cfg["embed_dim"],
        "image_size": _height_width(model.visual.preprocess_cfg["size"]),
        "context_length": model.context_length,
        "versions": {name: _version(name) for name in ("torch", "open_clip_torch", "mmed-rag")},
    }
    overlap = manifest.keys() & (extra_manifest or {}).keys()
    if overlap:
        raise ValueError(f"extra_manifest must not redefine {sorted(overlap)}.")
    manifest.update(extra_manifest or {})

    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(state, tmp)
    config = {"model_cfg": source.model_cfg, "preprocess_cfg": model.visual.preprocess_cfg}
    atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    atomic_write_text(directory / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    logger.info("Saved CLIP %s to %s", manifest["model_name"], directory)
    return directory


def load_clip(directory: str | os.PathLike, device: str | torch.device = "cpu", precision: str = "fp32"):
    """Load a retriever written by :func:`save_clip`; returns what :func:`create_clip` returns."""
    return create_clip(str(directory), device=device, precision=precision)


def _base_model_name(model_name: str) -> str:
    """A retriever saved from a saved retriever keeps the original name, not a local path."""
    manifest = Path(model_name.removeprefix(LOCAL_DIR_PREFIX)) / MANIFEST_FILE
    if manifest.is_file():
        return json.loads(manifest.read_text(encoding="utf-8"))["model_name"]
    return model_name


def _height_width(size: int | tuple[int, int]) -> list[int]:
    """open_clip gives a ViT's image size as (height, width), a ResNet's as one int; the manifest gives both."""
    return [size, size] if isinstance(size, int) else list(size)


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"
