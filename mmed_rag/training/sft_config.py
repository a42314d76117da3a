"""``train-sft``'s config: the stages (data, mix, val data, length, rate, what trains) and the trainer settings.

Apart from the trainer's code, so that building the stage's command line (and its ``--help``) imports neither
torch, transformers nor trl.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Literal

from mmed_rag.config import ConfigError, config_from_dict

Trainable = Literal["projector", "language_model", "full", "lora"]


@dataclass
class SFTStage:
    """One stage: its data (and their mix), how long, how fast, and what trains."""

    name: str = field(default="sft", metadata={"help": "stage name: its directory under output_dir"})
    data: tuple[str, ...] = field(default=(), metadata={"help": "conversation JSON files (LLaVA instruct format)"})
    mix: tuple[float, ...] = field(
        default=(), metadata={"help": "per data file: share of its records per epoch (2.0 = twice; default 1.0 each)"}
    )
    damon_data: str = field(
        default="",
        metadata={
            "help": "a DAMON data config (JSON, unchanged): each dataset's annotation JSONL, images under its root, "
            "its repeat_time as its mix; beside or instead of data"
        },
    )
    val_data: tuple[str, ...] = field(
        default=(), metadata={"help": "conversation files whose answer loss is measured before and after the stage"}
    )
    damon_val_data: str = field(default="", metadata={"help": "a DAMON data config of val data (as damon_data)"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the mixed data"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps (overrides epochs when > 0)"})
    learning_rate: float = field(default=2e-5, metadata={"help": "peak learning rate (cosine schedule)"})
    trainable: Trainable = field(default="language_model", metadata={"help": "projector, language_model, full, lora"})

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", self.name):
            raise ConfigError(f"stage name {self.name!r}: expected a plain directory name (letters, digits, _.-)")
        if self.mix and len(self.mix) != len(self.data):
            raise ConfigError(f"stage {self.name}: {len(self.mix)} mix weight(s) for {len(self.data)} data file(s)")
        if any(weight <= 0 for weight in self.mix):
            raise ConfigError(f"stage {self.name}: mix weights must be positive, got {list(self.mix)}")
        if self.max_steps <= 0 and not self.epochs > 0:
            raise ConfigError(f"stage {self.name}: give epochs > 0 or max_steps > 0")


@dataclass
class SFTConfig(SFTStage):
    """``mmed-rag train-sft``: the base model, the stages (or the one stage of the options above), the trainer."""

    model: str = field(default="", metadata={"help": "base model directory (image-text-to-text + processor)"})
    image_folder: str = field(default="", metadata={"help": "directory the data's image paths are relative to"})
    output_dir: str = field(default="", metadata={"help": "directory for the stages and their checkpoints"})
    stages: tuple[dict, ...] = field(
        default=(), metadata={"help": "YAML only: a list of stages (SFTStage fields), run in order"}
    )
    batch_size: int = field(default=8, metadata={"help": "samples per device step"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "steps per optimizer update"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "share of the steps spent warming up"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_length: int = field(default=2048, metadata={"help": "longest row in tokens; a longer one is an error"})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank (trainable: lora)"})
    lora_alpha: int = field(default=128, metadata={"help": "LoRA alpha (trainable: lora)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (trainable: lora)"})
    seed: int = field(default=0, metadata={"help": "seeds the mix, the data order and the init of new weights"})
    save_steps: int = field(default=100, metadata={"help": "checkpoint every N optimizer steps (resume point)"})
    logging_steps: int = field(default=10, metadata={"help": "log the loss every N steps"})
    bf16: bool = field(default=False, metadata={"help": "train in bfloat16 (GPU)"})
    report_to: str = field(default="none", metadata={"help": "'none', 'tensorboard', 'wandb'"})
    workers: int = field(default=0, metadata={"help": "data loader worker processes"})
    on_error: Literal["raise", "skip"] = field(
        default="raise", metadata={"help": "a bad record: stop, or report and leave it out"}
    )
    plot: bool = field(default=True, metadata={"help": "write curves.png for each stage"})
    eval_steps: int = field(
        default=0, metadata={"help": "with val data: also measure the val loss every N steps (0: before and after)"}
    )

    def __post_init__(self) -> None:
        one_stage = self.data or self.damon_data
        if self.stages and one_stage:
            raise ConfigError("give either stages (a list) or the one stage's data, not both")
        if self.stages:
            self.plan()  # every stage is checked with the config, before any model loads
        elif one_stage:
            super().__post_init__()

    def plan(self) -> list[SFTStage]:
        """The stages to run, in order: ``stages``, else the one stage given by the top-level options."""
        if not self.stages:
            own = {f.name: getattr(self, f.name) for f in dataclasses.fields(SFTStage)}
            return [SFTStage(**own)]
        plans = [config_from_dict(SFTStage, raw, f"stages[{index}]") for index, raw in enumerate(self.stages)]
        names = [plan.name for plan in plans]
        if len(set(names)) != len(names):
            raise ConfigError(f"stages: names must differ, got {names}")
        return plans
