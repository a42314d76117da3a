"""The domain classifier stages' configs (``train-domain``, ``predict-domain``) and the checks they share with it.

Apart from the classifier's code, so that building a stage's command line (and its ``--help``) imports neither
torch nor open_clip.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from mmed_rag.classify.config import HeadTraining
from mmed_rag.config import ConfigError
from mmed_rag.domain.routing import UNKNOWN

DEFAULT_MAX_DISTANCE = 1.05


def check_limits(threshold: float, max_distance: float | None) -> None:
    """A ValueError unless ``threshold`` is a probability and ``max_distance`` positive (or None: no limit)."""
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold: expected a probability in [0, 1], got {threshold!r}")
    if max_distance is not None and not max_distance > 0:
        raise ValueError(f"max_distance: expected a positive number (or None: no limit), got {max_distance!r}")


def parse_assignments(entries: Sequence[str] | Mapping[str, str], name: str) -> dict[str, str]:
    """``["radiology=a.json", ...]`` (or a mapping) as ``{"radiology": "a.json", ...}``, in the given order."""
    if isinstance(entries, Mapping):
        entries = [f"{key}={value}" for key, value in entries.items()]
    parsed: dict[str, str] = {}
    for entry in entries:
        modality, sep, value = str(entry).partition("=")
        modality, value = modality.strip(), value.strip()
        if not sep or not modality or not value:
            raise ConfigError(f"{name}: expected 'modality=path' entries, got {entry!r}")
        if modality == UNKNOWN:
            raise ConfigError(f"{name}: {UNKNOWN!r} is reserved for images the classifier cannot place")
        if modality in parsed:
            raise ConfigError(f"{name}: modality {modality!r} is given twice")
        parsed[modality] = value
    return parsed


@dataclass(kw_only=True)
class TrainDomainConfig(HeadTraining):
    """Arguments of ``mmed-rag train-domain``.

    ``train_files`` labels images by file: ``["radiology=rad_train.json", "pathology=path_train.json"]`` (on the
    command line ``--train-files radiology=rad_train.json pathology=path_train.json``; from Python a mapping
    works too). Its order is the label order.
    """

    train_files: tuple[str, ...] = field(
        metadata={"help": "modality=data-file entries, one per modality, e.g. radiology=radiology_train.json"}
    )
    img_root: str = field(default="", metadata={"help": "directory the data files' image paths are relative to"})
    img_roots: tuple[str, ...] = field(
        default=(), metadata={"help": "modality=directory entries: a modality's own image root (overrides img_root)"}
    )
    val_files: tuple[str, ...] = field(
        default=(), metadata={"help": "modality=data-file entries for validation; if unset, val_fraction is held out"}
    )
    val_fraction: float = field(
        default=0.1, metadata={"help": "share of each modality's training records held out when val_files is unset"}
    )
    test_files: tuple[str, ...] = field(
        default=(), metadata={"help": "modality=data-file entries evaluated once after training (held-out figures)"}
    )
    class_weighting: Literal["balanced", "none"] = field(
        default="balanced",
        metadata={"help": "balanced: weight the loss by inverse modality frequency, so no modality is a default"},
    )
    threshold: float = field(
        default=0.5, metadata={"help": "default probability below which an image is predicted 'unknown'"}
    )
    max_distance: float | None = field(
        default=DEFAULT_MAX_DISTANCE,
        metadata={
            "help": "default distance from the best guess's nearest training image above which an image is "
            "'unknown' (1: the 99.5th percentile of the training images' own; null or inf: no limit)"
        },
    )
    out: str = field(default="domain-classifier", metadata={"help": "classifier directory to write"})

    def __post_init__(self) -> None:
        for name in ("train_files", "img_roots", "val_files", "test_files"):
            value = getattr(self, name)  # a mapping from Python, a list from YAML
            entries = [f"{k}={v}" for k, v in value.items()] if isinstance(value, Mapping) else value
            setattr(self, name, tuple(entries))
        modalities = list(self.train_paths)
        if len(modalities) < 2:
            raise ConfigError(f"train_files: a classifier needs at least 2 modalities, got {modalities}")
        for name in ("img_roots", "val_files", "test_files"):
            extra = set(parse_assignments(getattr(self, name), name)) - set(modalities)
            if extra:
                raise ConfigError(f"{name}: modalities {sorted(extra)} are not in train_files ({modalities})")
        rootless = [m for m in modalities if not self.img_root and m not in self.roots]
        if rootless:
            raise ConfigError(f"img_root: required (or img_roots entries for {rootless})")
        self.check_training()
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction: expected 0 <= val_fraction < 1, got {self.val_fraction}")
        try:
            check_limits(self.threshold, self.max_distance)
        except ValueError as error:
            raise ConfigError(str(error)) from None

    @property
    def train_paths(self) -> dict[str, str]:
        return parse_assignments(self.train_files, "train_files")

    @property
    def roots(self) -> dict[str, str]:
        return parse_assignments(self.img_roots, "img_roots")

    def root_of(self, modality: str) -> str:
        return self.roots.get(modality, self.img_root)

    def read_paths(self) -> list[str | None]:
        """Every file or directory training reads: the output may be none of them."""
        files = [parse_assignments(getattr(self, name), name) for name in ("train_files", "val_files", "test_files")]
        paths = [path for assigned in files for path in assigned.values()]
        return [*paths, self.img_root, *self.roots.values(), self.model, self.checkpoint]


@dataclass
class PredictDomainConfig:
    """Arguments of ``mmed-rag predict-domain``: the images (or a data file's), and where to write predictions."""

    classifier: str = field(metadata={"help": "classifier directory written by train-domain"})
    images: tuple[str, ...] = field(default=(), metadata={"help": "image files (relative to img_root, if given)"})
    data: str | None = field(
        default=None, metadata={"help": "a data file (any release format): predict each image it names, once"}
    )
    img_root: str = field(default="", metadata={"help": "directory the image paths are relative to"})
    threshold: float | None = field(
        default=None, metadata={"help": "probability below which an image is 'unknown' (default: the classifier's)"}
    )
    max_distance: float | None = field(
        default=None,
        metadata={"help": "distance above which an image is 'unknown' (default: the classifier's; inf: no limit)"},
    )
    output: str | None = field(
        default=None, metadata={"help": "JSONL file to write: one {image, modality, probability, ...} line per image"}
    )
    batch_size: int = field(default=64, metadata={"help": "images encoded per batch"})
    device: str = field(default="auto", metadata={"help": "'auto' (CUDA when available), 'cpu', 'cuda', ..."})

    def __post_init__(self) -> None:
        self.images = tuple(self.images)
        if bool(self.images) == bool(self.data):
            raise ConfigError("give either images or data (a data file), not both and not neither")
        if self.data and not self.img_root:
            raise ConfigError("img_root: required with data (the data file's image paths are relative to it)")
        try:
            check_limits(0.5 if self.threshold is None else self.threshold, self.max_distance)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: expected at least 1, got {self.batch_size}")
