"""The preliminary diagnosis by a finding classifier, or by the VLM itself; both labelled and scored one way.

DAMON's prompt carries a preliminary diagnosis of each image. Two ways to get it:

- a **finding classifier** (``mmed-rag train-findings``): an :class:`~mmed_rag.classify.model.ImageClassifier`
  (the domain classifier's machinery: a standardised head on a CLIP tower's embeddings, frozen tower by default)
  with one sigmoid per finding instead of one softmax. Its labels are a configurable label set (DAMON's 13
  conditions by index by default; CheXpert's observations by name). A label with too few positive training
  images is not trained (always absent; the manifest lists it). Each label's probability threshold is
  calibrated on the val images (the one where the val F1 is highest), since the findings' prevalences differ
  and 0.5 suits none of them in particular;
- the **VLM** (DAMON's way, its DPM stage): one binary question per condition and image
  (:func:`mmed_rag.damon.diagnosis.condition_question`), its reply read by ``parse_condition_answer``; a reply
  that reads as neither 1 nor 0 counts as absent, and is counted.

``mmed-rag damon-diagnose`` labels every image of a DAMON file either way and, against a diagnosis file's gold
labels, scores both the same: per finding precision / recall / F1 beside the F1 of the best rule that does not
look at the image (calling every image positive: 2p / (1 + p) at prevalence p), and DAMON's own diagnosis metrics.

A finding classifier directory is :class:`~mmed_rag.classify.model.ImageClassifier`'s (``config.json`` names the
trained ``findings``, the whole ``label_set`` and each finding's threshold), with ``metrics.jsonl`` (loss and val
macro F1 by epoch), ``config.yaml``, ``f1_<split>.png`` and the data, metrics and untrained labels in the manifest.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from mmed_rag.atomic import atomic_write_text
from mmed_rag.classify.model import (
    METRICS_FILE,
    ClassifierError,
    ImageClassifier,
    ImageInput,
    StandardisedHead,
)
from mmed_rag.classify.training import LabelledImage, check_labelled, encode_labelled, publish_classifier, train_head
from mmed_rag.config import save_config
from mmed_rag.damon.configs import DiagnoseConfig, TrainFindingsConfig
from mmed_rag.damon.data import DAMON_CONDITIONS, read_damon_eval
from mmed_rag.damon.diagnosis import condition_question, diagnosis_metrics, parse_condition_answer
from mmed_rag.data.images import open_image, resolve_image_path
from mmed_rag.device import resolve_device
from mmed_rag.fingerprint import file_sha256, path_fingerprint
from mmed_rag.outputs import claim_outputs
from mmed_rag.progress import progress_bar
from mmed_rag.resumable import ResumableOutput
from mmed_rag.retrieval.clip import create_clip
from mmed_rag.retrieval.encode import embedding_dim
from mmed_rag.retrieval.finetune import split_records

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
RESUME_EVERY = 32  # images labelled between two durable appends to predictions.jsonl


class FindingError(ClassifierError):
    """Diagnosis data or a setting the finding classifier cannot use; the message says why."""


# -- the classifier --------------------------------------------------------------------------------------------


class FindingHead(StandardisedHead):
    """The standardised head with one logit per finding, and each finding's probability threshold."""

    def __init__(self, embed_dim: int, num_classes: int, hidden: int | None = None):
        super().__init__(embed_dim, num_classes, hidden)
        self.register_buffer("thresholds", torch.full((num_classes,), 0.5))


@dataclass(frozen=True)
class FindingPrediction:
    """One image's findings: indices into the label set, their names, and every trained finding's probability."""

    image: str | None
    labels: tuple[int, ...]
    names: tuple[str, ...]
    probabilities: dict[str, float]

    def to_dict(self) -> dict:
        return {
            "id": self.image,
            "labels": list(self.labels),
            "names": list(self.names),
            "probabilities": self.probabilities,
        }


