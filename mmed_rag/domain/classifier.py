"""The domain classifier: which modality an image is, so that it is routed to that modality's retriever.

MMed-RAG routes every image to the retriever of its modality (radiology, pathology, ophthalmology) with a
domain classifier, but the release ships none. This one is a small head on the image embeddings of a CLIP
tower, any open_clip model :func:`~mmed_rag.retrieval.clip.create_clip` accepts (a fine-tuned retriever, a
local hub copy, ``tiny-clip``):

- it is an :class:`~mmed_rag.classify.model.ImageClassifier` (the machinery it shares with DAMON's finding
  classifier): a standardised linear or MLP head on the tower's embeddings, trained by
  :func:`~mmed_rag.classify.training.train_head` (frozen tower by default, embedded once; ``finetune_tower``
  trains it too), with one softmax over the modalities;
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

A classifier directory is :class:`~mmed_rag.classify.model.ImageClassifier`'s (``config.json`` names the
``modalities`` and holds the default ``threshold`` and ``max_distance``; ``head.safetensors`` also holds each
modality's training region: the bank of training embeddings and the radii that distances are measured against),
with, from training::

    config.yaml        the TrainDomainConfig it was trained with
    metrics.jsonl      train loss and val loss/accuracy by epoch
    confusion_val.png  confusion matrices of the val (and, with test_files, test) images
    manifest.json      (written last) also: data (paths, sha256, counts), metrics, the distance calibration
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from torch import nn

from mmed_rag.atomic import atomic_path, atomic_write_text
from mmed_rag.classify.model import (
    METRICS_FILE,
    ClassifierError,
    ClassifierMismatchError,
    ClassifierNotFoundError,
    ImageClassifier,
    ImageInput,
    StandardisedHead,
    no_limit,
)
from mmed_rag.classify.training import LabelledImage, check_labelled, encode_labelled, publish_classifier, train_head
from mmed_rag.config import save_config
from mmed_rag.data.records import read_records
from mmed_rag.device import resolve_device
from mmed_rag.domain.config import (
    DEFAULT_MAX_DISTANCE,
    PredictDomainConfig,
    TrainDomainConfig,
    check_limits,
    parse_assignments,
)
from mmed_rag.domain.routing import UNKNOWN, DomainPrediction, decide, is_placed
from mmed_rag.fingerprint import file_sha256
from mmed_rag.outputs import claim_outputs
from mmed_rag.retrieval.clip import create_clip
from mmed_rag.retrieval.encode import embedding_dim
from mmed_rag.retrieval.finetune import split_records

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
FEW_FOR_THE_LIMIT = 200  # training images per modality below which train-domain warns that its limit is noisy

__all__ = [  # the errors a caller catches are the shared classifier's, under the names this module always had
    "ClassifierMismatchError",
    "ClassifierNotFoundError",
    "DomainClassifier",
    "DomainError",
    "PredictDomainConfig",
    "TrainDomainConfig",
    "predict_domain",
    "train_domain",
]


class DomainError(ClassifierError):
    """Training data, a config or a classifier directory the domain classifier cannot use; the message says why."""


# -- the model -----------------------------------------------------------------------------------------------


class DomainHead(StandardisedHead):
    """The standardised head with one output per modality. Beside the layers it keeps each modality's training
    images (a bank of their standardised embeddings, at most ``BANK_PER_MODALITY`` each) and a radius per
    modality, which :meth:`distances` measures new images against.
    """

    BANK_PER_MODALITY = 4096
    RADIUS_QUANTILE = 0.995

    def __init__(self, embed_dim: int, num_classes: int, hidden: int | None = None, bank_size: int = 0):
        super().__init__(embed_dim, num_classes, hidden)
        self.register_buffer("bank", torch.zeros(bank_size, embed_dim))
        self.register_buffer("bank_labels", torch.zeros(bank_size, dtype=torch.long))
        self.register_buffer("radii", torch.ones(num_classes))

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


class DomainClassifier(ImageClassifier):
    """A CLIP image tower and a :class:`DomainHead`: images in, modality predictions out.

    Create one with :func:`train_domain` and load it with :meth:`load`. ``threshold`` and ``max_distance`` are
    the defaults :meth:`predict` uses (saved with the classifier; ``max_distance=None``: no distance limit).
    """

    FORMAT_VERSION = FORMAT_VERSION
    LABELS_KEY = "modalities"
    NAME = "domain classifier"
    TRAIN_COMMAND = "mmed-rag train-domain"

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
        super().__init__(encoder, preprocess, head, modalities, encoder_name, finetuned_tower)
        self.threshold, self.max_distance = threshold, max_distance

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.labels

    def __repr__(self) -> str:
        return (
            f"DomainClassifier({list(self.modalities)}, {self._head_description()} head on {self.encoder_name}, "
            f"threshold={self.threshold}, max_distance={self.max_distance})"
        )

    def settings(self) -> dict:
        return {"threshold": self.threshold, "max_distance": no_limit(self.max_distance)}

    @classmethod
    def new_head(cls, embed_dim: int, num_classes: int, hidden: int | None, state: dict) -> DomainHead:
        return DomainHead(embed_dim, num_classes, hidden, len(state["bank"]))

    @classmethod
    def build(cls, encoder, preprocess, head, architecture: dict) -> DomainClassifier:
        return cls(
            encoder,
            preprocess,
            head,
            architecture["modalities"],
            architecture["threshold"],
            architecture["max_distance"],
            architecture["encoder"]["model_name"],
        )

    @torch.no_grad()
    def score_features(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities and distances (rows: images, columns: ``modalities``) of this tower's embeddings."""
        features = torch.as_tensor(features, dtype=torch.float32, device=self.head.mean.device)
        probabilities = torch.softmax(self.head(features), dim=-1)
        return probabilities.cpu().numpy(), self.head.distances(features).cpu().numpy()

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
        foreign = sorted({image.labels[0] for image in images} - set(self.modalities))
        if foreign:
            raise DomainError(f"cannot evaluate on {foreign}: this classifier knows {list(self.modalities)}")
        features = encode_labelled(self.encoder, self.preprocess, images, batch_size, workers)
        labels = np.array([self.modalities.index(image.labels[0]) for image in images])
        probabilities, distances = self.score_features(features)
        best = probabilities.argmax(axis=1)
        rows = np.arange(len(best))
        placed = is_placed(probabilities[rows, best], distances[rows, best], self.threshold, self.max_distance)
        return classification_metrics(labels, best, self.modalities, ~np.asarray(placed))


