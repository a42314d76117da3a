"""Contrastive fine-tuning of one modality's CLIP retriever on (image, report) pairs, with recall@k validation.

MMed-RAG fine-tunes an open_clip model per modality (``hf-hub:thaottn/OpenCLIP-resnet50-CC12M``, batch 512,
lr 1e-4, AMP) with open_clip's own training script. This module does the same in one readable loop: open_clip's
:class:`~open_clip.loss.ClipLoss` and cosine schedule, AdamW without weight decay on gains, biases and the logit
scale, the logit scale clamped to ln(100). What it adds:

- every epoch ends in a complete checkpoint (``last/``) and rerunning the same command continues from it, with
  the same data order as an uninterrupted run (the randomness of epoch ``e`` is seeded by ``(seed, e)``), so a
  killed job loses at most one epoch and ends with the same weights;
- under torchrun, N processes (DDP, the loss over every process's features) train what one process with the
  whole batch trains, and only rank 0 validates and writes (:mod:`mmed_rag.retrieval.distributed`);
- validation reports recall@1/5/10 in both directions on held-out pairs (a report counts as retrieved when its
  text is the ground truth's, see :func:`retrieval_recall`), beside the recall of a random ranking;
- ``best/`` keeps the epoch with the best ``select_metric`` (default image -> report R@5: the direction MMed-RAG
  retrieves in, at about the depth it retrieves to; ties go to the lower val loss) as a retriever directory
  (:func:`~mmed_rag.retrieval.clip.save_clip`) whose manifest says what it was trained on and how well it did.

Layout of a run, ``<logs>/<name>/``::

    config.yaml        the resolved FinetuneConfig
    metrics.jsonl      one line per epoch ("split": "train") and per evaluation ("split": "val")
    curves.png         train/val loss and val recall by epoch, redrawn after every evaluation
    last/              save_clip files + trainer_state.pt (optimizer, scaler) + trainer_state.json (written last)
    best/              save_clip files of the best epoch: the retriever to index reports with
    tensorboard/       event files, when report_to asks for them
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from open_clip.loss import ClipLoss
from open_clip_train.scheduler import cosine_lr
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from mmed_rag.atomic import atomic_path, atomic_write_text, publish_directory
from mmed_rag.config import config_to_dict, save_config
from mmed_rag.data.images import ImageLoadError, ImagePathError, load_image, resolve_image_path
from mmed_rag.data.records import ImageReportRecord, read_retriever_train
from mmed_rag.divergence import DivergedError, check_gradients, check_loss, check_parameters
from mmed_rag.errors import MMedRAGError, first_few
from mmed_rag.fingerprint import file_sha256
from mmed_rag.jsonl import read_jsonl
from mmed_rag.outputs import claim_outputs
from mmed_rag.progress import progress_bar
from mmed_rag.retrieval.clip import WEIGHTS_FILE, create_clip, load_clip_weights, save_clip
from mmed_rag.retrieval.configs import FinetuneConfig
from mmed_rag.retrieval.distributed import RankBatches, World, contrastive_loss, joined_world
from mmed_rag.retrieval.encode import encode_images, encode_texts
from mmed_rag.retrieval.ranking import NonFiniteScoresError, any_in_top_k, check_finite, recall_at_k

logger = logging.getLogger(__name__)

KS = (1, 5, 10)
DIRECTIONS = ("image_to_report", "report_to_image")
RECALL_KEYS = tuple(f"{direction}_R@{k}" for direction in DIRECTIONS for k in KS)
STATE_FILE = "trainer_state.pt"
MARKER_FILE = "trainer_state.json"  # written last: a checkpoint without it is incomplete and never resumed from
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
# A change to any of these changes what the run computes, so resuming across it would mix two different runs. The
# data files are compared by content (sha256), not by path, so moved data still resumes. Raising `epochs` is
# allowed: it stretches the cosine schedule from the current step on. The batch of a step (batch_size x processes)
# must match too, but not how it is split: a run may resume on another number of processes.
RESUME_MUST_MATCH = (
    "model",
    "checkpoint",
    "dataset_type",
    "precision",
    "lr",
    "wd",
    "warmup",
    "seed",
    "select_metric",
    "gather_with_grad",
    "sync_bn",
)
LOGIT_SCALE_MAX = math.log(100)  # open_clip's clamp, as in the CLIP paper


class FinetuneError(MMedRAGError, ValueError):
    """Training data or a run directory that fine-tuning cannot use; the message says which and why."""


class ResumeMismatchError(FinetuneError):
    """The run directory holds a run made with a config that differs in a field that matters."""


# -- data ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """One training example: an image and the report of its record (a record with two views gives two pairs)."""

    image: str
    report: str
    record_id: str | int


def image_report_pairs(records: Sequence[ImageReportRecord]) -> list[Pair]:
    """One (image, report) pair per image path of each record, as the original loader builds them."""
    return [Pair(image, record.report, record.id) for record in records for image in record.images]


def split_records(records: Sequence, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out ``fraction`` of the records (at least one), chosen by ``seed``.

    Records, not pairs, are split: the views of one study must not sit on both sides, or validation would
    reward remembering a report seen in training with another view.
    """
    order = np.random.default_rng(seed).permutation(len(records))
    n_val = max(1, round(len(records) * fraction))
    held_out = set(order[:n_val].tolist())
    train = [record for i, record in enumerate(records) if i not in held_out]
    return train, [record for i, record in enumerate(records) if i in held_out]


class PairDataset(Dataset):
    """(pixels, tokens) of each pair: the image loaded safely and transformed, the report tokenized (77 tokens).

    The random augmentation of pair ``i`` is seeded by ``(seed, i)``: the same pixels whichever process, loader
    worker or batch position loads it, so N processes (or another number of workers) train on what one does.
    """

    def __init__(
        self,
        img_root: str | os.PathLike,
        pairs: Sequence[Pair],
        preprocess: Callable,
        tokenizer: Callable,
        seed: int = 0,
    ):
        self.img_root, self.pairs, self.preprocess, self.tokenizer = img_root, list(pairs), preprocess, tokenizer
        self.seed = seed

    def reseeded(self, seed: int) -> PairDataset:
        return PairDataset(self.img_root, self.pairs, self.preprocess, self.tokenizer, seed)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self.pairs[index]
        image = load_image(self.img_root, pair.image)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(np.random.SeedSequence([self.seed, index]).generate_state(1)[0]))
            pixels = self.preprocess(image)
        return pixels, self.tokenizer([pair.report])[0]


def check_images(img_root: str | os.PathLike, pairs: Sequence[Pair], data_file: str | os.PathLike) -> None:
    """Fail before training, not hours into it, when an image of the data file is missing or outside the root."""
    missing = []
    for pair in pairs:
        try:
            path = resolve_image_path(img_root, pair.image)
        except ImagePathError as error:
            raise ImagePathError(f"{data_file}, record {pair.record_id!r}: {error}") from None
        if not path.is_file():
            missing.append(f"record {pair.record_id!r}: {pair.image}")
    if missing:
        listed = first_few(missing, 5)
        raise ImageLoadError(f"{data_file}: {len(missing)} image(s) not found under {img_root}: {listed}")


def _read_records(path: str) -> tuple[list[ImageReportRecord], dict]:
    records = read_retriever_train(path).records
    if not records:
        raise FinetuneError(f"{path} holds no records.")
    return records, {"path": str(path), "sha256": file_sha256(path), "records": len(records)}


# -- metrics -------------------------------------------------------------------------------------------------


def retrieval_recall(
    image_features: np.ndarray, report_features: np.ndarray, image_report: np.ndarray, ks: Sequence[int] = KS
) -> dict[str, float]:
    """Recall@k both ways between images and the distinct reports of a val set.

    ``report_features`` holds one row per distinct report text and ``image_report[i]`` is the row of image
    ``i``'s report. Reports are compared by text: a retrieved report counts as right when its text equals the
    ground truth's, so two views of one study, or two studies with the same wording, share one candidate instead
    of pushing each other out of the top k. Image -> report ranks the distinct reports for each image;
    report -> image ranks the images for each distinct report and hits when any image of that report is in the
    top k. Features are L2-normalised, so the inner product is the cosine similarity. Ties count as broken at
    random, in expectation (:mod:`mmed_rag.retrieval.ranking`): a collapsed model scores chance, not 1.0; no sort,
    O(images x reports). Non-finite features raise :class:`~mmed_rag.retrieval.ranking.NonFiniteScoresError`.
    """
    check_finite(image_features, "validation image embeddings")
    check_finite(report_features, "validation report embeddings")
    similarity = image_features @ report_features.T  # (images, distinct reports)
    n_images, n_reports = similarity.shape
    right = similarity[np.arange(n_images), image_report]  # each image's score with its own report
    report_above = (similarity > right[:, None]).sum(axis=1)
    report_tied = (similarity == right[:, None]).sum(axis=1) - 1
    own = np.zeros_like(similarity, dtype=bool)
    own[np.arange(n_images), image_report] = True
    best_own_image = np.full(n_reports, -np.inf)  # each report's score with the closest of its own images
    np.maximum.at(best_own_image, image_report, right)
    image_above = (similarity > best_own_image[None, :]).sum(axis=0)  # never one of its own: they are <= best
    at_best = similarity == best_own_image[None, :]
    tied_own, tied_other = (at_best & own).sum(axis=0), (at_best & ~own).sum(axis=0)
    metrics = {}
    for k in ks:
        metrics[f"image_to_report_R@{k}"] = float(np.mean(recall_at_k(report_above, report_tied, k)))
        metrics[f"report_to_image_R@{k}"] = float(np.mean(any_in_top_k(image_above, tied_own, tied_other, k)))
    return {f"{direction}_R@{k}": metrics[f"{direction}_R@{k}"] for direction in DIRECTIONS for k in ks}


