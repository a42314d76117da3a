"""What every trainer-based stage does around ``trainer.train()``, written once for SFT and DPO.

A stage trains into ``checkpoints/<stage>/`` (the Trainer's ``checkpoint-*``) and publishes its result as one
directory, ``<stage>/``, with ``stage.json`` written last. Around that:

- **identity**: what decides the stage's result (base model, data hash, starting weights, the settings that
  change training) is saved with its checkpoints and its result; a rerun with another identity is refused with
  the differences named, never resumed or reused;
- **skip**: a published stage (``stage.json`` present, identity equal) is not trained again;
- **resume**: an interrupted stage continues from its last checkpoint;
- **publish**: the result is written to ``<stage>.partial`` and renamed into place, so a stage directory is
  complete or absent;
- **curves**: ``curves.png`` from the logged history (each stage kind draws its own; the val loss where measured).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmed_rag.atomic import atomic_write_text, publish_directory
from mmed_rag.errors import MMedRAGError

logger = logging.getLogger(__name__)

STAGE_MARKER = "stage.json"  # written last: a stage directory with it is complete
IDENTITY_FILE = "stage_identity.json"  # beside the checkpoints of a running stage
ARGS_FILE = "training_args.json"
LOG_FILE = "log_history.json"
CURVES_FILE = "curves.png"


class StageMismatchError(MMedRAGError, ValueError):
    """A finished stage or a checkpoint made with other inputs or settings than the run asks for."""


def is_complete(stage_dir: Path, weights_file: str) -> bool:
    """Whether ``stage_dir`` holds a published stage: its marker and its weights."""
    return (stage_dir / STAGE_MARKER).is_file() and (stage_dir / weights_file).is_file()


def check_identity(saved: dict[str, Any], wanted: dict[str, Any], where: Path) -> None:
    """Refuse ``where`` (a stage or its checkpoints) when it was made with another identity."""
    changed = [f"{key}: {saved.get(key)!r} -> {value!r}" for key, value in wanted.items() if saved.get(key) != value]
    if changed:
        raise StageMismatchError(
            f"{where} was made with other inputs or settings, so it is not reused: {'; '.join(changed)}. "
            f"Use another output directory, or delete {where} to redo it."
        )


def finished_summary(final: Path, identity: dict[str, Any], weights_file: str) -> dict[str, Any] | None:
    """The summary of a published stage with this identity (None when there is none); another identity raises."""
    if not is_complete(final, weights_file):
        return None
    summary = json.loads((final / STAGE_MARKER).read_text(encoding="utf-8"))
    check_identity(summary["identity"], identity, final)
    return summary


def last_checkpoint(checkpoints: Path, identity: dict[str, Any]) -> str | None:
    """The checkpoint to resume from (None: start), after checking it was made with this identity."""
    from transformers.trainer_utils import get_last_checkpoint

    resume = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    identity_file = checkpoints / IDENTITY_FILE
    if resume is not None and identity_file.is_file():
        check_identity(json.loads(identity_file.read_text(encoding="utf-8")), identity, checkpoints)
    return resume


def record_identity(checkpoints: Path, identity: dict[str, Any]) -> None:
    """Save the identity beside the checkpoints before training writes any (main process only)."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    atomic_write_text(checkpoints / IDENTITY_FILE, json.dumps(identity, indent=2) + "\n")


def publish_stage(
    trainer,
    final: Path,
    summary: dict[str, Any],
    plot: Callable[[list[dict], Path], None] | None = None,
    args_file: str = ARGS_FILE,
) -> None:
    """Save the trained model, the args, the log history, the curves and (last) ``stage.json`` as ``final``.

    Every rank calls it (ZeRO-3 gathers the weights in ``save_model``); only the main process writes.
    """
    staging = final.with_name(final.name + ".partial")
    if trainer.args.should_save:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    if trainer.args.should_save:
        history = trainer.state.log_history
        atomic_write_text(staging / args_file, trainer.args.to_json_string())
        atomic_write_text(staging / LOG_FILE, json.dumps(history, indent=1) + "\n")
        if plot is not None:
            plot(history, staging / CURVES_FILE)
        atomic_write_text(staging / STAGE_MARKER, json.dumps(summary, indent=2) + "\n")
        publish_directory(staging, final)
    trainer.accelerator.wait_for_everyone()


def plot_loss(history: list[dict], path: Path, title: str) -> None:
    """The training loss (with the val loss where measured) and learning rate per logged step (Agg canvas, no
    pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from mmed_rag.atomic import atomic_path

    logged = [entry for entry in history if "loss" in entry and "step" in entry]
    figure = Figure(figsize=(8, 3.4), layout="constrained")
    FigureCanvasAgg(figure)
    loss_ax, rate_ax = figure.subplots(1, 2)
    loss_ax.plot(
        [entry["step"] for entry in logged], [entry["loss"] for entry in logged], "o-", markersize=3, label="train"
    )
    validated = [entry for entry in history if "eval_loss" in entry and "step" in entry]
    if validated:
        steps, losses = [entry["step"] for entry in validated], [entry["eval_loss"] for entry in validated]
        loss_ax.plot(steps, losses, "s--", color="C2", markersize=5, label="val")
        loss_ax.legend()
    loss_ax.set(
        xlabel="step", ylabel="loss (answer tokens)", title="training and val loss" if validated else "training loss"
    )
    rated = [entry for entry in logged if "learning_rate" in entry]
    rate_ax.plot([entry["step"] for entry in rated], [entry["learning_rate"] for entry in rated], color="C1")
    rate_ax.set(xlabel="step", ylabel="learning rate", title="schedule")
    for axis in (loss_ax, rate_ax):
        axis.grid(alpha=0.3)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    figure.suptitle(title)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