class FindingClassifier(ImageClassifier):
    """A CLIP tower and a :class:`FindingHead`: images in, the findings each shows out (any number of them).

    ``findings`` are the trained labels (the head's outputs, in order), ``label_set`` every label by index (what
    predictions' indices point into). Create one with :func:`train_findings`, load it with :meth:`load`.
    """

    FORMAT_VERSION = 1
    LABELS_KEY = "findings"
    NAME = "finding classifier"
    TRAIN_COMMAND = "mmed-rag train-findings"

    def __init__(
        self,
        encoder: nn.Module,
        preprocess,
        head: FindingHead,
        findings: Sequence[str],
        label_set: Sequence[str],
        encoder_name: str = "",
        finetuned_tower: bool = False,
    ):
        super().__init__(encoder, preprocess, head, findings, encoder_name, finetuned_tower)
        self.label_set = tuple(label_set)
        unknown = sorted(set(findings) - set(label_set))
        if unknown:
            raise FindingError(f"findings {unknown} are not in the label set {list(label_set)}")

    @property
    def findings(self) -> tuple[str, ...]:
        return self.labels

    @property
    def thresholds(self) -> np.ndarray:
        return self.head.thresholds.cpu().numpy()

    def __repr__(self) -> str:
        return f"FindingClassifier({list(self.findings)}, {self._head_description()} head on {self.encoder_name})"

    def settings(self) -> dict:
        return {"label_set": list(self.label_set), "thresholds": [float(value) for value in self.thresholds]}

    @classmethod
    def new_head(cls, embed_dim: int, num_classes: int, hidden: int | None, state: dict) -> FindingHead:
        return FindingHead(embed_dim, num_classes, hidden)

    @classmethod
    def build(cls, encoder, preprocess, head, architecture: dict) -> FindingClassifier:
        return cls(
            encoder,
            preprocess,
            head,
            architecture["findings"],
            architecture["label_set"],
            architecture["encoder"]["model_name"],
        )

    def probabilities_of(self, features: np.ndarray) -> np.ndarray:
        """(images, findings): each finding's probability, from this tower's embeddings."""
        return torch.sigmoid(self.logits(features)).cpu().numpy()

    def label_sets(self, probabilities: np.ndarray) -> list[tuple[int, ...]]:
        """Each image's findings at the thresholds, as indices into the label set."""
        present = probabilities >= self.thresholds
        index = [self.label_set.index(name) for name in self.findings]
        return [tuple(sorted(index[col] for col in np.flatnonzero(row))) for row in present]

    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        image_root: str | os.PathLike | None = None,
        batch_size: int = 64,
    ) -> list[FindingPrediction]:
        """One :class:`FindingPrediction` per image (PIL images or paths, inside ``image_root`` when given)."""
        images = [images] if isinstance(images, (Image.Image, str, os.PathLike)) else list(images)
        probabilities = self.probabilities_of(self.embed(images, image_root, batch_size))
        predictions = []
        for image, row, labels in zip(images, probabilities, self.label_sets(probabilities), strict=True):
            predictions.append(
                FindingPrediction(
                    None if isinstance(image, Image.Image) else str(image),
                    labels,
                    tuple(self.label_set[label] for label in labels),
                    {name: round(float(p), 6) for name, p in zip(self.findings, row, strict=True)},
                )
            )
        return predictions


# -- thresholds and metrics ------------------------------------------------------------------------------------


def best_f1_threshold(probabilities: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """The threshold (a midpoint between two distinct probabilities) with the highest F1, and that F1.

    Without a positive there is nothing to calibrate on: 0.5, F1 0.
    """
    truth = truth.astype(bool)
    if not truth.any():
        return 0.5, 0.0
    values = np.unique(probabilities)
    candidates = np.concatenate([[values[0] - 1e-6], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-6]])
    best = (0.5, -1.0)
    for threshold in candidates:
        guess = probabilities >= threshold
        hits = np.sum(guess & truth)
        f1 = 2 * hits / (guess.sum() + truth.sum())
        if f1 > best[1]:
            best = (float(threshold), float(f1))
    return best


