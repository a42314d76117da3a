"""The DAMON stages' configs: ``train-findings`` (the finding classifier), ``damon-diagnose`` and ``damon-eval``.

Apart from their code, so that building a stage's command line (and its ``--help``) imports neither torch nor
open_clip.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mmed_rag.classify.config import HeadTraining
from mmed_rag.config import ConfigError

DiagnosisLayout = Literal["diagnosis", "difference", "vqa"]


@dataclass(kw_only=True)
class TrainFindingsConfig(HeadTraining):
    """Arguments of ``mmed-rag train-findings``: a multi-label finding classifier from DAMON diagnosis files.

    Data are in the layout of DAMON's ``mimic_test_diagnosis.json``: ``id``, ``image``, ``caption`` (the image's
    label indices into ``labels``, comma-separated). ``labels`` is the label set, in index order; by default
    DAMON's 13 conditions. A label with fewer than ``min_positives`` positive training images is not trained: it is
    always predicted absent, and the classifier's manifest lists it.
    """

    train_file: str = field(metadata={"help": "diagnosis JSON (id, image, caption = label indices) to train on"})
    img_root: str = field(metadata={"help": "directory the files' image paths are relative to"})
    val_file: str = field(
        default="", metadata={"help": "diagnosis JSON the thresholds are calibrated on; if unset, val_fraction"}
    )
    val_fraction: float = field(
        default=0.1, metadata={"help": "share of the training images held out when val_file is unset"}
    )
    test_file: str = field(default="", metadata={"help": "diagnosis JSON evaluated once after training"})
    labels: tuple[str, ...] = field(
        default=(), metadata={"help": "the label set in index order (default: DAMON's 13 conditions)"}
    )
    min_positives: int = field(
        default=5, metadata={"help": "positive training images a label needs to be trained (else: always absent)"}
    )
    positive_weighting: Literal["balanced", "none"] = field(
        default="balanced",
        metadata={"help": "balanced: weight each label's positives by its negatives/positives ratio in the loss"},
    )
    threshold: float | None = field(
        default=None,
        metadata={"help": "one probability threshold for every label; default: per label, the val F1's best"},
    )
    out: str = field(default="finding-classifier", metadata={"help": "classifier directory to write"})

    def __post_init__(self) -> None:
        self.labels = tuple(self.labels)
        self.check_training()
        if not self.train_file or not self.img_root:
            raise ConfigError("train_file and img_root are required")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction: expected 0 <= val_fraction < 1, got {self.val_fraction}")
        if self.min_positives < 1:
            raise ConfigError(f"min_positives: expected at least 1, got {self.min_positives}")
        if self.threshold is not None and not 0 < self.threshold < 1:
            raise ConfigError(f"threshold: expected a probability in (0, 1), got {self.threshold}")
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"labels: each name once, got {list(self.labels)}")

    def read_paths(self) -> list[str | None]:
        """Every file or directory training reads: the output may be none of them."""
        return [self.train_file, self.val_file, self.test_file, self.img_root, self.model, self.checkpoint]


@dataclass
class DiagnoseConfig:
    """Arguments of ``mmed-rag damon-diagnose``: label every image of a DAMON file, by the classifier or the VLM.

    With a diagnosis file (``layout: diagnosis``), the labels are scored against its gold labels: per finding
    precision / recall / F1 beside the F1 that knows nothing of the image, and DAMON's diagnosis metrics.
    """

    data: str = field(metadata={"help": "a DAMON file: diagnosis (gold labels), difference or vqa layout"})
    img_root: str = field(metadata={"help": "directory the file's image paths are relative to"})
    out: str = field(metadata={"help": "directory to write: predictions.jsonl, metrics.json, metrics.md"})
    layout: DiagnosisLayout = field(default="diagnosis", metadata={"help": "the layout of data"})
    by: Literal["classifier", "vlm"] = field(
        default="classifier", metadata={"help": "classifier: the finding classifier; vlm: one question per condition"}
    )
    classifier: str = field(default="", metadata={"help": "finding classifier directory (by: classifier)"})
    model: str = field(default="", metadata={"help": "image-text-to-text model directory (by: vlm)"})
    labels: tuple[str, ...] = field(
        default=(), metadata={"help": "the label set in index order (by: vlm; default: DAMON's 13 conditions)"}
    )
    conditions: tuple[str, ...] = field(
        default=(), metadata={"help": "the conditions the VLM is asked about (by: vlm; default: every label)"}
    )
    max_new_tokens: int = field(default=4, metadata={"help": "tokens the VLM may answer with (by: vlm)"})
    batch_size: int = field(default=16, metadata={"help": "images (classifier) or questions (vlm) per batch"})
    device: str = field(default="auto", metadata={"help": "'auto' (CUDA when available), 'cpu', 'cuda', ..."})
    fresh: bool = field(
        default=False, metadata={"help": "start over: discard a partial predictions.jsonl or replace a finished one"}
    )

    def __post_init__(self) -> None:
        self.labels, self.conditions = tuple(self.labels), tuple(self.conditions)
        if self.by == "classifier" and not self.classifier:
            raise ConfigError("classifier: required with by: classifier (a train-findings directory)")
        if self.by == "vlm" and not self.model:
            raise ConfigError("model: required with by: vlm (an image-text-to-text model directory)")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ConfigError("batch_size and max_new_tokens: at least 1")


@dataclass
class DamonEvalConfig:
    """Arguments of ``mmed-rag damon-eval``: answer multi-image questions (with a preliminary diagnosis, or
    without) and score them per question type."""

    model: str = field(metadata={"help": "image-text-to-text model directory that takes several images"})
    data: str = field(
        metadata={"help": "questions: mimic_pair_questions.csv, or a DAMON file (difference or vqa layout)"}
    )
    img_root: str = field(metadata={"help": "directory the image paths are relative to"})
    out: str = field(metadata={"help": "directory to write: predictions.jsonl, metrics.json, metrics.md"})
    layout: Literal["mimic-diff-vqa", "difference", "vqa"] = field(
        default="mimic-diff-vqa", metadata={"help": "the layout of data"}
    )
    mimic_all: str = field(default="", metadata={"help": "mimic_all.csv (layout: mimic-diff-vqa)"})
    split: str = field(default="test", metadata={"help": "the CSV's split to answer (layout: mimic-diff-vqa)"})
    image_layout: Literal["tree", "flat"] = field(
        default="tree", metadata={"help": "MIMIC-CXR-JPG folder tree, or <dicom_id>.jpg in one folder"}
    )
    image_extension: str = field(default=".jpg", metadata={"help": "image file extension (layout: mimic-diff-vqa)"})
    question_types: tuple[str, ...] = field(
        default=(), metadata={"help": "answer only these question types (default: all)"}
    )
    diagnosis: str = field(
        default="",
        metadata={"help": "predictions.jsonl of damon-diagnose: its labels go into each prompt (default: none)"},
    )
    limit: int = field(default=0, metadata={"help": "answer the first N questions only (0: all)"})
    max_new_tokens: int = field(default=90, metadata={"help": "generated tokens at most (DAMON's evaluation: 90)"})
    batch_size: int = field(default=8, metadata={"help": "questions per generate call"})
    device: str = field(default="auto", metadata={"help": "'auto' (CUDA when available), 'cpu', 'cuda', ..."})
    fresh: bool = field(
        default=False, metadata={"help": "start over: discard a partial predictions.jsonl or replace a finished one"}
    )

    def __post_init__(self) -> None:
        self.question_types = tuple(self.question_types)
        if self.layout == "mimic-diff-vqa" and not self.mimic_all:
            raise ConfigError("mimic_all: required with layout mimic-diff-vqa (it resolves a study to its image)")
        if self.limit < 0 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ConfigError("limit >= 0; batch_size and max_new_tokens at least 1")


@dataclass
class DamonStudyConfig:
    """Arguments of ``mmed-rag damon-study``: DAMON on longitudinal phantoms, end to end, with a stand-in model."""

    out: str = field(default="damon-study", metadata={"help": "directory for everything the study makes"})
    patients: int = field(default=1000, metadata={"help": "synthetic patients (two films each)"})
    seed: int = field(default=0, metadata={"help": "seeds the phantoms, the stand-in model and its training"})
    findings_preset: str = field(
        default="configs/train-findings/phantoms.yaml",
        metadata={"help": "train-findings settings of the finding classifier (its data paths are the study's)"},
    )
    vision_epochs: int = field(default=15, metadata={"help": "epochs pretraining the stand-in's vision encoder"})
    mca_steps: int = field(default=100, metadata={"help": "SFT steps of MCA (captions)"})
    dca_steps: int = field(default=300, metadata={"help": "SFT steps of DCA (single-film questions)"})
    dsl_steps: int = field(default=1500, metadata={"help": "SFT steps of DSL (pair questions, with and without prior)"})
    dpm_steps: int = field(default=400, metadata={"help": "SFT steps of DPM (condition questions, DSL rehearsed)"})
    learning_rate: float = field(default=1e-3, metadata={"help": "SFT peak learning rate"})
    batch_size: int = field(default=16, metadata={"help": "SFT rows per step"})
    limit: int = field(default=0, metadata={"help": "questions per evaluation (0: every test question)"})
    fresh: bool = field(default=False, metadata={"help": "redo every step, even an unchanged one"})

    def __post_init__(self) -> None:
        if self.patients < 3:
            raise ConfigError("patients: at least 3")
        for name in ("vision_epochs", "mca_steps", "dca_steps", "dsl_steps", "dpm_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected at least 1, got {getattr(self, name)}")
