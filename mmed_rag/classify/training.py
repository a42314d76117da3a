"""Training an image classifier's head (and optionally its tower) on labelled images; one loop for every kind.

By default the tower is frozen: every training image is embedded once (:func:`encode_labelled`) and an epoch is a
few matrix products, so a head trains in seconds; with ``finetune_tower`` the tower trains too, on the images
themselves (augmented by the tower's training transform). Each kind of classifier brings its targets (a class
index per image, or a 0/1 row per image), its loss and its validation score; :func:`train_head` does the rest:
seeded per-epoch order, AdamW without decay on gains and biases, the divergence checks, a history per epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mmed_rag.atomic import publish_directory
from mmed_rag.classify.config import HeadTraining
from mmed_rag.classify.model import ImageClassifier, StandardisedHead, source_identity
from mmed_rag.config import config_to_dict
from mmed_rag.data.images import ImageLoadError, ImagePathError, load_image, resolve_image_path
from mmed_rag.divergence import check_gradients, check_loss, check_parameters
from mmed_rag.errors import first_few
from mmed_rag.progress import progress_bar
from mmed_rag.retrieval.encode import embedding_dim, encode_images
from mmed_rag.retrieval.finetune import epoch_seed, param_groups

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelledImage:
    """An image of a data file (``path`` relative to ``root``) and its labels (a modality; or its findings)."""

    path: str
    root: str
    labels: tuple[str, ...]
    # Where it was named ("file.json, id 'rad_00001'"), for error messages; not part of the image's identity.
    source: str = field(default="", compare=False)


def check_labelled(images: Sequence[LabelledImage], split: str, error: type[Exception] = ValueError) -> None:
    """Fail before any encoding when an image is missing, outside its root, or labelled twice differently."""
    missing, seen = [], {}
    for image in images:
        try:
            path = resolve_image_path(image.root, image.path)
        except ImagePathError as problem:
            raise ImagePathError(f"{split}: {image.source}: {problem}") from None
        if not path.is_file():
            missing.append(f"{image.source}: {image.path}")
        if seen.setdefault(path, image.labels) != image.labels:
            raise error(f"{split}: {path} is labelled both {list(seen[path])} and {list(image.labels)}.")
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
    """(pixels, target) of labelled images, for training the tower itself."""

    def __init__(self, images: Sequence[LabelledImage], targets: torch.Tensor, preprocess):
        self.images, self.targets, self.preprocess = list(images), targets.cpu(), preprocess

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        return self.preprocess(load_image(image.root, image.path)), self.targets[index]


@dataclass
class TrainedHead:
    """What :func:`train_head` leaves: the history per epoch and the final embeddings of the training images and of
    the val images (None without val images)."""

    history: list[dict]
    train_features: torch.Tensor
    val_features: torch.Tensor | None


def train_head(
    settings: HeadTraining,
    stage: str,
    encoder: nn.Module,
    head: StandardisedHead,
    preprocess_train,
    preprocess_val,
    images: dict[str, Sequence[LabelledImage]],
    targets: dict[str, torch.Tensor],
    loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    score_of: Callable[[torch.Tensor, torch.Tensor], dict[str, float]],
) -> TrainedHead:
    """Train ``head`` (and the tower with ``settings.finetune_tower``) on ``images["train"]``.

    ``loss_of(logits, targets)`` is the training loss; after each epoch the val images (when there are any) get
    ``loss_of`` and ``score_of(logits, targets)`` (e.g. accuracy), recorded in the history. ``stage`` names the run
    in progress bars and divergence errors.
    """
    device = head.mean.device

    def embeddings(split: str, progress: bool = False) -> torch.Tensor:
        found = encode_labelled(
            encoder.eval(), preprocess_val, images[split], settings.batch_size, settings.workers, progress
        )
        return torch.from_numpy(found).to(device)

    train_targets = targets["train"].to(device)
    # The frozen tower's embeddings never change: computed once, they make an epoch a few matrix products.
    train_features = embeddings("train", progress=True)
    val_features = embeddings("val") if images.get("val") else None
    head.fit_standardisation(train_features)
    parameters = [{**group, "lr": settings.lr} for group in param_groups(head, settings.wd)]
    if settings.finetune_tower:
        parameters += [{**group, "lr": settings.tower_lr} for group in param_groups(encoder.visual, settings.wd)]
        tower_set = LabelledImageDataset(images["train"], train_targets, preprocess_train)
    optimizer = torch.optim.AdamW(parameters)

    history: list[dict] = []
    for epoch in (progress := progress_bar(range(settings.epochs), desc=stage, unit="epoch")):
        shuffle = torch.Generator().manual_seed(epoch_seed(settings.seed, epoch))
        order = torch.randperm(len(train_targets), generator=shuffle)
        if settings.finetune_tower:
            torch.manual_seed(epoch_seed(settings.seed, epoch))  # the augmentation of this epoch
            batches = DataLoader(
                torch.utils.data.Subset(tower_set, order.tolist()), settings.batch_size, num_workers=settings.workers
            )
        else:
            batches = (
                (train_features[rows], train_targets[rows]) for rows in order.to(device).split(settings.batch_size)
            )
        head.train()
        encoder.train(settings.finetune_tower)
        losses = []
        for inputs, batch_targets in batches:
            if settings.finetune_tower:
                inputs = encoder.encode_image(inputs.to(device), normalize=True)
            loss = loss_of(head(inputs), batch_targets.to(device))
            where = f"epoch {epoch + 1}, step {len(losses) + 1}"
            check_loss(loss, stage, where, optimizer.param_groups[0]["lr"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            check_gradients(head, stage, where, optimizer.param_groups[0]["lr"])
            optimizer.step()
            losses.append(loss.item())
        history.append({"epoch": epoch + 1, "split": "train", "loss": float(np.mean(losses))})
        head.eval()
        if val_features is not None:
            if settings.finetune_tower:
                val_features = embeddings("val")
            with torch.no_grad():
                logits = head(val_features)
                val_targets = targets["val"].to(device)
                scores = score_of(logits, val_targets)
                history.append(
                    {"epoch": epoch + 1, "split": "val", "loss": loss_of(logits, val_targets).item(), **scores}
                )
            progress.set_postfix(
                loss=f"{history[-2]['loss']:.3f}", **{f"val_{k}": f"{v:.3f}" for k, v in scores.items()}
            )

    for part in (head, encoder) if settings.finetune_tower else (head,):
        check_parameters(part, stage, f"the end of epoch {settings.epochs}", optimizer.param_groups[0]["lr"])
    # Later measurements (the domain classifier's training regions, the finding classifier's thresholds) need the
    # final embeddings: the tower's own, when it was trained (val's were taken after the last epoch).
    return TrainedHead(history, embeddings("train") if settings.finetune_tower else train_features, val_features)


def publish_classifier(
    classifier: ImageClassifier, staging: Path, out: Path, settings: HeadTraining, device, manifest: dict
) -> Path:
    """Save a trained classifier into ``staging`` (with ``manifest`` and where its tower came from, its settings
    and device) and swap it in as ``out``: a killed run leaves the previous classifier, or none."""
    classifier.save(
        staging,
        {
            **manifest,
            "encoder_source": source_identity(settings.model, settings.checkpoint),
            "training": config_to_dict(settings),
            "trained_on": str(device),
        },
    )
    publish_directory(staging, out)
    logger.info("Trained the %s %s: %s", classifier.NAME, list(classifier.labels), out)
    return out