def chance_f1(prevalence: float) -> float:
    """The best F1 of a rule that does not look at the image: call every image positive (2p / (1 + p)).

    A random guess that calls a share q of images positive has F1 2pq / (p + q), which grows with q.
    """
    return 2 * prevalence / (1 + prevalence) if prevalence > 0 else 0.0


def finding_metrics(gold: Sequence[Sequence[int]], predicted: Sequence[Sequence[int]], label_set: Sequence[str],
                    findings: Sequence[str]) -> dict:  # fmt: skip
    """Per finding: precision, recall, F1, support and prevalence, with the image-blind F1 beside it; their
    macro means; the share of images whose label set (over ``findings``) is right; and DAMON's diagnosis metrics
    over ``findings`` (a label outside them, never trained or asked, would add only its always-absent score).

    ``gold`` and ``predicted`` hold each image's label indices into ``label_set``.
    """
    from sklearn.metrics import precision_recall_fscore_support

    if len(gold) != len(predicted) or not gold:
        raise ValueError(f"{len(predicted)} predictions for {len(gold)} images")
    per_finding = {}
    for name in findings:
        index = label_set.index(name)
        truth = np.array([index in labels for labels in gold])
        guess = np.array([index in labels for labels in predicted])
        precision, recall, f1, _ = precision_recall_fscore_support(
            truth, guess, labels=[True], average="binary", pos_label=True, zero_division=0
        )
        prevalence = float(truth.mean())
        per_finding[name] = {
            "precision": float(precision),
            "recall": float(recall),
            "f1": float(f1),
            "chance_f1": chance_f1(prevalence),
            "support": int(truth.sum()),
            "prevalence": prevalence,
        }
    position = {label_set.index(name): column for column, name in enumerate(findings)}
    gold_scored = [{position[label] for label in labels if label in position} for labels in gold]
    predicted_scored = [{position[label] for label in labels if label in position} for labels in predicted]
    exact = np.mean([g == p for g, p in zip(gold_scored, predicted_scored, strict=True)])
    return {
        "images": len(gold),
        "macro_f1": float(np.mean([scores["f1"] for scores in per_finding.values()])),
        "macro_chance_f1": float(np.mean([scores["chance_f1"] for scores in per_finding.values()])),
        "exact_match": float(exact),
        "per_finding": per_finding,
        "damon": diagnosis_metrics(
            [sorted(labels) for labels in gold_scored], [sorted(labels) for labels in predicted_scored], findings
        )["mean"],
    }


def describe(metrics: dict) -> str:
    """One log line for an evaluation."""
    return (
        f"macro F1 {metrics['macro_f1']:.3f} (image-blind {metrics['macro_chance_f1']:.3f}), exact label sets "
        f"{metrics['exact_match']:.3f} on {metrics['images']} images"
    )


def metrics_table(metrics: dict, title: str) -> str:
    """The per-finding scores as a Markdown table."""
    lines = [
        f"# {title}",
        "",
        describe(metrics) + ".",
        "",
        "| finding | prevalence | precision | recall | F1 | image-blind F1 |",
        "|---|---|---|---|---|---|",
    ]
    for name, scores in metrics["per_finding"].items():
        lines.append(
            f"| {name} | {scores['prevalence']:.3f} | {scores['precision']:.3f} | {scores['recall']:.3f} "
            f"| {scores['f1']:.3f} | {scores['chance_f1']:.3f} |"
        )
    damon = metrics["damon"]
    lines += [
        "",
        f"DAMON's diagnosis metrics (mean over the scored findings of each one's accuracy and macro P/R/F1 over "
        f"absent and present): accuracy {damon['accuracy']:.3f}, precision {damon['precision']:.3f}, recall "
        f"{damon['recall']:.3f}, F1 {damon['f1']:.3f}.",
    ]
    return "\n".join(lines) + "\n"


