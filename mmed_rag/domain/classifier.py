"""The domain classifier: which modality an image is, so that it is routed to that modality's retriever.

MMed-RAG routes every image to the retriever of its modality (radiology, pathology, ophthalmology) with a
domain classifier, but the release ships none. This one is a small head on the image embeddings of a CLIP
tower, any open_clip model :func:`~mmed_rag.retrieval.clip.create_clip` accepts (a fine-tuned retriever, a
local hub copy, ``tiny-clip``):

- by default the tower is frozen: every training image is embedded once
  (:func:`~mmed_rag.retrieval.encode.encode_images`) and only the head trains, in seconds; with
  ``finetune_tower`` the tower trains too, on the images themselves;
- the head standardises the embedding with the training set's mean and spread, then applies a linear layer
  (default) or a one-hidden-layer MLP. Normalised CLIP embeddings sit in a narrow cone: on the phantoms, a
  linear probe of a random tiny ResNet tower's raw embeddings placed 33-72% of test images, of standardised
  ones all of them;
- labels need no new file format: a modality's images are those of its data files, e.g. its retriever training
  JSON (``train_files: ["radiology=rad_train.json", "pathology=path_train.json"]``), in any release format
  that names images.

An image is predicted as :data:`UNKNOWN` (its best guess and probabilities are kept) when the classifier cannot
place it, for either of two reasons:

- it is ambiguous: its top probability is below ``threshold``;
- it is unfamiliar: it lies far from the training images of its best guess (``distance`` above
  ``max_distance``). A softmax cannot say this: far from all training images, a linear head's logits only grow,
  so pure noise or a black frame often gets 0.95 or more for some modality. The distance is measured in the
  head's standardised embedding space, to the nearest training image of the modality (a nearest-neighbour
  out-of-distribution score, Sun et al., ICML 2022), and divided by the modality's radius: the 99.5th percentile
  of its training images' distances to their nearest other training image. The default limit,
  :data:`DEFAULT_MAX_DISTANCE`, leaves a 5% margin above that. On the phantoms, over eight random tiny towers
  (two architectures, four seeds) it placed 99.2-99.8% of held-out images and called all of nine non-medical
  images unknown (uniform noise in colour and grey, two gradients, white, black and grey frames, a photograph, a
  logo); the earlier rule (distance from the modality's centroid, limit 2.0 in units of the 95th percentile)
  let noise, a gradient and a white frame through. The score is only as good as the tower's embeddings: a
  classifier trained on phantoms also calls most real X-rays unknown, correctly for what it has seen.

What to retrieve for an unknown image is the caller's choice: see :func:`mmed_rag.domain.routing.route`.

A classifier directory is self-contained (the tower is saved into it, so it loads offline and never follows a
path to a retriever that may have been retrained since)::

    config.json        architecture: modalities (the label order), head kind, embedding width, hidden width,
                       default threshold and max_distance, encoder model name, whether the tower was fine-tuned
    head.safetensors   the head: standardisation (mean, scale), layer weights, and each modality's training
                       region (centroids, spreads, radii) that distances are measured against
    encoder/           the CLIP tower (save_clip layout), whose embeddings the head was trained on
    config.yaml        the TrainDomainConfig it was trained with
    metrics.jsonl      train loss and val loss/accuracy by epoch
    confusion_val.png  confusion matrices of the val (and, with test_files, test) images
    manifest.json      written last: modalities, data (paths, sha256, counts), metrics, versions, and the sha256
                       of head.safetensors and of the encoder's weights, checked by DomainClassifier.load
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from safetensors.torch import load_file, save_file
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mmed_rag.atomic import atomic_path, atomic_write_text, publish_directory
from mmed_rag.config import config_to_dict, save_config
from mmed_rag.data.images import ImageLoadError, ImagePathError, load_image, open_image, resolve_image_path, to_rgb
from mmed_rag.data.records import read_records
from mmed_rag.device import resolve_device
from mmed_rag.divergence import check_gradients, check_loss, check_parameters
from mmed_rag.domain.config import (
    DEFAULT_MAX_DISTANCE,
    PredictDomainConfig,
    TrainDomainConfig,
    check_limits,
    parse_assignments,
)
from mmed_rag.domain.routing import UNKNOWN, DomainPrediction, decide, is_placed
from mmed_rag.errors import MMedRAGError, first_few
from mmed_rag.fingerprint import file_sha256
from mmed_rag.outputs import claim_outputs
from mmed_rag.progress import progress_bar
from mmed_rag.retrieval.clip import WEIGHTS_FILE, create_clip, resolve_clip, save_clip
from mmed_rag.retrieval.encode import embedding_dim, encode_images
from mmed_rag.retrieval.finetune import epoch_seed, param_groups, split_records

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
FEW_FOR_THE_LIMIT = 200  # training images per modality below which train-domain warns that its limit is noisy

ARCHITECTURE_FILE = "config.json"
HEAD_FILE = "head.safetensors"
ENCODER_DIR = "encoder"
MANIFEST_FILE = "manifest.json"
METRICS_FILE = "metrics.jsonl"


class DomainError(MMedRAGError, ValueError):
    """Training data, a config or a classifier directory the domain classifier cannot use; the message says why."""


class ClassifierNotFoundError(MMedRAGError, FileNotFoundError):
    """No complete classifier directory at the given path."""


class ClassifierMismatchError(DomainError):
    """A file of a classifier directory changed after it was saved (e.g. the encoder was retrained)."""


# -- the model -----------------------------------------------------------------------------------------------


class DomainHead(nn.Module):
    """Standardise a tower embedding with training statistics, then a linear layer or a one-hidden-layer MLP.

    Beside the layers it keeps each modality's training images (a bank of their standardised embeddings, at most
    ``BANK_PER_MODALITY`` each) and a radius per modality, which :meth:`distances` measures new images against.
    """

    BANK_PER_MODALITY = 4096
    RADIUS_QUANTILE = 0.995

    def __init__(self, embed_dim: int, num_classes: int, hidden: int | None = None, bank_size: int = 0):
        super().__init__()
        self.register_buffer("mean", torch.zeros(embed_dim))
        self.register_buffer("scale", torch.ones(embed_dim))
        self.register_buffer("bank", torch.zeros(bank_size, embed_dim))
        self.register_buffer("bank_labels", torch.zeros(bank_size, dtype=torch.long))
        self.register_buffer("radii", torch.ones(num_classes))
        if hidden:
            self.layers = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, num_classes))
        else:
            self.layers = nn.Sequential(nn.Linear(embed_dim, num_classes))

    def standardise(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.scale

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(self.standardise(features))

    @torch.no_grad()
    def fit_standardisation(self, features: torch.Tensor) -> None:
        self.mean.copy_(features.mean(dim=0))
        self.scale.copy_(features.std(dim=0).clamp_min(1e-6))

    @torch.no_grad()
    def fit_regions(self, features: torch.Tensor, labels: torch.Tensor, names: Sequence[str], seed: int = 0) -> dict:
        """Keep each modality's training images (a seeded sample when there are more than the bank holds) and
        set its radius to the ``RADIUS_QUANTILE`` of their distances to their nearest other training image
        (leave one out: how far a new image of the modality lies). ``names`` are the labels' modalities; the
        return value says what was kept, for the manifest.
        """
        sample = torch.Generator().manual_seed(seed)
        kept = []
        for label in range(len(self.radii)):
            rows = torch.nonzero(labels == label).flatten().cpu()
            if len(rows) > self.BANK_PER_MODALITY:
                rows = rows[torch.randperm(len(rows), generator=sample)[: self.BANK_PER_MODALITY]].sort().values
            kept.append(rows)
        rows = torch.cat(kept).to(features.device)
        self.bank = self.standardise(features[rows]).contiguous()
        self.bank_labels = labels[rows].clone()
        for label in range(len(self.radii)):
            own = self.bank[self.bank_labels == label]
            if len(own) < 2:  # nothing to leave one out against
                raise DomainError(f"{names[label]}: at least 2 training images are needed, got {len(own)}")
            gaps = torch.cdist(own, own).fill_diagonal_(math.inf).min(dim=1).values
            self.radii[label] = torch.quantile(gaps, self.RADIUS_QUANTILE).clamp_min(1e-6)
        return {
            "measure": "distance to the nearest training image of the modality, over the modality's radius",
            "radius_quantile": self.RADIUS_QUANTILE,
            "bank_images": {name: len(rows) for name, rows in zip(names, kept, strict=True)},
            "radii": {name: float(radius) for name, radius in zip(names, self.radii, strict=True)},
        }

    @torch.no_grad()
    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """(images, modalities): distance to the modality's nearest training image over the modality's radius."""
        standard = self.standardise(features)
        columns = [
            torch.cdist(standard, self.bank[self.bank_labels == label]).min(dim=1).values / self.radii[label]
            for label in range(len(self.radii))
        ]
        return torch.stack(columns, dim=1)


ImageInput = Image.Image | str | os.PathLike


class DomainClassifier:
    """A CLIP image tower and a :class:`DomainHead`: images in, modality predictions out.

    Create one with :func:`train_domain` and load it with :meth:`load`. ``threshold`` and ``max_distance`` are
    the defaults :meth:`predict` uses (saved with the classifier; ``max_distance=None``: no distance limit).
    """

    def __init__(
        self,
        encoder: nn.Module,
        preprocess,
        head: DomainHead,
        modalities: Sequence[str],
        threshold: float = 0.5,
        max_distance: float | None = DEFAULT_MAX_DISTANCE,
        encoder_name: str = "",
        finetuned_tower: bool = False,
    ):
        check_limits(threshold, max_distance)
        self.encoder, self.preprocess, self.head = encoder.eval(), preprocess, head.eval()
        self.modalities = tuple(modalities)
        self.threshold, self.max_distance = threshold, max_distance
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
        return self.head.layers[0].out_features if len(self.head.layers) > 1 else None

    def __repr__(self) -> str:
        head = f"mlp({self.hidden})" if self.hidden else "linear"
        return (
            f"DomainClassifier({list(self.modalities)}, {head} head on {self.encoder_name}, "
            f"threshold={self.threshold}, max_distance={self.max_distance})"
        )

    @torch.no_grad()
    def score_features(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities and distances (rows: images, columns: ``modalities``) of this tower's embeddings."""
        features = torch.as_tensor(features, dtype=torch.float32, device=self.head.mean.device)
        probabilities = torch.softmax(self.head(features), dim=-1)
        return probabilities.cpu().numpy(), self.head.distances(features).cpu().numpy()

    @torch.no_grad()
    def embedded_batches(
        self, images: Sequence[ImageInput], image_root: str | os.PathLike | None = None, batch_size: int = 64
    ) -> Iterator[np.ndarray]:
        """Normalised tower embeddings of in-memory images and image files (relative to ``image_root`` if given),
        one batch at a time.

        Every file is checked before any is encoded; missing ones raise :class:`ImageLoadError` naming them.
        """
        sources = _image_sources(images, image_root)
        device = self.device
        starts = range(0, len(sources), batch_size)
        for start in progress_bar(starts, desc="domain", unit="batch", disable=len(starts) < 2):
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

    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        threshold: float | None = None,
        max_distance: float | None = None,
        image_root: str | os.PathLike | None = None,
        batch_size: int = 64,
    ) -> list[DomainPrediction]:
        """One :class:`DomainPrediction` per image (PIL images or paths; a single image gives a list of one).

        ``threshold`` and ``max_distance`` override the classifier's own (``max_distance=math.inf`` lifts the
        distance limit). Paths are relative to ``image_root`` when it is given (and must stay inside it).
        """
        images = [images] if isinstance(images, (Image.Image, str, os.PathLike)) else list(images)
        threshold = self.threshold if threshold is None else threshold
        max_distance = self.max_distance if max_distance is None else max_distance
        check_limits(threshold, max_distance)
        names = iter([None if isinstance(image, Image.Image) else str(image) for image in images])
        predictions = []
        for features in self.embedded_batches(images, image_root, batch_size):
            for probability, distance in zip(*self.score_features(features), strict=True):
                predictions.append(decide(probability, distance, self.modalities, threshold, max_distance, next(names)))
        return predictions

    def evaluate(self, images: Sequence[LabelledImage], batch_size: int = 64, workers: int = 0) -> dict:
        """Accuracy, per-modality precision/recall/F1, confusion matrix and unknown rate on labelled images."""
        foreign = sorted({image.modality for image in images} - set(self.modalities))
        if foreign:
            raise DomainError(f"cannot evaluate on {foreign}: this classifier knows {list(self.modalities)}")
        features = encode_labelled(self.encoder, self.preprocess, images, batch_size, workers)
        labels = np.array([self.modalities.index(image.modality) for image in images])
        probabilities, distances = self.score_features(features)
        best = probabilities.argmax(axis=1)
        rows = np.arange(len(best))
        placed = is_placed(probabilities[rows, best], distances[rows, best], self.threshold, self.max_distance)
        return classification_metrics(labels, best, self.modalities, ~np.asarray(placed))

    # -- saving and loading --

    def save(self, directory: str | os.PathLike, extra_manifest: dict | None = None) -> Path:
        """Write the classifier to ``directory``; ``manifest.json`` goes last, and is removed first if present."""
        directory = Path(directory)
        (directory / MANIFEST_FILE).unlink(missing_ok=True)
        with atomic_path(directory / HEAD_FILE) as tmp:
            save_file({key: value.detach().cpu().contiguous() for key, value in self.head.state_dict().items()}, tmp)
        save_clip(self.encoder, directory / ENCODER_DIR, self._encoder_source, {"role": "domain classifier tower"})
        architecture = {
            "format_version": FORMAT_VERSION,
            "modalities": list(self.modalities),
            "head": "mlp" if self.hidden else "linear",
            "embed_dim": embedding_dim(self.encoder),
            "hidden": self.hidden,
            "threshold": self.threshold,
            "max_distance": None if self.max_distance in (None, math.inf) else self.max_distance,
            "encoder": {"dir": ENCODER_DIR, "model_name": _manifest_of(directory / ENCODER_DIR)["model_name"]},
            "finetuned_tower": self.finetuned_tower,
        }
        atomic_write_text(directory / ARCHITECTURE_FILE, json.dumps(architecture, indent=2) + "\n")
        pinned = (HEAD_FILE, f"{ENCODER_DIR}/{WEIGHTS_FILE}")
        manifest = {
            "format_version": FORMAT_VERSION,
            "modalities": list(self.modalities),
            **(extra_manifest or {}),
            "files": {name: file_sha256(directory / name) for name in pinned},
            "versions": _versions(),
        }
        atomic_write_text(directory / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
        logger.info("Saved domain classifier %s to %s", list(self.modalities), directory)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> DomainClassifier:
        """Load a classifier written by :meth:`save` (or :func:`train_domain`), checking its files' sha256.

        ``device`` is ``"cpu"``, ``"auto"`` (the GPU when there is one), ``"cuda"``, ...
        """
        directory, device = Path(directory), resolve_device(device)
        if not (directory / MANIFEST_FILE).is_file():
            raise ClassifierNotFoundError(
                f"{directory} is not a domain classifier directory (no {MANIFEST_FILE}; it is written last, so a "
                f"save that was interrupted has none). Train one with `mmed-rag train-domain`."
            )
        manifest = _read_json(directory / MANIFEST_FILE)
        architecture = _read_json(directory / ARCHITECTURE_FILE)
        for data in (manifest, architecture):
            if data.get("format_version") != FORMAT_VERSION:
                raise DomainError(
                    f"{directory}: format_version {data.get('format_version')!r}, but this mmed-rag reads version "
                    f"{FORMAT_VERSION}; retrain the classifier."
                )
        for name, expected in manifest["files"].items():
            _check_pinned(directory, name, expected)
        encoder, _, preprocess, _ = create_clip(str(directory / ENCODER_DIR), device=device)
        if embedding_dim(encoder) != architecture["embed_dim"]:
            raise ClassifierMismatchError(
                f"{directory}: the head takes {architecture['embed_dim']}-dim embeddings, but {ENCODER_DIR}/ makes "
                f"{embedding_dim(encoder)}-dim ones."
            )
        state = load_file(directory / HEAD_FILE)
        head = DomainHead(
            architecture["embed_dim"], len(architecture["modalities"]), architecture["hidden"], len(state["bank"])
        )
        head.load_state_dict(state)
        classifier = cls(
            encoder,
            preprocess,
            head.to(device),
            architecture["modalities"],
            architecture["threshold"],
            architecture["max_distance"],
            architecture["encoder"]["model_name"],
            architecture["finetuned_tower"],
        )
        classifier._encoder_source = str(directory / ENCODER_DIR)
        return classifier


def _check_pinned(directory: Path, name: str, expected: str) -> None:
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
            f"{expected[:12]}...): {why}. Restore the file or retrain the classifier (`mmed-rag train-domain`)."
        )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ClassifierNotFoundError(f"{path} is missing: the classifier directory is incomplete.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DomainError(f"{path} is not valid JSON: {error}") from None


def _manifest_of(clip_directory: Path) -> dict:
    return json.loads((clip_directory / MANIFEST_FILE).read_text(encoding="utf-8"))


def _image_sources(images: Sequence[ImageInput], image_root: str | os.PathLike | None) -> list:
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


# -- labelled data -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelledImage:
    """An image of a data file (``path`` relative to ``root``) and the modality that file stands for."""

    path: str
    root: str
    modality: str
    # Where it was named ("file.json, id 'rad_00001'"), for error messages; not part of the image's identity.
    source: str = field(default="", compare=False)


def read_labelled(path: str | os.PathLike, modality: str, root: str) -> tuple[list[list[LabelledImage]], dict]:
    """The images of each record of a data file (any release format that names images), and what it was.

    Records, not images, are returned, so a val split never puts views of one study on both sides.
    """
    records = read_records(path).records
    if not records:
        raise DomainError(f"{path} ({modality}) holds no records.")
    labelled = [
        [
            LabelledImage(image, root, modality, f"{path}, {record.unique_key} {record.key!r}")
            for image in record.image_paths
        ]
        for record in records
    ]
    return labelled, {"path": str(path), "sha256": file_sha256(path), "records": len(records)}


def flatten(records: Sequence[Sequence[LabelledImage]]) -> list[LabelledImage]:
    """The images of ``records``, each once (a VQA file names an image once per question)."""
    return list(dict.fromkeys(image for record in records for image in record))


def check_labelled(images: Sequence[LabelledImage], split: str) -> None:
    """Fail before any encoding when an image is missing, outside its root, or given two modalities."""
    missing, seen = [], {}
    for image in images:
        try:
            path = resolve_image_path(image.root, image.path)
        except ImagePathError as error:
            raise ImagePathError(f"{split} ({image.modality}): {image.source}: {error}") from None
        if not path.is_file():
            missing.append(f"{image.source}: {image.path}")
        if seen.setdefault(path, image.modality) != image.modality:
            raise DomainError(f"{split}: {path} is labelled both {seen[path]} and {image.modality}.")
    if missing:
        listed = first_few(missing, 5)
        raise ImageLoadError(f"{split}: {len(missing)} image(s) not found: {listed}")


def encode_labelled(
    encoder: nn.Module,
    preprocess,
    images: Sequence[LabelledImage],
    batch_size: int = 64,
    workers: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """Normalised embeddings of labelled images (one :func:`encode_images` call per image root)."""
    features = np.zeros((len(images), embedding_dim(encoder)), dtype=np.float32)
    rows_by_root: dict[str, list[int]] = {}
    for row, image in enumerate(images):
        rows_by_root.setdefault(image.root, []).append(row)
    for root, rows in rows_by_root.items():
        paths = [images[row].path for row in rows]
        features[rows] = encode_images(encoder, preprocess, root, paths, batch_size, workers, progress)
    return features


class LabelledImageDataset(Dataset):
    """(pixels, label index) of labelled images, for training the tower itself."""

    def __init__(self, images: Sequence[LabelledImage], modalities: Sequence[str], preprocess):
        self.images, self.preprocess = list(images), preprocess
        self.labels = [list(modalities).index(image.modality) for image in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        return self.preprocess(load_image(image.root, image.path)), self.labels[index]


# -- metrics -------------------------------------------------------------------------------------------------


def classification_metrics(
    labels: np.ndarray, predicted: np.ndarray, modalities: Sequence[str], unknown: np.ndarray
) -> dict:
    """Accuracy of the best guesses ``predicted``, per-modality precision/recall/F1, confusion matrix, unknowns.

    The confusion matrix has one row per true and one column per predicted modality (best guesses, so every
    image counts once). ``unknown`` marks the images that would be reported as unknown: ``unknown_rate`` is
    their share, and ``routed_accuracy`` the share of images both placed and placed right.
    """
    classes = list(range(len(modalities)))
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=classes, zero_division=0)
    right = predicted == labels
    return {
        "images": len(labels),
        "accuracy": float(np.mean(right)),
        "routed_accuracy": float(np.mean(right & ~unknown)),
        "unknown_rate": float(np.mean(unknown)),
        "per_modality": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(modalities, precision, recall, f1, support, strict=True)
        },
        "confusion": confusion_matrix(labels, predicted, labels=classes).tolist(),
    }


def describe(metrics: dict) -> str:
    """One log line for an evaluation."""
    return (
        f"accuracy {metrics['accuracy']:.4f} on {metrics['images']} images, {metrics['unknown_rate']:.1%} "
        f"reported unknown (routed accuracy {metrics['routed_accuracy']:.4f})"
    )


def plot_confusion(metrics: dict, modalities: Sequence[str], path: Path, title: str) -> None:
    """The confusion matrix as a PNG: counts in each cell, rows true, columns predicted."""
    matrix = np.array(metrics["confusion"])
    size = 1.2 + 0.9 * len(modalities)
    figure = Figure(figsize=(size + 1.2, size), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    shown = ax.imshow(matrix, cmap="Blues", vmin=0)
    figure.colorbar(shown, ax=ax, shrink=0.8)
    for (row, col), count in np.ndenumerate(matrix):
        colour = "white" if count > matrix.max() / 2 else "black"
        ax.text(col, row, str(count), ha="center", va="center", color=colour)
    ticks = range(len(modalities))
    ax.set_xticks(ticks, modalities, rotation=30, ha="right")
    ax.set_yticks(ticks, modalities)
    ax.set(xlabel="predicted", ylabel="true", title=f"{title}: accuracy {metrics['accuracy']:.3f}")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)


# -- the stages ----------------------------------------------------------------------------------------------


def load_domain_data(config: TrainDomainConfig) -> tuple[dict[str, list[LabelledImage]], dict]:
    """Train, val and test images (val: val_files, or a seeded hold-out of each modality's training records)."""
    splits: dict[str, list[LabelledImage]] = {"train": [], "val": [], "test": []}
    data: dict[str, dict] = {"train": {}, "val": {}, "test": {}}
    val_paths = parse_assignments(config.val_files, "val_files")
    test_paths = parse_assignments(config.test_files, "test_files")
    for modality, path in config.train_paths.items():
        root = config.root_of(modality)
        records, data["train"][modality] = read_labelled(path, modality, root)
        if modality in val_paths:
            val_records, data["val"][modality] = read_labelled(val_paths[modality], modality, root)
        elif config.val_fraction > 0 and not val_paths:
            records, val_records = split_records(records, config.val_fraction, config.seed)
            data["val"][modality] = {"held_out_from_train": config.val_fraction, "records": len(val_records)}
        else:
            val_records = []
        if not records:
            raise DomainError(f"{path} ({modality}): no training record is left after holding out validation ones.")
        train_images = flatten(records)
        splits["train"] += train_images
        # A file with one record per question (VQA) names an image in several records: keep val images unseen.
        seen = set(train_images)
        splits["val"] += [image for image in flatten(val_records) if image not in seen]
        data["train"][modality]["records_used"] = len(records)
        if modality in test_paths:
            test_records, data["test"][modality] = read_labelled(test_paths[modality], modality, root)
            splits["test"] += flatten(test_records)
    for split, images in splits.items():
        check_labelled(images, split)
        for modality in data[split]:
            data[split][modality]["images"] = sum(image.modality == modality for image in images)
    return splits, data


def _class_weights(labels: torch.Tensor, count: int, how: str) -> torch.Tensor | None:
    if how == "none":
        return None
    frequency = torch.bincount(labels, minlength=count).float()
    return (len(labels) / (count * frequency.clamp_min(1))).to(labels.device)


def train_domain(config: TrainDomainConfig) -> Path:
    """Train a domain classifier as ``config`` says and write it to ``config.out``; return that directory.

    The directory is written aside (``<out>.partial``) and swapped in complete, so a killed run leaves the
    previous classifier, or none, never a mixture. Reseeds torch's global RNG with ``seed``.
    """
    with claim_outputs("train-domain", replaced=[config.out], inputs=config.read_paths()):
        return _train_domain(config)


def _train_domain(config: TrainDomainConfig) -> Path:
    device = resolve_device(config.device)
    modalities = list(config.train_paths)
    splits, data = load_domain_data(config)
    torch.manual_seed(config.seed)
    encoder, preprocess_train, preprocess_val, _ = create_clip(config.model, config.checkpoint, device=device)
    head = DomainHead(embedding_dim(encoder), len(modalities), config.hidden if config.head == "mlp" else None)
    head.to(device)

    def labels_of(images: Sequence[LabelledImage]) -> torch.Tensor:
        return torch.tensor([modalities.index(image.modality) for image in images], dtype=torch.long, device=device)

    def embeddings(images: Sequence[LabelledImage], progress: bool = False) -> torch.Tensor:
        found = encode_labelled(encoder.eval(), preprocess_val, images, config.batch_size, config.workers, progress)
        return torch.from_numpy(found).to(device)

    train_labels, val_labels = labels_of(splits["train"]), labels_of(splits["val"])
    # The frozen tower's embeddings never change: computed once, they make an epoch a few matrix products.
    train_features = embeddings(splits["train"], progress=True)
    val_features = embeddings(splits["val"]) if splits["val"] else None
    head.fit_standardisation(train_features)
    weights = _class_weights(train_labels, len(modalities), config.class_weighting)
    parameters = [{**group, "lr": config.lr} for group in param_groups(head, config.wd)]
    if config.finetune_tower:
        parameters += [{**group, "lr": config.tower_lr} for group in param_groups(encoder.visual, config.wd)]
        tower_set = LabelledImageDataset(splits["train"], modalities, preprocess_train)
    optimizer = torch.optim.AdamW(parameters)

    metrics: list[dict] = []
    for epoch in (progress := progress_bar(range(config.epochs), desc="train-domain", unit="epoch")):
        shuffle = torch.Generator().manual_seed(epoch_seed(config.seed, epoch))
        order = torch.randperm(len(train_labels), generator=shuffle)
        if config.finetune_tower:
            torch.manual_seed(epoch_seed(config.seed, epoch))  # the augmentation of this epoch
            batches = DataLoader(
                torch.utils.data.Subset(tower_set, order.tolist()), config.batch_size, num_workers=config.workers
            )
        else:
            batches = ((train_features[rows], train_labels[rows]) for rows in order.to(device).split(config.batch_size))
        head.train()
        encoder.train(config.finetune_tower)
        losses = []
        for inputs, labels in batches:
            if config.finetune_tower:
                inputs = encoder.encode_image(inputs.to(device), normalize=True)
            loss = nn.functional.cross_entropy(head(inputs), labels.to(device), weight=weights)
            where = f"epoch {epoch + 1}, step {len(losses) + 1}"
            check_loss(loss, "train-domain", where, optimizer.param_groups[0]["lr"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            check_gradients(head, "train-domain", where, optimizer.param_groups[0]["lr"])
            optimizer.step()
            losses.append(loss.item())
        metrics.append({"epoch": epoch + 1, "split": "train", "loss": float(np.mean(losses))})
        head.eval()
        if val_features is not None:
            if config.finetune_tower:
                val_features = embeddings(splits["val"])
            with torch.no_grad():
                logits = head(val_features)
                val_loss = nn.functional.cross_entropy(logits, val_labels, weight=weights).item()
                accuracy = (logits.argmax(dim=1) == val_labels).float().mean().item()
            metrics.append({"epoch": epoch + 1, "split": "val", "loss": val_loss, "accuracy": accuracy})
            progress.set_postfix(loss=f"{metrics[-2]['loss']:.3f}", val_accuracy=f"{accuracy:.3f}")

    for part in (head, encoder) if config.finetune_tower else (head,):
        check_parameters(part, "train-domain", f"the end of epoch {config.epochs}", optimizer.param_groups[0]["lr"])
    # The training regions are measured on the final embeddings (the tower's own, when it was trained).
    regions = head.fit_regions(
        embeddings(splits["train"]) if config.finetune_tower else train_features, train_labels, modalities, config.seed
    )
    few = {name: count for name, count in regions["bank_images"].items() if count < FEW_FOR_THE_LIMIT}
    if few:
        logger.warning(
            "The distance limit is calibrated on the training images themselves, and %s has few (%s): expect more "
            "new images of it called unknown (on the phantoms, 70 per modality placed 97-99%% of new ones, 467 "
            "placed 99.2-99.8%%); raise --max-distance if that matters more than catching foreign images.",
            ", ".join(few),
            ", ".join(map(str, few.values())),
        )
    classifier = DomainClassifier(
        encoder,
        preprocess_val,
        head,
        modalities,
        config.threshold,
        config.max_distance,
        config.model,
        config.finetune_tower,
    )
    out = Path(config.out)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    results = {}
    for split in ("val", "test"):
        if splits[split]:
            results[split] = classifier.evaluate(splits[split], config.batch_size, config.workers)
            plot_confusion(results[split], modalities, staging / f"confusion_{split}.png", f"{split} ({config.model})")
            logger.info("%s: %s", split, describe(results[split]))
    atomic_write_text(staging / METRICS_FILE, "".join(json.dumps(line) + "\n" for line in metrics))
    save_config(config, staging)
    classifier.save(
        staging,
        {
            "data": data,
            "metrics": results,
            "distance": regions,
            "encoder_source": _source_identity(config.model, config.checkpoint),
            "training": config_to_dict(config),
            "trained_on": str(device),
        },
    )
    publish_directory(staging, out)
    logger.info("Trained the domain classifier %s: %s", modalities, out)
    return out


def _source_identity(model: str, checkpoint: str | None) -> dict:
    """Where the tower came from, pinned by the sha256 of its weights file when it has one."""
    weights = Path(checkpoint) if checkpoint else resolve_clip(model).weights
    return {"model": model, "checkpoint": checkpoint, "weights_sha256": file_sha256(weights) if weights else None}


def predict_domain(config: PredictDomainConfig) -> list[DomainPrediction]:
    """Predict the modality of every image of ``config``; write them to ``config.output`` (JSONL) if given."""
    inputs = [config.classifier, config.data, *(Path(config.img_root) / image for image in config.images)]
    with claim_outputs("predict-domain", files=[config.output], inputs=inputs):
        return _predict_domain(config)


def _predict_domain(config: PredictDomainConfig) -> list[DomainPrediction]:
    classifier = DomainClassifier.load(config.classifier, config.device)
    if config.data:
        images = list(dict.fromkeys(path for record in read_records(config.data) for path in record.image_paths))
    else:
        images = list(config.images)
    predictions = classifier.predict(
        images,
        threshold=config.threshold,
        max_distance=config.max_distance,
        image_root=config.img_root or None,
        batch_size=config.batch_size,
    )
    if config.output:
        text = "".join(json.dumps(prediction.to_dict()) + "\n" for prediction in predictions)
        atomic_write_text(config.output, text)
    counts = {name: sum(p.modality == name for p in predictions) for name in (*classifier.modalities, UNKNOWN)}
    logger.info("Predicted %d image(s): %s", len(predictions), ", ".join(f"{k} {v}" for k, v in counts.items()))
    return predictions


def _versions() -> dict[str, str]:
    versions = {}
    for name in ("torch", "open_clip_torch", "scikit-learn", "mmed-rag"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions
