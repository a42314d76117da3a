"""Training that diverged (a NaN or infinite loss, gradient or weight) stops at once, and publishes nothing.

A learning rate a few orders too high, or fp16 overflow, turns a run's numbers into NaN within a step. Left
alone, every later step trains on NaN, validation scores NaN as a perfect match (NaN compares false), and the
run publishes a ``best/`` model that answers nothing. So every training stage checks its loss and gradients
each step (before the optimizer applies them) and its weights before anything is written, and stops with one
line naming the stage, where it was and the learning rate. What was published before, from finite weights,
stays; a resumed run starts from those.

``finetune-clip`` and ``train-domain`` call :func:`check_loss` and :func:`check_parameters` in their loops;
trainer-based stages (``train-dpo``) add :class:`StopOnDivergence` to their callbacks.
"""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback

from mmed_rag.errors import MMedRAGError, first_few


class DivergedError(MMedRAGError):
    """Training produced a NaN or infinite loss, gradient or weight."""


def _diverged(stage: str, what: str, where: str, lr: float | None) -> DivergedError:
    rate = f", learning rate {lr:.3g}" if lr is not None else ""
    return DivergedError(
        f"{stage} diverged: {what} at {where}{rate}; nothing of it was saved (lower the learning rate)"
    )


def check_loss(loss: torch.Tensor | float, stage: str, where: str, lr: float | None = None) -> None:
    """Raise :class:`DivergedError` when ``loss`` is NaN or infinite."""
    value = float(loss.detach() if isinstance(loss, torch.Tensor) else loss)
    if not math.isfinite(value):
        raise _diverged(stage, f"the loss is {value}", where, lr)


def nonfinite_gradients(model: torch.nn.Module) -> list[str]:
    """Names of the parameters whose gradient holds NaN or infinity."""
    return [
        name
        for name, parameter in model.named_parameters()
        if parameter.grad is not None and not torch.isfinite(parameter.grad).all()
    ]


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the parameters that hold NaN or infinity."""
    return [name for name, parameter in model.named_parameters() if not torch.isfinite(parameter).all()]


def check_gradients(model: torch.nn.Module, stage: str, where: str, lr: float | None = None) -> None:
    """Raise :class:`DivergedError` when a gradient is NaN or infinite (call it before ``optimizer.step()``)."""
    bad = nonfinite_gradients(model)
    if bad:
        raise _diverged(stage, f"non-finite gradients of {first_few(bad, 3, ', ')}", where, lr)


def check_parameters(model: torch.nn.Module, stage: str, where: str, lr: float | None = None) -> None:
    """Raise :class:`DivergedError` when a weight is NaN or infinite (call it before saving)."""
    bad = nonfinite_parameters(model)
    if bad:
        raise _diverged(stage, f"non-finite weights in {first_few(bad, 3, ', ')}", where, lr)


class StopOnDivergence(TrainerCallback):
    """For ``transformers.Trainer`` stages: stop on non-finite weights at the start, gradients before each
    optimizer step, and a non-finite logged loss or gradient norm (before that step's checkpoint is saved)."""

    def __init__(self, stage: str):
        self.stage = stage

    @staticmethod
    def _lr(kwargs) -> float | None:
        optimizer = kwargs.get("optimizer")
        groups = getattr(optimizer, "param_groups", None) or []
        return groups[0]["lr"] if groups else None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            check_parameters(model, self.stage, f"the start (step {state.global_step})", self._lr(kwargs))

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None:
            check_gradients(model, self.stage, f"step {state.global_step + 1}", self._lr(kwargs))

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(float(value)):
                where, lr = f"step {state.global_step}", logs.get("learning_rate")
                raise _diverged(self.stage, f"the logged {key} is {value}", where, lr)