def chance_recall(image_report: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """Recall@k of a retriever that ranks at random, for the same val set (the floor to compare against)."""
    n_images = len(image_report)
    n_reports = int(image_report.max()) + 1
    images_per_report = np.bincount(image_report, minlength=n_reports)
    chance = {}
    for k in ks:
        chance[f"image_to_report_R@{k}"] = min(k, n_reports) / n_reports
        # P(at least one of a report's m images in a random top k of n) = 1 - C(n - m, k) / C(n, k)
        misses = [
            math.comb(n_images - m, k) / math.comb(n_images, k) if k <= n_images else 0.0 for m in images_per_report
        ]
        chance[f"report_to_image_R@{k}"] = float(1 - np.mean(misses))
    return chance


def selection_value(metrics: dict[str, float], select_metric: str) -> float:
    if select_metric == "mean_recall":
        return float(np.mean([metrics[key] for key in RECALL_KEYS]))
    return metrics[select_metric]


def select_best(best: dict | None, result: dict, epoch: int, select_metric: str) -> dict | None:
    """The new ``best`` entry when evaluation ``result`` beats ``best`` (ties go to the lower val loss), else None."""
    value = selection_value(result, select_metric)
    if best is not None and (value, -result["loss"]) <= (best["value"], -best["loss"]):
        return None
    recall = {key: result[key] for key in RECALL_KEYS}
    return {"epoch": epoch, "metric": select_metric, "value": value, "loss": result["loss"], "recall": recall}


def describe(result: dict) -> str:
    """One log line for an evaluation: val loss and image -> report recall against chance."""
    recall = "/".join(f"{result[f'image_to_report_R@{k}']:.3f}" for k in KS)
    chance = "/".join(f"{result[f'chance_image_to_report_R@{k}']:.3f}" for k in KS)
    return f"val loss {result['loss']:.4f}, image->report R@{'/'.join(map(str, KS))} {recall} (chance {chance})"


@torch.no_grad()
def evaluate(model, preprocess, tokenizer, img_root, pairs: Sequence[Pair], batch_size: int, workers: int) -> dict:
    """Val loss (ClipLoss over batches, as in training) and recall@k of ``pairs``; the model is left in eval mode."""
    model.eval()
    reports = list(dict.fromkeys(pair.report for pair in pairs))
    row_of = {report: row for row, report in enumerate(reports)}
    image_report = np.array([row_of[pair.report] for pair in pairs])
    image_features = encode_images(
        model,
        preprocess,
        img_root,
        [pair.image for pair in pairs],
        batch_size=batch_size,
        num_workers=workers,
        progress=False,
    )
    report_features = encode_texts(model, tokenizer, reports, batch_size=batch_size, progress=False)
    paired_images, paired_reports = torch.from_numpy(image_features), torch.from_numpy(report_features[image_report])
    scale = model.logit_scale.exp().float().cpu()
    loss, loss_fn = 0.0, ClipLoss()
    for start in range(0, len(pairs), batch_size):  # in-batch negatives, as in training; weighted by batch size
        batch = slice(start, start + batch_size)
        loss += float(loss_fn(paired_images[batch], paired_reports[batch], scale)) * len(pairs[batch])
    metrics = {"loss": loss / len(pairs), "images": len(pairs), "reports": len(reports)}
    metrics |= retrieval_recall(image_features, report_features, image_report)
    metrics["mean_recall"] = selection_value(metrics, "mean_recall")
    metrics |= {f"chance_{key}": value for key, value in chance_recall(image_report).items()}
    return metrics


# -- optimisation --------------------------------------------------------------------------------------------


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's rule: no weight decay on gains, biases, norms and the logit scale."""

    def exempt(name: str, param: torch.Tensor) -> bool:
        return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    return [
        {"params": [p for n, p in named if exempt(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exempt(n, p)], "weight_decay": weight_decay},
    ]


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s shuffling and augmentation: the same however the run got there."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def epoch_loader(dataset: PairDataset, per_rank: int, config: FinetuneConfig, epoch: int, world: World) -> DataLoader:
    """This process's share of the shuffled, full batches of epoch ``epoch`` (:class:`RankBatches`).

    The order and the augmentation (:class:`PairDataset`) depend on ``(seed, epoch)`` only, so a resumed run sees
    the same batches, and N processes together see the batches of one.
    """
    seed = epoch_seed(config.seed, epoch)
    torch.manual_seed(seed)  # anything else random in a step (dropout, where a model has it)
    batches = RankBatches(len(dataset), per_rank, world.rank, world.size, torch.Generator().manual_seed(seed))
    return DataLoader(
        dataset.reseeded(seed),
        batch_sampler=batches,
        generator=torch.Generator().manual_seed(seed),  # worker seeds; the global RNG is left alone
        num_workers=config.workers,
        pin_memory=world.device.type == "cuda",
    )


def _autocast(device: torch.device, precision: str):
    if precision == "amp":
        return torch.autocast(device.type, dtype=torch.float16)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


# -- run directory: checkpoints, metrics, curves -------------------------------------------------------------


def _staging(final: Path) -> Path:
    staging = final.with_name(final.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    return staging


def write_trainer_state(directory: Path, state: dict, optimizer, scaler) -> None:
    """Optimizer and scaler tensors, then the JSON marker that makes the checkpoint complete."""
    with atomic_path(directory / STATE_FILE) as tmp:
        torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()}, tmp)
    atomic_write_text(directory / MARKER_FILE, json.dumps(state, indent=2) + "\n")


def latest_checkpoint(run_dir: Path) -> tuple[Path, dict] | None:
    """The complete checkpoint with the most epochs: ``last/``, or a copy a kill left mid-swap."""
    complete = []
    for name in ("last", "last.partial", "last.previous"):
        marker = run_dir / name / MARKER_FILE
        if marker.is_file():
            complete.append((run_dir / name, json.loads(marker.read_text(encoding="utf-8"))))
    return max(complete, key=lambda found: found[1]["epochs_done"], default=None)


def _data_identity(data: dict) -> dict:
    """What makes two runs' data the same: the files' content and how validation pairs were chosen."""
    val = data.get("val", {})
    return {"train_data": data["train"]["sha256"], "val_data": val.get("sha256", val.get("held_out_from_train"))}


def _check_resumable(config: FinetuneConfig, state: dict, data: dict, processes: int, checkpoint_dir: Path) -> None:
    wanted = config_to_dict(config)
    saved = config_to_dict(FinetuneConfig()) | state["config"]  # fields added since the checkpoint: their defaults
    changed = [
        f"{name}: {saved[name]!r} -> {wanted[name]!r}" for name in RESUME_MUST_MATCH if saved[name] != wanted[name]
    ]
    saved_processes = state.get("processes", 1)
    if saved["batch_size"] * saved_processes != config.batch_size * processes:
        changed.append(
            f"pairs per step (batch_size x processes): {saved['batch_size']} x {saved_processes} -> "
            f"{config.batch_size} x {processes}"
        )
    saved_data, wanted_data = _data_identity(state["data"]), _data_identity(data)
    changed += [
        f"{name} (by content, sha256 or held-out fraction): {saved_data[name]!r} -> {wanted_data[name]!r}"
        for name in saved_data
        if saved_data[name] != wanted_data[name]
    ]
    if changed:
        raise ResumeMismatchError(
            f"{checkpoint_dir} was trained with a different config, so it cannot be continued: {'; '.join(changed)}. "
            f"Give the run another name (name=...) or delete {config.run_dir} to start over."
        )
    if state["epochs_done"] > config.epochs:
        raise ResumeMismatchError(
            f"{checkpoint_dir} has already trained {state['epochs_done']} epochs, more than epochs={config.epochs}."
        )


def _read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    return read_jsonl(path)


def _write_metrics(run_dir: Path, lines: list[dict]) -> None:
    text = "".join(json.dumps(line) + "\n" for line in lines)
    atomic_write_text(run_dir / METRICS_FILE, text)


def plot_curves(lines: list[dict], path: Path, title: str) -> None:
    """Loss and val recall by epoch (a Figure on its own Agg canvas: no pyplot state, safe in any thread)."""
    figure = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(figure)
    loss_ax, recall_ax = figure.subplots(1, 2)
    train = [line for line in lines if line["split"] == "train"]
    val = [line for line in lines if line["split"] == "val"]
    loss_ax.plot([line["epoch"] for line in train], [line["loss"] for line in train], "o-", label="train")
    loss_ax.plot([line["epoch"] for line in val], [line["loss"] for line in val], "s-", label="val")
    loss_ax.set(xlabel="epoch", ylabel="contrastive loss", title="loss")
    # Colour says k, line style and marker say the direction; each k's chance level is drawn in its colour.
    for direction, style, marker in zip(DIRECTIONS, ("-", "--"), ("o", "s"), strict=True):
        for k, colour in zip(KS, ("C0", "C1", "C2"), strict=True):
            recall_ax.plot(
                [line["epoch"] for line in val],
                [line[f"{direction}_R@{k}"] for line in val],
                linestyle=style,
                color=colour,
                marker=marker,
                markerfacecolor=colour if style == "-" else "white",
                label=f"{direction.replace('_', ' ')} R@{k}",
            )
    if val:
        for k, colour in zip(KS, ("C0", "C1", "C2"), strict=True):
            recall_ax.axhline(
                val[-1][f"chance_image_to_report_R@{k}"],
                color=colour,
                linestyle=":",
                linewidth=1,
                label=f"chance R@{k}",
            )
    recall_ax.set(xlabel="epoch", ylabel="recall", ylim=(0, 1.02), title="validation recall")
    loss_ax.legend(fontsize=7, loc="upper right")
    recall_ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=3, handlelength=3)
    for ax in (loss_ax, recall_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    figure.suptitle(title)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)


