"""The settings every image classifier trains with: tower, head and the head's training.

Apart from the classifiers' code, so that building a stage's command line (and its ``--help``) imports neither
torch nor open_clip. Each classifier's config (``train-domain``, ``train-findings``) extends :class:`HeadTraining`
with its data and its decision rule, so a default here is the one default of both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mmed_rag.config import ConfigError

HeadKind = Literal["linear", "mlp"]


@dataclass
class HeadTraining:
    """The tower the embeddings come from, the head on them, and how the head (and optionally the tower) trains."""

    model: str = field(
        default="hf-hub:thaottn/OpenCLIP-resnet50-CC12M",
        metadata={"help": "the image tower: a retriever directory, an open_clip name, or a local hf-hub: copy"},
    )
    checkpoint: str | None = field(default=None, metadata={"help": "weights to load into model instead of its own"})
    head: HeadKind = field(default="linear", metadata={"help": "linear layer, or an MLP with one hidden layer"})
    hidden: int = field(default=256, metadata={"help": "hidden width of the mlp head"})
    finetune_tower: bool = field(
        default=False, metadata={"help": "train the tower too (slower: images are encoded every epoch)"}
    )
    epochs: int = field(default=30, metadata={"help": "passes over the training images"})
    batch_size: int = field(default=64, metadata={"help": "images per step"})
    lr: float = field(default=1e-2, metadata={"help": "AdamW learning rate of the head"})
    tower_lr: float = field(default=1e-5, metadata={"help": "AdamW learning rate of the tower (finetune_tower)"})
    wd: float = field(default=1e-2, metadata={"help": "AdamW weight decay (not on gains, biases and norms)"})
    workers: int = field(default=0, metadata={"help": "data loader worker processes (0: load in the main process)"})
    seed: int = field(
        default=0, metadata={"help": "seeds the random init (head, and a tower without weights), val split, data order"}
    )
    device: str = field(default="auto", metadata={"help": "'auto' (CUDA when available), 'cpu', 'cuda', ..."})

    def check_training(self) -> None:
        """A ConfigError for a setting no training can run with."""
        for name in ("epochs", "batch_size", "hidden"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected at least 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise ConfigError(f"workers: expected >= 0, got {self.workers}")
