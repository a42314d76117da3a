"""The demo's arguments: one dataclass, its defaults the full demo, ``--smoke`` a documented reduction of them."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

#: What ``--smoke`` changes: the same recipe on fewer images and steps (a few minutes; numbers are noisy).
SMOKE = {
    "n": 360,
    "retriever_epochs": 20,
    "retriever_batch_size": 16,
    "domain_epochs": 5,
    "vision_epochs": 5,
    "sft_image_steps": 20,
    "sft_reports_steps": 40,
    "sft_steps": 20,
    "sft_batch_size": 16,
    "dpo_steps": 8,
    "bootstrap": 200,
    "report_bootstrap": 50,
}


@dataclass
class DemoConfig:
    """Arguments of ``mmed-rag demo`` (``--config YAML`` overrides the defaults; flags override both)."""

    out: str = field(default="demo-output", metadata={"help": "directory for everything the demo writes"})
    fresh: bool = field(default=False, metadata={"help": "rerun every step, even those whose inputs are unchanged"})
    smoke: bool = field(
        default=False, metadata={"help": "a reduced run in a few minutes (fewer images and steps; noisy numbers)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the data, the models and every sample"})
    seeds: int = field(
        default=1,
        metadata={"help": "rerun the stand-in SFT and RAG-PT with this many seeds and report the spread"},
    )
    n: int = field(default=1500, metadata={"help": "phantom images over the three modalities"})
    size: int = field(default=64, metadata={"help": "phantom image side in pixels"})
    questions_per_image: int = field(default=2, metadata={"help": "yes/no questions per image (every split)"})
    retriever_model: str = field(default="tiny-clip-rn", metadata={"help": "open_clip model of the retrievers"})
    retriever_epochs: int = field(default=30, metadata={"help": "contrastive fine-tuning epochs per modality"})
    retriever_batch_size: int = field(default=32, metadata={"help": "image-report pairs per retriever step"})
    retriever_learning_rate: float = field(
        default=1e-3, metadata={"help": "retriever peak learning rate (from scratch: 10x the original's 1e-4)"}
    )
    domain_epochs: int = field(default=15, metadata={"help": "domain classifier epochs"})
    fixed_k: int = field(
        default=1,
        metadata={
            "help": "reports per prompt with fixed k (1: the stand-in learns to read one report within the time "
            "budget; three took longer than the demo has)"
        },
    )
    adaptive_cap: int = field(default=5, metadata={"help": "most reports the adaptive rule may keep"})
    adaptive_ratio: float = field(
        default=1.1, metadata={"help": "the original's ratio rule: keep report i while s_1 / s_i < this"}
    )
    vision_epochs: int = field(
        default=15, metadata={"help": "epochs pretraining the stand-in's vision encoder on the finding labels"}
    )
    sft_image_steps: int = field(default=400, metadata={"help": "SFT stage 1 steps: questions without reports"})
    sft_reports_steps: int = field(
        default=800,
        metadata={"help": "SFT stage 2 steps: questions and reports to write, each with a retrieved report"},
    )
    sft_steps: int = field(
        default=250, metadata={"help": "SFT stage 3 steps: questions and reports to write, with and without reports"}
    )
    sft_report_share: float = field(
        default=0.5,
        metadata={"help": "SFT stage 2: share of the reports to write (with a reference) per pass (questions: all)"},
    )
    sft_plain_share: float = field(
        default=0.25,
        metadata={"help": "SFT stage 3: share of the questions without reports per pass (with reports: all)"},
    )
    sft_mix_report_share: float = field(
        default=0.15,
        metadata={
            "help": "SFT stage 3: share of the reports to write per pass, with and without a reference each (a "
            "report has some 30 answer tokens to a question's one: a small share keeps the questions in the loss)"
        },
    )
    sft_learning_rate: float = field(
        default=1e-3, metadata={"help": "SFT peak learning rate (tiny model: high; stage 3 at half)"}
    )
    sft_batch_size: int = field(default=32, metadata={"help": "SFT rows per step"})
    dpo_steps: int = field(default=40, metadata={"help": "optimizer steps per RAG-PT stage"})
    dpo_learning_rate: float = field(default=5e-5, metadata={"help": "RAG-PT learning rate (both stages)"})
    dpo_beta: float = field(default=0.1, metadata={"help": "DPO beta"})
    dpo_batch_size: int = field(default=8, metadata={"help": "preference pairs per RAG-PT step"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank of RAG-PT"})
    shuffle_index: bool = field(
        default=False,
        metadata={
            "help": "honesty check: shuffle every index's rows after building it, so retrieval returns unrelated "
            "reports (recall must fall to chance and the retrieved reports say nothing of the image)"
        },
    )
    bootstrap: int = field(default=1000, metadata={"help": "bootstrap resamples of the 95%% intervals"})
    report_bootstrap: int = field(
        default=100,
        metadata={
            "help": "bootstrap resamples of the report text metrics' 95%% intervals (each resample rescored as a "
            "corpus, CIDEr in full: 100 cost the demo about a minute and a half)"
        },
    )

    def __post_init__(self) -> None:
        from mmed_rag.config import ConfigError

        if self.smoke:
            defaults = {f.name: f.default for f in fields(self)}
            for name, value in SMOKE.items():
                if getattr(self, name) == defaults[name]:  # an explicit flag still wins over the reduction
                    setattr(self, name, value)
        if self.seeds < 1:
            raise ConfigError(f"seeds: expected at least 1, got {self.seeds}")
        if not 1 <= self.fixed_k <= self.adaptive_cap:
            raise ConfigError(
                f"fixed_k and adaptive_cap: expected 1 <= fixed_k <= adaptive_cap, got {self.fixed_k}, "
                f"{self.adaptive_cap}"
            )
        if self.adaptive_ratio <= 1:
            raise ConfigError(f"adaptive_ratio: expected a ratio above 1, got {self.adaptive_ratio}")
