"""An image classifier: a CLIP image tower and a small head on its embeddings, saved as one directory.

Two classifiers are built on it: the domain classifier (one modality per image, a softmax over them;
:mod:`mmed_rag.domain.classifier`) and DAMON's finding classifier (any number of findings per image, one sigmoid
each; :mod:`mmed_rag.damon.findings`). What they share lives here:

- :class:`StandardisedHead`: the embedding standardised with the training set's mean and spread, then a linear
  layer (default) or a one-hidden-layer MLP. Normalised CLIP embeddings sit in a narrow cone: on the phantoms, a
  linear probe of a random tiny ResNet tower's raw embeddings placed 33-72% of test images, of standardised ones
  all of them;
- :class:`ImageClassifier`: images in (PIL images or paths inside an image root), embeddings and logits out, and
  the directory it is saved as. A directory is self-contained (the tower is saved into it, so it loads offline and
  never follows a path to a retriever that may have been retrained since)::

    config.json        architecture: the labels (in order), head kind, embedding width, hidden width, the
                       classifier's own decision settings, encoder model name, whether the tower was fine-tuned
    head.safetensors   the head's buffers and weights
    encoder/           the CLIP tower (save_clip layout), whose embeddings the head was trained on
    manifest.json      written last: the labels, what the trainer adds (data, metrics), versions, and the sha256
                       of head.safetensors and of the encoder's weights, checked by :meth:`ImageClassifier.load`

  Each kind of classifier says what its labels are called in these files, its format version, and the command
  that trains it (named when a directory is refused).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from mmed_rag.atomic import atomic_path, atomic_write_text
from mmed_rag.data.images import ImageLoadError, open_image, resolve_image_path, to_rgb
from mmed_rag.device import resolve_device
from mmed_rag.errors import MMedRAGError, first_few
from mmed_rag.fingerprint import file_sha256
from mmed_rag.progress import progress_bar
from mmed_rag.retrieval.clip import WEIGHTS_FILE, create_clip, resolve_clip, save_clip
from mmed_rag.retrieval.encode import embedding_dim

logger = logging.getLogger(__name__)

ARCHITECTURE_FILE = "config.json"
HEAD_FILE = "head.safetensors"
ENCODER_DIR = "encoder"
MANIFEST_FILE = "manifest.json"
METRICS_FILE = "metrics.jsonl"

ImageInput = Image.Image | str | os.PathLike


class ClassifierError(MMedRAGError, ValueError):
    """Training data, a config or a classifier directory a classifier cannot use; the message says why."""


class ClassifierNotFoundError(MMedRAGError, FileNotFoundError):
    """No complete classifier directory at the given path."""


class ClassifierMismatchError(ClassifierError):
    """A file of a classifier directory changed after it was saved (e.g. the encoder was retrained)."""


class StandardisedHead(nn.Module):
    """Standardise a tower embedding with training statistics, then a linear layer or a one-hidden-layer MLP."""

    def __init__(self, embed_dim: int, num_classes: int, hidden: int | None = None):
        super().__init__()
        self.register_buffer("mean", torch.zeros(embed_dim))
        self.register_buffer("scale", torch.ones(embed_dim))
        if hidden:
            self.layers = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, num_classes))
        else:
            self.layers = nn.Sequential(nn.Linear(embed_dim, num_classes))

    @property
    def hidden(self) -> int | None:
        return self.layers[0].out_features if len(self.layers) > 1 else None

    def standardise(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.scale

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(self.standardise(features))

    @torch.no_grad()
    def fit_standardisation(self, features: torch.Tensor) -> None:
        self.mean.copy_(features.mean(dim=0))
        self.scale.copy_(features.std(dim=0).clamp_min(1e-6))


class ImageClassifier:
    """A CLIP image tower and a :class:`StandardisedHead`: images in, embeddings and logits out; saved as one
    directory. Subclasses add how logits become predictions, and their own settings in ``config.json``."""

    FORMAT_VERSION = 1
    LABELS_KEY = "labels"  # what the labels are called in config.json and manifest.json
    NAME = "image classifier"  # in messages and the encoder's manifest
    TRAIN_COMMAND = ""  # the command that trains one, named when a directory is refused

    def __init__(
        self,
        encoder: nn.Module,
        preprocess,
        head: StandardisedHead,
        labels: Sequence[str],
        encoder_name: str = "",
        finetuned_tower: bool = False,
    ):
        self.encoder, self.preprocess, self.head = encoder.eval(), preprocess, head.eval()
        self.labels = tuple(labels)
        self.encoder_name = encoder_name
        self.finetuned_tower = finetuned_tower
        # What save_clip reads the architecture from: the name, or for a loaded classifier its own encoder/ (so a
        # classifier of an hf-hub: tower re-saves on a machine that has no copy of the hub model).
        self._encoder_source = encoder_name

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @property
    def hidden(self) -> int | None:
        return self.head.hidden

    def _head_description(self) -> str:
        return f"mlp({self.hidden})" if self.hidden else "linear"

    @torch.no_grad()
    def logits(self, features: np.ndarray) -> torch.Tensor:
        """The head's logits (rows: images, columns: ``labels``) of this tower's embeddings."""
        return self.head(torch.as_tensor(features, dtype=torch.float32, device=self.head.mean.device))

    @torch.no_grad()
    def embedded_batches(
        self, images: Sequence[ImageInput], image_root: str | os.PathLike | None = None, batch_size: int = 64
    ) -> Iterator[np.ndarray]:
        """Normalised tower embeddings of in-memory images and image files (relative to ``image_root`` if given),
        one batch at a time.

        Every file is checked before any is encoded; missing ones raise :class:`ImageLoadError` naming them.
        """
        sources = image_sources(images, image_root)
        device = self.device
        starts = range(0, len(sources), batch_size)
        for start in progress_bar(starts, desc=self.NAME, unit="batch", disable=len(starts) < 2):
            pixels = torch.stack([self.preprocess(_open(source)) for source in sources[start : start + batch_size]])
            with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                features = self.encoder.encode_image(pixels.to(device), normalize=True)
            yield features.float().cpu().numpy()

    def embed(
        self, images: Sequence[ImageInput], image_root: str | os.PathLike | None = None, batch_size: int = 64
    ) -> np.ndarray:
        """All embeddings of :meth:`embedded_batches` in one array (rows: images)."""
        chunks = list(self.embedded_batches(images, image_root, batch_size))
        return np.concatenate(chunks) if chunks else np.zeros((0, embedding_dim(self.encoder)), dtype=np.float32)

    # -- what a kind of classifier adds ---------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """The decision settings saved in ``config.json`` beside the architecture (each kind its own)."""
        return {}

    @classmethod
    def build(cls, encoder, preprocess, head, architecture: dict) -> ImageClassifier:
        """A classifier of this kind from a loaded directory's parts."""
        return cls(encoder, preprocess, head, architecture[cls.LABELS_KEY], architecture["encoder"]["model_name"])

    @classmethod
    def new_head(cls, embed_dim: int, num_classes: int, hidden: int | None, state: dict) -> StandardisedHead:
        """An empty head of this kind, shaped to receive ``state`` (a saved head's tensors)."""
        return StandardisedHead(embed_dim, num_classes, hidden)

    # -- saving and loading --

    def save(self, directory: str | os.PathLike, extra_manifest: dict | None = None) -> Path:
        """Write the classifier to ``directory``; ``manifest.json`` goes last, and is removed first if present."""
        directory = Path(directory)
        (directory / MANIFEST_FILE).unlink(missing_ok=True)
        with atomic_path(directory / HEAD_FILE) as tmp:
            save_file({key: value.detach().cpu().contiguous() for key, value in self.head.state_dict().items()}, tmp)
        save_clip(self.encoder, directory / ENCODER_DIR, self._encoder_source, {"role": f"{self.NAME} tower"})
        architecture = {
            "format_version": self.FORMAT_VERSION,
            self.LABELS_KEY: list(self.labels),
            "head": "mlp" if self.hidden else "linear",
            "embed_dim": embedding_dim(self.encoder),
            "hidden": self.hidden,
            **self.settings(),
            "encoder": {"dir": ENCODER_DIR, "model_name": _manifest_of(directory / ENCODER_DIR)["model_name"]},
            "finetuned_tower": self.finetuned_tower,
        }
        atomic_write_text(directory / ARCHITECTURE_FILE, json.dumps(architecture, indent=2) + "\n")
        pinned = (HEAD_FILE, f"{ENCODER_DIR}/{WEIGHTS_FILE}")
        manifest = {
            "format_version": self.FORMAT_VERSION,
            self.LABELS_KEY: list(self.labels),
            **(extra_manifest or {}),
            "files": {name: file_sha256(directory / name) for name in pinned},
            "versions": versions(),
        }
        atomic_write_text(directory / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
        logger.info("Saved %s %s to %s", self.NAME, list(self.labels), directory)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu"):
        """Load a classifier of this kind written by :meth:`save`, checking its files' sha256.

        ``device`` is ``"cpu"``, ``"auto"`` (the GPU when there is one), ``"cuda"``, ...
        """
        directory, device = Path(directory), resolve_device(device)
        if not (directory / MANIFEST_FILE).is_file():
            raise ClassifierNotFoundError(
                f"{directory} is not a {cls.NAME} directory (no {MANIFEST_FILE}; it is written last, so a save that "
                f"was interrupted has none). Train one with `{cls.TRAIN_COMMAND}`."
            )
        manifest = _read_json(directory / MANIFEST_FILE)
        architecture = _read_json(directory / ARCHITECTURE_FILE)
        for data in (manifest, architecture):
            if data.get("format_version") != cls.FORMAT_VERSION:
                raise ClassifierError(
                    f"{directory}: not a {cls.NAME} of format_version {cls.FORMAT_VERSION} (it says "
                    f"{data.get('format_version')!r}); retrain it (`{cls.TRAIN_COMMAND}`)."
                )
            if cls.LABELS_KEY not in data:
                raise ClassifierError(
                    f"{directory}: not a {cls.NAME} (it names no {cls.LABELS_KEY!r}); train one with "
                    f"`{cls.TRAIN_COMMAND}`."
                )
        for name, expected in manifest["files"].items():
            cls._check_pinned(directory, name, expected)
        encoder, _, preprocess, _ = create_clip(str(directory / ENCODER_DIR), device=device)
        if embedding_dim(encoder) != architecture["embed_dim"]:
            raise ClassifierMismatchError(
                f"{directory}: the head takes {architecture['embed_dim']}-dim embeddings, but {ENCODER_DIR}/ makes "
                f"{embedding_dim(encoder)}-dim ones."
            )
        state = load_file(directory / HEAD_FILE)
        head = cls.new_head(architecture["embed_dim"], len(architecture[cls.LABELS_KEY]), architecture["hidden"], state)
        head.load_state_dict(state)
        classifier = cls.build(encoder, preprocess, head.to(device), architecture)
        classifier.finetuned_tower = architecture["finetuned_tower"]
        classifier._encoder_source = str(directory / ENCODER_DIR)
        return classifier

    @classmethod
    def _check_pinned(cls, directory: Path, name: str, expected: str) -> None:
        path = directory / name
        if not path.is_file():
            raise ClassifierNotFoundError(f"{directory} is incomplete: {name} is missing.")
        actual = file_sha256(path)
        if actual != expected:
            why = (
                "the head was trained on the embeddings of the encoder saved with it, so on another encoder's its "
                "predictions mean nothing"
                if name.startswith(ENCODER_DIR)
                else "the head is not the one that was trained and evaluated"
            )
            raise ClassifierMismatchError(
                f"{path} changed after the classifier was saved (sha256 {actual[:12]}..., manifest says "
                f"{expected[:12]}...): {why}. Restore the file or retrain the classifier (`{cls.TRAIN_COMMAND}`)."
            )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ClassifierNotFoundError(f"{path} is missing: the classifier directory is incomplete.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ClassifierError(f"{path} is not valid JSON: {error}") from None


def _manifest_of(clip_directory: Path) -> dict:
    return json.loads((clip_directory / MANIFEST_FILE).read_text(encoding="utf-8"))


def image_sources(images: Sequence[ImageInput], image_root: str | os.PathLike | None) -> list:
    """In-memory images as they are; paths resolved (inside ``image_root``, if given) and checked to exist."""
    sources, missing = [], []
    for image in images:
        if isinstance(image, Image.Image):
            sources.append(image)
            continue
        path = resolve_image_path(image_root, str(image)) if image_root is not None else Path(image)
        if not path.is_file():
            missing.append(str(path))
        sources.append(path)
    if missing:
        listed = first_few(missing, 5)
        raise ImageLoadError(f"{len(missing)} image(s) not found: {listed}")
    return sources


def _open(source: Image.Image | Path) -> Image.Image:
    return to_rgb(source) if isinstance(source, Image.Image) else open_image(source)


def source_identity(model: str, checkpoint: str | None) -> dict:
    """Where a tower came from, pinned by the sha256 of its weights file when it has one."""
    weights = Path(checkpoint) if checkpoint else resolve_clip(model).weights
    return {"model": model, "checkpoint": checkpoint, "weights_sha256": file_sha256(weights) if weights else None}


def no_limit(value: float | None) -> float | None:
    """A limit as saved in JSON: ``None`` for none (``math.inf`` is not JSON)."""
    return None if value in (None, math.inf) else value


def versions() -> dict[str, str]:
    found = {}
    for name in ("torch", "open_clip_torch", "scikit-learn", "mmed-rag"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "unknown"
    return found