def plot_f1(metrics: dict, path: Path, title: str) -> None:
    from mmed_rag.eval.plots import bar_chart

    scores = metrics["per_finding"]
    bar_chart(
        path,
        {name: value["f1"] for name, value in scores.items()},
        title=title,
        ylabel="F1",
        baselines={name: value["chance_f1"] for name, value in scores.items()},
        baseline_label="image-blind (all positive)",
    )


# -- data ------------------------------------------------------------------------------------------------------


def read_diagnosis_images(
    path: str | os.PathLike, label_set: Sequence[str], img_root: str
) -> tuple[list[LabelledImage], list[tuple[int, ...]]]:
    """The images of a diagnosis file with their labels (names, and indices into ``label_set``), each once."""
    records = read_damon_eval(path, "diagnosis", labels=label_set, img_root=img_root).records
    if not records:
        raise FindingError(f"{path} holds no records.")
    images, gold = [], []
    for record in records:
        for image in record.images:
            names = tuple(label_set[label] for label in record.labels)
            images.append(LabelledImage(image, img_root, names, record.where))
            gold.append(record.labels)
    check_labelled(images, str(path), FindingError)
    seen: dict[LabelledImage, tuple[int, ...]] = {}
    for image, labels in zip(images, gold, strict=True):
        seen.setdefault(image, labels)
    return list(seen), list(seen.values())


def _targets(gold: Sequence[Sequence[int]], columns: Sequence[int]) -> torch.Tensor:
    return torch.tensor([[float(column in labels) for column in columns] for labels in gold], dtype=torch.float32)


# -- train-findings --------------------------------------------------------------------------------------------


def train_findings(config: TrainFindingsConfig) -> Path:
    """Train a finding classifier as ``config`` says and write it to ``config.out`` (swapped in whole)."""
    with claim_outputs("train-findings", replaced=[config.out], inputs=config.read_paths()):
        return _train_findings(config)