# -- labelled data -------------------------------------------------------------------------------------------


def read_labelled(path: str | os.PathLike, modality: str, root: str) -> tuple[list[list[LabelledImage]], dict]:
    """The images of each record of a data file (any release format that names images), and what it was.

    Records, not images, are returned, so a val split never puts views of one study on both sides.
    """
    records = read_records(path).records
    if not records:
        raise DomainError(f"{path} ({modality}) holds no records.")
    labelled = [
        [
            LabelledImage(image, root, (modality,), f"{path}, {record.unique_key} {record.key!r}")
            for image in record.image_paths
        ]
        for record in records
    ]
    return labelled, {"path": str(path), "sha256": file_sha256(path), "records": len(records)}


def flatten(records: Sequence[Sequence[LabelledImage]]) -> list[LabelledImage]:
    """The images of ``records``, each once (a VQA file names an image once per question)."""
    return list(dict.fromkeys(image for record in records for image in record))


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
        check_labelled(images, split, DomainError)
        for modality in data[split]:
            data[split][modality]["images"] = sum(image.labels == (modality,) for image in images)
    return splits, data


def _class_weights(labels: torch.Tensor, count: int, how: str) -> torch.Tensor | None:
    if how == "none":
        return None
    frequency = torch.bincount(labels, minlength=count).float()
    return len(labels) / (count * frequency.clamp_min(1))


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
    targets = {
        split: torch.tensor([modalities.index(image.labels[0]) for image in images], dtype=torch.long)
        for split, images in splits.items()
    }
    weights = _class_weights(targets["train"], len(modalities), config.class_weighting)
    weights = None if weights is None else weights.to(device)

    def loss_of(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, labels, weight=weights)

    def score_of(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        return {"accuracy": (logits.argmax(dim=1) == labels).float().mean().item()}

    trained = train_head(
        config, "train-domain", encoder, head, preprocess_train, preprocess_val, splits, targets, loss_of, score_of
    )
    metrics = trained.history
    regions = head.fit_regions(trained.train_features, targets["train"].to(device), modalities, config.seed)
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
    return publish_classifier(
        classifier, staging, out, config, device, {"data": data, "metrics": results, "distance": regions}
    )


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
