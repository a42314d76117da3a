"""Where a stage runs: every ``device`` option accepts ``auto`` (the GPU when there is one) or a torch name."""

from __future__ import annotations

import torch


def resolve_device(name: str | torch.device) -> torch.device:
    """``"auto"`` is ``cuda`` when a GPU is visible, else ``cpu``; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