def _train_findings(config: TrainFindingsConfig) -> Path:
    device = resolve_device(config.device)
    label_set = config.labels or DAMON_CONDITIONS
    images, gold = {}, {}
    images["train"], gold["train"] = read_diagnosis_images(config.train_file, label_set, config.img_root)
    if config.val_file:
        images["val"], gold["val"] = read_diagnosis_images(config.val_file, label_set, config.img_root)
    elif config.val_fraction > 0:
        kept, held = split_records(range(len(images["train"])), config.val_fraction, config.seed)
        for split, rows in (("val", held), ("train", kept)):
            images[split], gold[split] = [images["train"][r] for r in rows], [gold["train"][r] for r in rows]
    if config.test_file:
        images["test"], gold["test"] = read_diagnosis_images(config.test_file, label_set, config.img_root)
    positives = {name: sum(index in labels for labels in gold["train"]) for index, name in enumerate(label_set)}
    findings = [name for name in label_set if positives[name] >= config.min_positives]
    untrained = {name: count for name, count in positives.items() if name not in findings}
    if not findings:
        raise FindingError(
            f"{config.train_file}: no label has {config.min_positives} positive training images "
            f"(counts: {positives}); lower min_positives or add data"
        )
    if untrained:
        logger.info("Labels with fewer than %d positive training images, always absent: %s", config.min_positives,
                    ", ".join(f"{name} ({count})" for name, count in untrained.items()))  # fmt: skip
    columns = [label_set.index(name) for name in findings]
    targets = {split: _targets(gold[split], columns) for split in images}

    torch.manual_seed(config.seed)
    encoder, preprocess_train, preprocess_val, _ = create_clip(config.model, config.checkpoint, device=device)
    head = FindingHead(embedding_dim(encoder), len(findings), config.hidden if config.head == "mlp" else None)
    head.to(device)
    positive = targets["train"].sum(dim=0)
    weight = (len(targets["train"]) - positive) / positive.clamp_min(1)
    pos_weight = weight.to(device) if config.positive_weighting == "balanced" else None

    def loss_of(logits: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(logits, truth, pos_weight=pos_weight)

    def score_of(logits: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
        guess, truth = logits > 0, truth.bool()
        hits = (guess & truth).sum(dim=0).float()
        f1 = 2 * hits / (guess.sum(dim=0) + truth.sum(dim=0)).clamp_min(1)
        return {"macro_f1": f1.mean().item()}

    trained = train_head(
        config, "train-findings", encoder, head, preprocess_train, preprocess_val, images, targets, loss_of, score_of
    )
    classifier = FindingClassifier(encoder, preprocess_val, head, findings, label_set, config.model,
                                   config.finetune_tower)  # fmt: skip
    # Each held-out split embedded once (val's already, by the training): thresholds and metrics both read them.
    probabilities = {
        split: classifier.probabilities_of(
            trained.val_features.cpu().numpy()
            if split == "val"
            else encode_labelled(encoder, preprocess_val, images[split], config.batch_size, config.workers)
        )
        for split in ("val", "test")
        if images.get(split)
    }
    calibration = _calibrate(classifier, probabilities.get("val"), targets.get("val"), config.threshold)
    out = Path(config.out)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    results = {}
    for split, found in probabilities.items():
        results[split] = finding_metrics(gold[split], classifier.label_sets(found), label_set, findings)
        plot_f1(results[split], staging / f"f1_{split}.png", f"finding classifier, {split} ({config.model})")
        logger.info("%s: %s", split, describe(results[split]))
    atomic_write_text(staging / METRICS_FILE, "".join(json.dumps(line) + "\n" for line in trained.history))
    save_config(config, staging)
    return publish_classifier(
        classifier,
        staging,
        out,
        config,
        device,
        {
            "data": {
                split: {"images": len(images[split]), "positives": targets[split].sum(dim=0).int().tolist()}
                for split in images
            },
            "sources": {
                name: {"path": path, "sha256": file_sha256(path)}
                for name, path in (("train", config.train_file), ("val", config.val_file), ("test", config.test_file))
                if path
            },
            "untrained": untrained,
            "calibration": calibration,
            "metrics": results,
        },
    )


def _calibrate(
    classifier: FindingClassifier, probabilities: np.ndarray | None, truth: torch.Tensor | None, fixed: float | None
) -> dict:
    """Set each finding's threshold: ``fixed`` for all, or the one with the best F1 on the val ``probabilities``."""
    if fixed is not None or probabilities is None:
        value = 0.5 if fixed is None else fixed
        classifier.head.thresholds.fill_(value)
        return {"rule": "fixed" if fixed is not None else "0.5 (no val images)", "thresholds": value}
    chosen = {}
    for column, name in enumerate(classifier.findings):
        threshold, f1 = best_f1_threshold(probabilities[:, column], truth[:, column].numpy())
        classifier.head.thresholds[column] = threshold
        chosen[name] = {"threshold": threshold, "val_f1": f1}
    return {"rule": "best val F1 per finding", "findings": chosen}


# -- damon-diagnose --------------------------------------------------------------------------------------------


def diagnose(config: DiagnoseConfig) -> dict:
    """Label every image of ``config.data`` (by the classifier or the VLM); score them against gold labels.

    Writes ``predictions.jsonl`` (resumable: the VLM asks one question per condition and image) and, for a
    diagnosis file, ``metrics.json``, ``metrics.md`` and ``f1.png``. Returns the metrics (empty without gold).
    """
    inputs = [config.data, config.img_root, config.classifier or config.model]
    with claim_outputs("damon-diagnose", directories=[config.out], inputs=inputs):
        return _diagnose(config)


def _diagnose(config: DiagnoseConfig) -> dict:
    if config.by == "classifier":
        classifier = FindingClassifier.load(config.classifier, config.device)
        label_set, findings = classifier.label_set, classifier.findings
    else:
        label_set = config.labels or DAMON_CONDITIONS
        findings = config.conditions or label_set
        unknown = sorted(set(findings) - set(label_set))
        if unknown:
            raise FindingError(f"conditions {unknown} are not in the label set {list(label_set)}")
    records = read_damon_eval(config.data, config.layout, labels=label_set, img_root=config.img_root).records
    gold_of: dict[str, tuple[int, ...]] = {}
    for record in records:
        for image in record.images:
            gold_of.setdefault(image, record.labels or ())
    images = list(gold_of)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    identity = {"data": file_sha256(config.data), "layout": config.layout, "by": config.by}
    if config.by == "classifier":
        identity["classifier"] = path_fingerprint(config.classifier)

        def label(todo: list[str]) -> list[dict]:
            found = classifier.predict(todo, image_root=config.img_root, batch_size=config.batch_size)
            return [prediction.to_dict() for prediction in found]

    else:
        identity |= {
            "model": path_fingerprint(config.model),
            "conditions": list(findings),
            "max_new_tokens": config.max_new_tokens,
        }
        generator = _vlm(config)

        def label(todo: list[str]) -> list[dict]:
            return vlm_labels(generator, todo, config.img_root, findings, label_set)

    predictions = _resumably(out / PREDICTIONS_FILE, identity, images, label, config.fresh)
    if config.layout != "diagnosis":
        return {}
    gold = [gold_of[image] for image in images]
    predicted = [tuple(predictions[image]["labels"]) for image in images]
    metrics = finding_metrics(gold, predicted, label_set, findings)
    if config.by == "vlm":
        metrics["unreadable_answers"] = sum(predictions[image]["unreadable"] for image in images)
    title = f"damon-diagnose by the {'finding classifier' if config.by == 'classifier' else 'VLM'}: {config.data}"
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    atomic_write_text(out / "metrics.md", metrics_table(metrics, title))
    plot_f1(metrics, out / "f1.png", title)
    logger.info("%s", describe(metrics))
    return metrics


def _resumably(output: Path, identity: dict, images: list[str], label, fresh: bool) -> dict[str, dict]:
    """Each image's prediction line, labelling (``label(images) -> lines``) only those an earlier run did not."""
    with ResumableOutput(output, identity, fresh=fresh) as sink:
        todo = [image for image in images if image not in sink.done]
        for start in progress_bar(range(0, len(todo), RESUME_EVERY), desc="damon-diagnose", unit="batch"):
            sink.append(label(todo[start : start + RESUME_EVERY]))
        sink.finish()
    lines = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    return {line["id"]: line for line in lines}


def _vlm(config: DiagnoseConfig):
    from mmed_rag.generation.generator import greedy_generator

    return greedy_generator(config.model, config.max_new_tokens, config.batch_size, config.device)


def vlm_labels(generator, images: Sequence[str], img_root: str, conditions: Sequence[str],
               label_set: Sequence[str]) -> list[dict]:  # fmt: skip
    """DAMON's way: ask the VLM about each condition in each image; one prediction line per image.

    A reply that reads as neither 1 nor 0 counts as absent, and is counted (``unreadable``).
    """
    lines = []
    for image in images:
        picture = open_image(resolve_image_path(img_root, image))
        prompts = [condition_question(condition) for condition in conditions]
        replies = generator.generate(prompts, [[picture]] * len(prompts))
        answers = {
            condition: parse_condition_answer(reply) for condition, reply in zip(conditions, replies, strict=True)
        }
        labels = tuple(sorted(label_set.index(condition) for condition, answer in answers.items() if answer == 1))
        lines.append(
            {
                "id": image,
                "labels": list(labels),
                "names": [label_set[label] for label in labels],
                "answers": dict(zip(conditions, replies, strict=True)),
                "unreadable": sum(answer is None for answer in answers.values()),
            }
        )
    return lines
