"""Saving a LLaVA in the weight layout that both transformers and vLLM read.

transformers 5 holds LLaVA's CLIP vision tower without its ``vision_model`` level (``model.vision_tower.embeddings``)
and saves a model built from a config (the tiny test models, a converted LLaVA-Med) as ``vision_tower.embeddings.*``.
vLLM (0.32) reads only the llava-hf layout, ``vision_tower.vision_model.*``, and refuses the other one. transformers
loads both (its CLIPVisionModel mapping drops the level on load, and a model loaded from the llava-hf layout saves
back to it), so every LLaVA the project writes for generation uses the llava-hf layout: one directory serves
``--backend hf`` and a vLLM server alike.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open

LIVE_TOWER = "model.vision_tower."  # where transformers 5 holds the tower's parameters
SERVED_TOWER = "vision_tower.vision_model."  # where llava-hf checkpoints (and vLLM) keep them


def save_for_serving(model, directory: str | os.PathLike) -> None:
    """``model.save_pretrained(directory)``; a LLaVA's vision weights go under ``vision_tower.vision_model.``.

    transformers' own reverse mapping turns ``model.vision_tower.vision_model.*`` into the saved
    ``vision_tower.vision_model.*``, so only the tower's names change here. Other models are saved as they are.
    """
    if model.config.model_type != "llava":
        model.save_pretrained(directory)
        return
    state = {
        (
            LIVE_TOWER + "vision_model." + name.removeprefix(LIVE_TOWER)
            if name.startswith(LIVE_TOWER) and not name.startswith(LIVE_TOWER + "vision_model.")
            else name
        ): tensor
        for name, tensor in model.state_dict().items()
    }
    model.save_pretrained(directory, state_dict=state)
    problem = served_layout_problem(directory)
    if problem:
        raise RuntimeError(f"saving for serving went wrong: {problem}")


def served_layout_problem(directory: str | os.PathLike) -> str | None:
    """Why vLLM would refuse the LLaVA weights in ``directory`` (vision weights outside ``vision_tower.vision_model.``),
    or None. Reads only the safetensors headers."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != "llava":
        return None
    names = []
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as weights:
            names += list(weights.keys())
    flat = sorted(name for name in names if name.startswith("vision_tower.") and not name.startswith(SERVED_TOWER))
    if flat:
        return (
            f"{directory}: {len(flat)} vision weight(s) outside {SERVED_TOWER}* (e.g. {flat[0]}); vLLM reads only the "
            f"llava-hf layout. Load the model with transformers and save it with "
            f"mmed_rag.generation.served_layout.save_for_serving"
        )
    return None
