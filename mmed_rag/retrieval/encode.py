"""Batched CLIP embeddings of reports and images, L2-normalised, as float32 NumPy arrays.

One place encodes for every consumer (the report index, batch retrieval, recall evaluation during fine-tuning),
so they all compare the same vectors: normalised, so that inner product is cosine similarity.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mmed_rag.data.images import load_image
from mmed_rag.progress import progress_bar


def embedding_dim(model: torch.nn.Module) -> int:
    """The width of the shared image-text embedding space (open_clip ViT and ModifiedResNet towers)."""
    return int(model.visual.output_dim)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _autocast(device: torch.device):
    # Half precision only where it pays (GPU); CPU stays fp32 so embeddings are exact and reproducible.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def encode_texts(
    model: torch.nn.Module,
    tokenizer: Callable[[Sequence[str]], torch.Tensor],
    texts: Sequence[str],
    batch_size: int = 256,
    progress: bool = True,
) -> np.ndarray:
    """Embed ``texts`` (truncated by the tokenizer to the model's context length, 77 tokens for CLIP).

    open_clip's tokenizer is pure Python; the next batch is tokenised in a thread while the model encodes the
    current one (torch releases the GIL), so tokenising costs little wall time on top of encoding.
    """
    device = _device_of(model)
    batches = [list(texts[start : start + batch_size]) for start in range(0, len(texts), batch_size)]
    chunks = []
    with ThreadPoolExecutor(max_workers=1) as tokenizing:
        upcoming = tokenizing.submit(tokenizer, batches[0]) if batches else None
        for index in progress_bar(
            range(len(batches)), desc="encoding reports", unit="batch", disable=not progress or len(batches) < 2
        ):
            tokens = upcoming.result().to(device)
            if index + 1 < len(batches):
                upcoming = tokenizing.submit(tokenizer, batches[index + 1])
            with _autocast(device):
                features = model.encode_text(tokens, normalize=True)
            chunks.append(features.float().cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, embedding_dim(model)), dtype=np.float32)


class ImageFileDataset(Dataset):
    """Images named by data-file paths, loaded safely inside ``image_root`` and preprocessed for CLIP."""

    def __init__(self, image_root: str | os.PathLike, paths: Sequence[str], preprocess: Callable):
        self.image_root = image_root
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.preprocess(load_image(self.image_root, self.paths[index]))


@torch.no_grad()
def embed_pixels(model: torch.nn.Module, pixels: torch.Tensor) -> np.ndarray:
    """Normalised embeddings of a batch of preprocessed images, on the model's device (autocast on GPU)."""
    device = _device_of(model)
    with _autocast(device):
        features = model.encode_image(pixels.to(device), normalize=True)
    return features.float().cpu().numpy()


@torch.no_grad()
def encode_images(
    model: torch.nn.Module,
    preprocess: Callable,
    image_root: str | os.PathLike,
    paths: Sequence[str],
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
) -> np.ndarray:
    """Embed the images at ``paths`` (relative to ``image_root``); a missing or broken image raises, naming it."""
    device = _device_of(model)
    loader = DataLoader(
        ImageFileDataset(image_root, paths, preprocess),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    batches = progress_bar(loader, desc="encoding images", unit="batch", disable=not progress or len(loader) < 2)
    chunks = [embed_pixels(model, pixels) for pixels in batches]
    return np.concatenate(chunks) if chunks else np.zeros((0, embedding_dim(model)), dtype=np.float32)
