"""The retrieval stages' configs: ``finetune-clip``, ``build-index``, ``retrieve``, ``eval-retrieval``.

Apart from the stages' code, so that building a stage's command line (and its ``--help``) imports neither torch,
open_clip nor faiss: a dataclass with its defaults and checks needs none of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mmed_rag.config import ConfigError
from mmed_rag.retrieval.select import RULES, KSelection
from mmed_rag.sharding import ShardOptions

SelectMetric = Literal[
    "image_to_report_R@1",
    "image_to_report_R@5",
    "image_to_report_R@10",
    "report_to_image_R@1",
    "report_to_image_R@5",
    "report_to_image_R@10",
    "mean_recall",
]


@dataclass
class FinetuneConfig:
    """Arguments of ``finetune-clip``; names follow the original script's flags (``--batch-size`` -> batch_size)."""

    train_data: str = field(default="", metadata={"help": "retriever training pairs (JSON list)"})
    img_root: str = field(default="", metadata={"help": "directory the image paths of the data files are relative to"})
    dataset_type: str = field(default="", metadata={"help": "the modality this retriever serves, e.g. radiology"})
    val_data: str | None = field(
        default=None, metadata={"help": "validation pairs; if unset, val_fraction of train_data's records is held out"}
    )
    val_fraction: float = field(
        default=0.1, metadata={"help": "share of train_data's records held out for validation when val_data is unset"}
    )
    model: str = field(
        default="hf-hub:thaottn/OpenCLIP-resnet50-CC12M",
        metadata={
            "help": "open_clip config name, local model directory, or hf-hub: name found in the local HF cache "
            "(the original's default; never downloaded)"
        },
    )
    checkpoint: str | None = field(default=None, metadata={"help": "weights to start from instead of the model's own"})
    batch_size: int = field(
        default=512,
        metadata={
            "help": "pairs per step on each process, as open_clip's --batch-size: a step trains on batch_size x "
            "processes pairs (the original ran 512 on 2 GPUs: 1,024 pairs a step; on 1 GPU give 1024 for the same)"
        },
    )
    precision: Literal["amp", "bf16", "fp32"] = field(
        default="amp",
        metadata={
            "help": "amp (the original's): float16 autocast + gradient scaling, CUDA only (fp32 on CPU); "
            "bf16: bfloat16 autocast; fp32: none. Weights stay float32 in every case."
        },
    )
    workers: int = field(default=4, metadata={"help": "data loader worker processes (0: load in the main process)"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate of AdamW (the original's)"})
    wd: float = field(default=0.2, metadata={"help": "weight decay, not applied to gains, biases and the logit scale"})
    warmup: int = field(default=100, metadata={"help": "linear warm-up steps before the cosine decay"})
    epochs: int = field(default=10, metadata={"help": "training epochs; raise it and rerun to train a finished run on"})
    val_frequency: int = field(
        default=1, metadata={"help": "evaluate every this many epochs (and always after the last one)"}
    )
    select_metric: SelectMetric = field(
        default="image_to_report_R@5",
        metadata={"help": "validation metric that picks best/; ties go to the lower val loss"},
    )
    report_to: str = field(default="", metadata={"help": "'', 'tensorboard', 'wandb' or 'tensorboard,wandb'"})
    wandb_project: str = field(default="mmed-rag", metadata={"help": "wandb project, when report_to has wandb"})
    logs: str = field(default="logs", metadata={"help": "directory that holds the run directories"})
    name: str | None = field(
        default=None, metadata={"help": "run directory under logs (default: dataset_type); rerun to resume it"}
    )
    seed: int = field(default=0, metadata={"help": "seeds the model's random init, the val split and the data order"})
    device: str = field(
        default="auto",
        metadata={
            "help": "'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ...; under torchrun cpu or cuda only "
            "(each process takes the GPU of its LOCAL_RANK)"
        },
    )
    # Under torchrun (open_clip's trainer has the same options; see mmed_rag.retrieval.distributed):
    gather_with_grad: bool = field(
        default=True,
        metadata={
            "help": "under torchrun, let the loss's gradient flow through the features gathered from the other "
            "processes: N processes then compute exactly one process's gradients (open_clip's default is off, "
            "which scales the encoders' gradients by 1/N)"
        },
    )
    local_loss: bool = field(
        default=False,
        metadata={
            "help": "under torchrun, each process computes the loss of its own pairs against all (N times fewer "
            "logits; the same gradients with gather_with_grad)"
        },
    )
    sync_bn: bool = field(
        default=True,
        metadata={
            "help": "under torchrun, batch norm statistics over the whole step's batch (SyncBatchNorm, CUDA only), "
            "as one process computes them; off: each process's own pairs (open_clip's default)"
        },
    )
    dist_timeout: int = field(
        default=1800,
        metadata={
            "help": "under torchrun, seconds a process waits for the others (rank 0 validates and saves alone) "
            "before failing"
        },
    )

    def __post_init__(self) -> None:
        for name in ("batch_size", "epochs", "val_frequency", "dist_timeout"):
            minimum = 2 if name == "batch_size" else 1  # a contrastive batch needs a negative
            if getattr(self, name) < minimum:
                raise ConfigError(f"{name}: expected at least {minimum}, got {getattr(self, name)}")
        if self.workers < 0 or self.warmup < 0:
            raise ConfigError(f"workers and warmup: expected >= 0, got {self.workers} and {self.warmup}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction: expected 0 <= val_fraction < 1, got {self.val_fraction}")
        unknown = set(self.report_targets) - {"tensorboard", "wandb"}
        if unknown:
            raise ConfigError(
                f"report_to: expected '', 'tensorboard', 'wandb' or both comma-separated, got {self.report_to!r}"
            )

    @property
    def report_targets(self) -> list[str]:
        return [target.strip() for target in self.report_to.split(",") if target.strip()]

    @property
    def run_dir(self) -> Path:
        return Path(self.logs) / (self.name or self.dataset_type)


IndexKind = Literal["flat", "ivf", "hnsw", "ivfpq", "ivfrabitq"]
# Bits per dimension of an ivfrabitq code: 1 (the sign of each rotated coordinate) plus up to 8 refining bits.
RABITQ_MAX_BITS = 9
DEFAULT_RABITQ_BITS = 4
# The kinds that rank by codes' estimated inner products, which exact_rerank can re-score.
CODED_KINDS: tuple[str, ...] = ("ivfpq", "ivfrabitq")


@dataclass
class BuildIndexConfig:
    """Arguments of ``mmed-rag build-index``."""

    retriever: str = field(metadata={"help": "directory of the modality's retriever, as written by save_clip"})
    corpus: str = field(metadata={"help": "retriever training JSON of the modality: the reports to index"})
    modality: str = field(metadata={"help": "modality the index serves (radiology, pathology, ophthalmology, ...)"})
    out: str = field(metadata={"help": "index directory to write (index.faiss, reports.jsonl, manifest.json)"})
    kind: IndexKind = field(
        default="flat",
        metadata={
            "help": "flat: exact inner product; ivf: k-means cells; hnsw: graph; ivfpq: cells of product-quantised "
            "codes; ivfrabitq: cells of RaBitQ codes (the last two for a million reports and more; all but flat "
            "approximate)"
        },
    )
    batch_size: int = field(default=256, metadata={"help": "reports encoded per batch"})
    nlist: int | None = field(
        default=None,
        metadata={"help": "ivf, ivfpq, ivfrabitq: number of cells (default: about 4 sqrt(n), at most n/39)"},
    )
    nprobe: int | None = field(
        default=None,
        metadata={"help": "ivf, ivfpq, ivfrabitq: cells searched per query (default: ivf 16, else nlist/64 but >= 16)"},
    )
    hnsw_m: int = field(default=32, metadata={"help": "hnsw: links per node"})
    ef_construction: int = field(default=40, metadata={"help": "hnsw: candidate list size while building"})
    ef_search: int = field(default=64, metadata={"help": "hnsw: candidate list size while searching"})
    pq_m: int | None = field(
        default=None,
        metadata={"help": "ivfpq: sub-quantisers per embedding, must divide its width (default: about width/4)"},
    )
    pq_nbits: int = field(default=8, metadata={"help": "ivfpq: bits per sub-quantiser code (1-16)"})
    opq: bool = field(
        default=True,
        metadata={"help": "ivfpq: learn an OPQ rotation before quantising (better recall, about 4x the build time)"},
    )
    rerank: int = field(
        default=0,
        metadata={
            "help": "ivfpq: re-score the best rerank x k codes against 8-bit scalar-quantised vectors (0: off; "
            "costs 1 byte per dimension per report)"
        },
    )
    rabitq_bits: int = field(
        default=DEFAULT_RABITQ_BITS,
        metadata={
            "help": f"ivfrabitq: bits per dimension of each code (1-{RABITQ_MAX_BITS}; each costs dim/8 bytes per "
            "report: 3 bits of a 512-dim embedding are 1/10 of its float32 vector)"
        },
    )
    exact_rerank: int = field(
        default=0,
        metadata={
            "help": "ivfpq, ivfrabitq: re-score the best exact_rerank x k codes with the float32 vectors, kept on "
            "disk in vectors.f32 and read per candidate (0: off; memory holds only the codes, the disk 4 bytes per "
            "dimension per report)"
        },
    )
    device: str = field(default="auto", metadata={"help": "device that encodes the reports: auto, cpu, cuda, ..."})

    def __post_init__(self) -> None:
        for name in ("batch_size", "ef_construction", "ef_search"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected at least 1, got {getattr(self, name)}")
        for name in ("nlist", "nprobe", "pq_m"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected at least 1 (or null for the default), got {getattr(self, name)}")
        if self.hnsw_m < 2:
            raise ConfigError(f"hnsw_m: expected at least 2, got {self.hnsw_m}")
        if not 1 <= self.pq_nbits <= 16:
            raise ConfigError(f"pq_nbits: expected 1 to 16 bits per code, got {self.pq_nbits}")
        if self.rerank < 0:
            raise ConfigError(f"rerank: expected 0 (off) or a shortlist factor >= 1, got {self.rerank}")
        if self.exact_rerank < 0:
            raise ConfigError(f"exact_rerank: expected 0 (off) or a shortlist factor >= 1, got {self.exact_rerank}")
        if self.exact_rerank and self.kind not in CODED_KINDS:
            raise ConfigError(
                f"exact_rerank: only for kind {' or '.join(CODED_KINDS)} (their codes' scores are estimates), "
                f"not {self.kind}"
            )
        if self.exact_rerank and self.rerank:
            raise ConfigError(
                "rerank and exact_rerank: choose one re-scoring (8-bit vectors in memory, or float32 vectors from disk)"
            )
        if not 1 <= self.rabitq_bits <= RABITQ_MAX_BITS:
            raise ConfigError(
                f"rabitq_bits: expected 1 to {RABITQ_MAX_BITS} bits per dimension, got {self.rabitq_bits}"
            )

    def index_params(self) -> dict:
        """The parameters of ``kind``, as :meth:`ReportIndex.from_embeddings` takes them."""
        if self.kind == "flat":
            return {}
        if self.kind == "hnsw":
            return {"hnsw_m": self.hnsw_m, "ef_construction": self.ef_construction, "ef_search": self.ef_search}
        params = {"nlist": self.nlist, "nprobe": self.nprobe}
        if self.kind == "ivfpq":
            params |= {"pq_m": self.pq_m, "pq_nbits": self.pq_nbits, "opq": self.opq, "rerank": self.rerank}
        if self.kind == "ivfrabitq":
            params["rabitq_bits"] = self.rabitq_bits
        params["exact_rerank"] = self.exact_rerank
        return params


@dataclass
class RetrieveConfig(ShardOptions):
    """Arguments of batch retrieval; the names are the original scripts' flags."""

    eval_json: str = field(
        metadata={"help": "records to retrieve for: VQA test JSONL or report test JSON", "aliases": ["--eval_jsonl"]}
    )
    output_path: str = field(metadata={"help": "JSONL to write: each record + reference_reports + retrieve_k"})
    img_root: str = field(metadata={"help": "image root that the records' image paths are relative to"})
    train_json: str | None = field(
        default=None,
        metadata={"help": "report corpus (retriever training JSON); indexed once and cached if no --index"},
    )
    index: str | None = field(default=None, metadata={"help": "a ReportIndex directory (build-index): no encoding"})
    model_name_or_path: str = field(
        default="hf-hub:thaottn/OpenCLIP-resnet50-CC12M",
        metadata={"help": "retriever: a save_clip directory, a local hub copy, or an open_clip name (+ checkpoint)"},
    )
    checkpoint_path: str | None = field(default=None, metadata={"help": "fine-tuned weights to load into the model"})
    fixed_k: int = field(default=5, metadata={"help": "reports retrieved per record (the cap of adaptive rules)"})
    clip_threshold: float | None = field(
        default=None, metadata={"help": "the original ratio rule: keep report i while s_1 / s_i < threshold"}
    )
    select_rule: Literal["fixed", "ratio", "gap", "absolute"] | None = field(
        default=None, metadata={"help": f"selection rule ({', '.join(RULES)}); default: from the original flags"}
    )
    select_threshold: float | None = field(
        default=None, metadata={"help": "parameter of --select-rule: ratio, gamma, or minimum similarity"}
    )
    eval_type: str = field(default="test", metadata={"help": "kept for the original scripts' command lines"})
    batch_size: int = field(default=64, metadata={"help": "images encoded per batch"})
    workers: int = field(default=0, metadata={"help": "image-loading worker processes"})
    on_error: Literal["raise", "skip"] = field(
        default="raise", metadata={"help": "a record with a bad image: stop (raise) or report and leave it out (skip)"}
    )
    fresh: bool = field(
        default=False,
        metadata={
            "help": "start over: drop an interrupted run's results instead of resuming, or replace a finished output",
            "aliases": ["--overwrite"],
        },
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, ..."})

    def __post_init__(self) -> None:
        # The original scripts default their optional paths to "": treat it as not given.
        for name in ("train_json", "index", "checkpoint_path"):
            if getattr(self, name) == "":
                setattr(self, name, None)
        if self.index is None and self.train_json is None:
            raise ConfigError("give --index DIR (a built index) or --train_json FILE (the corpus to index)")
        if self.fixed_k < 1:
            raise ConfigError(f"fixed_k: expected at least 1, got {self.fixed_k}")
        self.selection()  # a bad rule or threshold fails here, before any work

    def selection(self) -> KSelection:
        return KSelection.from_options(self.fixed_k, self.clip_threshold, self.select_rule, self.select_threshold)


@dataclass
class EvalRetrievalConfig:
    """Arguments of ``mmed-rag eval-retrieval``."""

    eval_json: str = field(metadata={"help": "records with ground-truth reports (VQA JSONL, report or retriever JSON)"})
    img_root: str = field(metadata={"help": "image root of the records' image paths"})
    out: str = field(metadata={"help": "directory for metrics.json and similarity.png"})
    model_name_or_path: str = field(metadata={"help": "retriever: a save_clip directory or a name + checkpoint"})
    checkpoint_path: str | None = field(default=None, metadata={"help": "fine-tuned weights to load into the model"})
    index: str | None = field(default=None, metadata={"help": "a ReportIndex directory"})
    train_json: str | None = field(default=None, metadata={"help": "the corpus, indexed (and cached) if no --index"})
    ks: tuple[int, ...] = field(default=(1, 5, 10), metadata={"help": "recall cut-offs"})
    batch_size: int = field(default=64, metadata={"help": "images encoded per batch"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, ..."})

    def __post_init__(self) -> None:
        if self.index is None and self.train_json is None:
            raise ConfigError("give --index DIR (a built index) or --train-json FILE (the corpus to index)")
        if not self.ks or min(self.ks) < 1:
            raise ConfigError(f"ks: expected positive cut-offs, got {self.ks}")
