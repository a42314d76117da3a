"""Loading a LoRA adapter onto its base model, checked: every tensor of the adapter must land in the model.

peft matches an adapter's tensors to the model by name and loads the ones that match; the others are ignored
with at most a UserWarning. An adapter saved from another architecture, or whose names were changed, then
loads "successfully" as the base model with zero-initialised LoRA layers: every answer, and every merged weight,
equals the base's. Every place that loads an adapter (``generate --adapter``, ``merge-lora``, DPO stage 2) goes
through :func:`load_lora`, which compares the adapter's tensors with what the model holds afterwards (peft's own
``get_peft_model_state_dict``, the names it saves under) and refuses a mismatch, naming a few of the tensors.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from mmed_rag.errors import MMedRAGError, first_few

CONFIG_FILE = "adapter_config.json"


class AdapterError(MMedRAGError):
    """A LoRA adapter directory that is missing, unreadable, or does not fit the model it is loaded onto."""


def load_lora(model: torch.nn.Module, adapter: str | os.PathLike, *, is_trainable: bool = False):
    """``PeftModel.from_pretrained(model, adapter)``, refused unless every adapter tensor was loaded."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict, load_peft_weights

    adapter = Path(adapter)
    if not (adapter / CONFIG_FILE).is_file():
        raise AdapterError(f"{adapter} is not a LoRA adapter directory (no {CONFIG_FILE})")
    try:
        saved = load_peft_weights(str(adapter), device="cpu")
        with warnings.catch_warnings():  # peft's "missing adapter keys" warning: we raise with the names below
            warnings.filterwarnings("ignore", message="Found missing adapter keys")
            peft_model = PeftModel.from_pretrained(model, adapter, is_trainable=is_trainable)
    except Exception as error:  # peft raises ValueError, KeyError, RuntimeError, OSError or safetensors errors
        raise AdapterError(f"cannot load the adapter {adapter}: {type(error).__name__}: {error}") from None
    held = get_peft_model_state_dict(peft_model)
    unexpected = sorted(set(saved) - set(held))
    missing = sorted(set(held) - set(saved))
    if unexpected or missing:
        problems = []
        if unexpected:
            problems.append(
                f"{len(unexpected)} of its {len(saved)} tensors match no layer of the model "
                f"({first_few(unexpected, 3, ', ')})"
            )
        if missing:
            problems.append(f"{len(missing)} adapter layers of the model get no tensor ({first_few(missing, 3, ', ')})")
        raise AdapterError(
            f"the adapter {adapter} does not fit the model {type(model).__name__}: {'; '.join(problems)}; "
            "it was trained on another model, or its tensor names were changed"
        )
    # Under ZeRO-3 the model's tensors are partitioned (empty here): only the names can be compared.
    differing = [
        name
        for name, tensor in saved.items()
        if held[name].numel() == tensor.numel()
        and not torch.equal(held[name].detach().cpu(), tensor.to(held[name].dtype))  # the cast loading does
    ]
    if differing:
        raise AdapterError(
            f"the adapter {adapter} did not load into the model: {first_few(differing, 3, ', ')} differ after loading"
        )
    return peft_model