class _Trackers:
    """TensorBoard and/or wandb, as ``report_to`` asks; nothing at all when it is empty."""

    def __init__(self, config: FinetuneConfig, run_dir: Path, enabled: bool = True):
        self.writer = self.wandb_run = None
        targets = config.report_targets if enabled else []
        if "tensorboard" in targets:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if "wandb" in targets:
            import wandb

            self.wandb_run = wandb.init(
                project=config.wandb_project, name=run_dir.name, dir=str(run_dir), config=config_to_dict(config)
            )

    def log(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


# -- the stage -----------------------------------------------------------------------------------------------


def load_pairs(config: FinetuneConfig) -> tuple[list[Pair], list[Pair], dict]:
    """Training and validation pairs, and what the manifest records about the data (paths, sha256, counts).

    Validation pairs come from ``val_data`` or, without it, from a seeded hold-out of ``train_data``'s records.
    Every image is checked before any training starts.
    """
    train_records, train_info = _read_records(config.train_data)
    data = {"train": train_info}
    if config.val_data:
        val_records, data["val"] = _read_records(config.val_data)
    elif config.val_fraction > 0:
        train_records, val_records = split_records(train_records, config.val_fraction, config.seed)
        data["val"] = {"held_out_from_train": config.val_fraction, "records": len(val_records)}
    else:
        val_records = []
    train_pairs, val_pairs = image_report_pairs(train_records), image_report_pairs(val_records)
    check_images(config.img_root, train_pairs, config.train_data)
    check_images(config.img_root, val_pairs, config.val_data or config.train_data)
    data["train"].update(records=len(train_records), pairs=len(train_pairs))
    if val_pairs:
        data["val"]["pairs"] = len(val_pairs)
    return train_pairs, val_pairs, data


def _resume(config: FinetuneConfig, data: dict, processes: int, model, optimizer, scaler) -> tuple[int, dict | None]:
    """Load the latest complete checkpoint of the run, if any; return (epochs done, best so far)."""
    found = latest_checkpoint(config.run_dir)
    if found is None:
        return 0, None
    checkpoint_dir, state = found
    _check_resumable(config, state, data, processes, checkpoint_dir)
    load_clip_weights(model, checkpoint_dir / WEIGHTS_FILE)
    device = next(model.parameters()).device
    tensors = torch.load(checkpoint_dir / STATE_FILE, map_location=device, weights_only=True)
    optimizer.load_state_dict(tensors["optimizer"])
    scaler.load_state_dict(tensors["scaler"])
    if state["config"]["epochs"] != config.epochs:
        logger.warning(
            "epochs changed from %d to %d: the cosine schedule is stretched from epoch %d on.",
            state["config"]["epochs"],
            config.epochs,
            state["epochs_done"] + 1,
        )
    logger.info("Resuming %s after epoch %d of %d.", config.run_dir, state["epochs_done"], config.epochs)
    return state["epochs_done"], state["best"]


def _save_epoch(config, model, manifest: dict, state: dict, optimizer, scaler, improved: bool) -> None:
    """``best/`` (when this epoch is the best) then ``last/``, each written aside and swapped in complete.

    In that order, a kill between the two re-runs this epoch on resume, which writes the same ``best/`` again.
    """
    run_dir = config.run_dir
    if improved:
        staging = _staging(run_dir / "best")
        save_clip(model, staging, config.model, {**manifest, "best": state["best"]})
        publish_directory(staging, run_dir / "best")
    staging = _staging(run_dir / "last")
    save_clip(model, staging, config.model, {**manifest, "epoch": state["epochs_done"]})
    write_trainer_state(staging, state, optimizer, scaler)
    publish_directory(staging, run_dir / "last")


def _per_process_batch(config: FinetuneConfig, n_pairs: int, processes: int) -> int:
    """``batch_size``, lowered when the data holds fewer than ``batch_size x processes`` pairs."""
    per_process = min(config.batch_size, n_pairs // processes)
    if per_process * processes < 2:
        raise FinetuneError(
            f"{config.train_data}: a contrastive batch needs at least 2 pairs, found {n_pairs} for {processes} "
            "process(es)."
        )
    if per_process < config.batch_size:
        logger.warning(
            "Only %d training pairs: batch size lowered from %d to %d per process.",
            n_pairs,
            config.batch_size,
            per_process,
        )
    return per_process


def _synchronised_batch_norm(model: torch.nn.Module, config: FinetuneConfig, world: World) -> torch.nn.Module:
    """The model with batch norm statistics over the whole step's batch, as one process computes them.

    A ResNet tower (the original's RN50) normalises with the statistics of its batch; on N processes each would
    see only its own pairs. SyncBatchNorm runs on CUDA only; ``sync_bn=False`` keeps per-process statistics
    (open_clip's default).
    """
    has_batch_norm = any(isinstance(module, torch.nn.modules.batchnorm._BatchNorm) for module in model.modules())
    if world.size == 1 or not has_batch_norm or not config.sync_bn:
        return model
    if world.device.type != "cuda":
        raise FinetuneError(
            f"{config.model} has batch norm layers, whose statistics N processes share through SyncBatchNorm, which "
            "runs on CUDA only; pass --no-sync-bn to let each process normalise its own pairs."
        )
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def finetune_clip(config: FinetuneConfig) -> Path:
    """Fine-tune ``config.model`` on ``config.train_data``; return the best retriever's directory (``best/``).

    Rerunning with the same ``logs``/``name`` continues from the last complete epoch; a run that is already
    complete returns at once. The returned directory loads with :func:`~mmed_rag.retrieval.clip.load_clip`.
    Training reseeds torch's global RNG (``seed``, then ``(seed, epoch)`` every epoch).

    Under torchrun every process calls this and they train as one (:mod:`mmed_rag.retrieval.distributed`): each
    takes ``batch_size`` pairs of every step, DDP averages the gradients, and rank 0 alone validates and writes
    the run directory while the others wait. N processes with ``batch_size`` b train what one process with
    ``batch_size`` N x b trains (equal up to float rounding), and resume from each other's checkpoints.
    """
    inputs = [config.train_data, config.val_data, config.img_root, config.model, config.checkpoint]
    with joined_world(config.device, config.dist_timeout) as world, contextlib.ExitStack() as claimed:
        with world.all_or_none("claiming the run directory"):  # rank 0 locks it; the others check it
            claimed.enter_context(
                claim_outputs("finetune-clip", directories=[config.run_dir], inputs=inputs, lock=world.is_main)
            )
        return _finetune_clip(config, world)


def _finetune_clip(config: FinetuneConfig, world: World) -> Path:
    for name in ("train_data", "img_root", "dataset_type"):
        if not getattr(config, name):
            raise FinetuneError(f"{name} is required (see `mmed-rag finetune-clip --help`).")
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", config.run_dir.name):
        raise FinetuneError(
            f"run name {config.run_dir.name!r}: expected a plain directory name (letters, digits, _.-)."
        )
    device, precision = world.device, config.precision
    if precision == "amp" and device.type != "cuda":
        logger.info("precision=amp needs CUDA; training in fp32 on %s.", device)
        precision = "fp32"
    with world.all_or_none("preparing the run"):
        train_pairs, val_pairs, data = load_pairs(config)
        per_process = _per_process_batch(config, len(train_pairs), world.size)
        torch.manual_seed(config.seed)  # the random init of a model created without weights
        model, preprocess_train, preprocess_val, tokenizer = create_clip(config.model, config.checkpoint, device=device)
        model = _synchronised_batch_norm(model, config, world)
        optimizer = torch.optim.AdamW(param_groups(model, config.wd), lr=config.lr)
        scaler = torch.amp.GradScaler("cuda", enabled=precision == "amp")
        start_epoch, best = _resume(config, data, world.size, model, optimizer, scaler)
    if len(set(world.gather(start_epoch))) > 1:
        raise FinetuneError(
            f"the processes found different checkpoints in {config.run_dir}: the run directory must be on a "
            "filesystem that every process sees."
        )
    if start_epoch == config.epochs:
        logger.info("%s has already trained all %d epochs.", config.run_dir, config.epochs)
        return config.run_dir / "best"
    batch_size = per_process * world.size  # the pairs of one step, over all processes
    steps_per_epoch = len(train_pairs) // batch_size  # drop_last, as open_clip: every contrastive batch is full
    schedule = cosine_lr(optimizer, config.lr, config.warmup, steps_per_epoch * config.epochs)
    loss_fn = contrastive_loss(world, config.local_loss, config.gather_with_grad)
    trainer = model  # what the step calls: the model, or DDP around it (which averages the gradients)
    if world.size > 1:
        trainer = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    metrics = []
    if world.is_main:
        # Lines of epochs past the checkpoint (logged just before a kill) are dropped: those epochs run again.
        metrics = [line for line in _read_metrics(config.run_dir) if line["epoch"] <= start_epoch]
        save_config(config, config.run_dir)
    train_set = PairDataset(config.img_root, train_pairs, preprocess_train, tokenizer)
    manifest = {
        "modality": config.dataset_type,
        "data": data,
        "training": config_to_dict(config),
        "trained_on": {"device": device.type, "precision": precision, "processes": world.size, "batch": batch_size},
    }
    trackers = _Trackers(config, config.run_dir, enabled=world.is_main)
    try:
        for epoch in range(start_epoch, config.epochs):
            loader = epoch_loader(train_set, per_process, config, epoch, world)
            trainer.train()
            started, losses = time.perf_counter(), []
            for pixels, tokens in (
                progress := progress_bar(
                    loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, disable=not world.is_main
                )
            ):
                step = epoch * steps_per_epoch + len(losses)
                lr = schedule(step)
                with _autocast(device, precision):
                    image_features, text_features, logit_scale = trainer(pixels.to(device), tokens.to(device))
                    loss = loss_fn(image_features, text_features, logit_scale)
                where = f"epoch {epoch + 1}, step {step + 1}"
                step_loss = world.mean(loss).item()  # the step's loss over every process: one process's loss
                check_loss(step_loss, "finetune-clip", where, lr)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if not scaler.is_enabled():  # AMP's scaler skips steps with inf/NaN gradients itself
                    check_gradients(model, "finetune-clip", where, lr)
                scaler.step(optimizer)
                scaler.update()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
                losses.append(step_loss)
                progress.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr:.2e}")
                trackers.log({"train/loss": losses[-1], "train/lr": lr, "train/logit_scale": logit_scale.item()}, step)
            done, step = epoch + 1, (epoch + 1) * steps_per_epoch
            check_parameters(model, "finetune-clip", f"the end of epoch {done}", lr)
            line = {"epoch": done, "step": step, "split": "train", "loss": float(np.mean(losses)), "lr": lr}
            with world.all_or_none(f"the end of epoch {done} (validation, checkpoint)"):
                if world.is_main:  # the others wait for it here
                    metrics.append(line | {"seconds": round(time.perf_counter() - started, 3)})
                    logger.info("epoch %d/%d: train loss %.4f", done, config.epochs, line["loss"])
                    improved = not val_pairs  # without validation data, the latest epoch is the best there is
                    if improved:
                        best = {"epoch": done, "metric": "latest epoch (no validation data)"}
                    elif done % config.val_frequency == 0 or done == config.epochs:
                        result = _validate(config, model, preprocess_val, tokenizer, val_pairs, batch_size, done)
                        metrics.append({"epoch": done, "step": step, "split": "val", **result})
                        trackers.log({f"val/{key}": value for key, value in result.items()}, step)
                        logger.info("epoch %d/%d: %s", done, config.epochs, describe(result))
                        new_best = select_best(best, result, done, config.select_metric)
                        improved, best = new_best is not None, new_best or best
                        plot_curves(metrics, config.run_dir / CURVES_FILE, f"{config.dataset_type}: {config.model}")
                    _write_metrics(config.run_dir, metrics)
                    state = {"epochs_done": done, "step": step, "best": best, "processes": world.size}
                    state |= {"config": config_to_dict(config), "data": data}
                    _save_epoch(config, model, manifest, state, optimizer, scaler, improved)
    finally:
        trackers.close()
    if world.is_main:
        logger.info(
            "Fine-tuned the %s retriever: %s (best epoch %d)",
            config.dataset_type,
            config.run_dir / "best",
            best["epoch"],
        )
    return config.run_dir / "best"


def _validate(config: FinetuneConfig, model, preprocess, tokenizer, pairs, batch_size: int, epoch: int) -> dict:
    try:
        return evaluate(model, preprocess, tokenizer, config.img_root, pairs, batch_size, config.workers)
    except NonFiniteScoresError as error:
        raise DivergedError(f"finetune-clip diverged: {error}, at the validation of epoch {epoch}") from None
