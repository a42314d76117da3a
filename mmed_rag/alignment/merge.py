"""Fold a RAG-PT LoRA adapter into its base model: one model directory that needs no peft to load.

The merged directory holds the model (LoRA deltas added to the language model's weights, the trained projector
copy in place of the original) and the processor the adapter was trained with, so it loads with
``AutoModelForImageTextToText`` / ``AutoProcessor`` like any converted checkpoint and gives the logits of base +
adapter. A ``merge.json`` beside the weights names the base and the adapter (by path and sha256).

torch, transformers and peft are imported when a merge runs, so ``mmed-rag merge-lora --help`` needs none of them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from mmed_rag.atomic import atomic_write_text, publish_directory
from mmed_rag.config import ConfigError
from mmed_rag.errors import MMedRAGError, model_directory_problem
from mmed_rag.fingerprint import file_sha256
from mmed_rag.outputs import claim_outputs

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MANIFEST = "merge.json"


class MergeError(MMedRAGError, ValueError):
    """A base model or adapter directory that cannot be merged."""


def merge_lora(
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Write ``base_dir`` + ``adapter_dir`` merged to ``out_dir`` (replaced atomically); return ``out_dir``.

    ``dtype`` defaults to the base model's saved dtype. The processor comes from the adapter directory when it
    has one (training saves it there), else from the base model's.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmed_rag.adapters import load_lora

    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    problem = model_directory_problem(base_dir)
    if problem:
        raise MergeError(problem)
    model = AutoModelForImageTextToText.from_pretrained(
        base_dir, dtype=dtype or "auto", trust_remote_code=trust_remote_code
    )
    merged = load_lora(model, adapter_dir).merge_and_unload()
    processor_files = ("processor_config.json", "preprocessor_config.json")
    has_processor = any((adapter_dir / name).is_file() for name in processor_files)
    processor = AutoProcessor.from_pretrained(
        adapter_dir if has_processor else base_dir, trust_remote_code=trust_remote_code
    )
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging)
    processor.save_pretrained(staging)
    manifest = {
        "base_model": str(base_dir.resolve()),
        "adapter": str(adapter_dir.resolve()),
        "adapter_sha256": file_sha256(adapter_dir / "adapter_model.safetensors"),
        "dtype": str(merged.dtype).removeprefix("torch."),
    }
    atomic_write_text(staging / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    publish_directory(staging, out_dir)
    logger.info("Merged %s into %s: %s", adapter_dir, base_dir, out_dir)
    return out_dir


@dataclass
class MergeLoraConfig:
    """``mmed-rag merge-lora``: which base, which adapter, where the merged model goes."""

    base: str = field(default="", metadata={"help": "base model directory the adapter was trained on"})
    adapter: str = field(default="", metadata={"help": "LoRA adapter directory (e.g. OUTPUT_DIR/stage2)"})
    out: str = field(default="", metadata={"help": "directory for the merged model and its processor"})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "dtype of the merged weights (auto: the base model's)"}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "run code shipped with the model directory"})

    def __post_init__(self) -> None:
        missing = [f"--{name}" for name in ("base", "adapter", "out") if not getattr(self, name)]
        if missing:
            raise ConfigError(f"merge-lora needs {', '.join(missing)}")


def run_merge_lora(config: MergeLoraConfig) -> Path:
    """The stage function behind ``mmed-rag merge-lora``."""
    with claim_outputs("merge-lora", replaced=[config.out], inputs=[config.base, config.adapter]):
        return _run_merge_lora(config)


def _run_merge_lora(config: MergeLoraConfig) -> Path:
    import torch

    dtype = None if config.dtype == "auto" else getattr(torch, config.dtype)
    return merge_lora(config.base, config.adapter, config.out, dtype=dtype, trust_remote_code=config.trust_remote_code)
