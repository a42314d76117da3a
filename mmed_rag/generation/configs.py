"""The generation stages' configs: ``generate`` (and its generator), ``convert-llava-med``, ``make-tiny-model``.

Apart from the stages' code, so that building a stage's command line (and its ``--help``) imports neither torch
nor transformers: a dataclass with its defaults and checks needs neither.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Literal

from mmed_rag.chat_templates import LLAVA_MED_MISTRAL
from mmed_rag.config import ConfigError
from mmed_rag.retrieval.select import RULES, KSelection
from mmed_rag.sharding import ShardOptions

# The dtypes a converted checkpoint can be written in (convert.py maps them to torch's).
DTYPE_NAMES = ("float16", "bfloat16", "float32")


def check_backend(config: GeneratorConfig | PipelineConfig) -> None:
    """The server options fit the backend: an adapter runs only in transformers, a server needs its URL."""
    if config.backend == "openai" and not config.api_base:
        raise ConfigError("backend 'openai' needs --api-base, the server's URL (e.g. http://127.0.0.1:8000/v1)")
    if config.backend != "hf" and config.adapter is not None:
        raise ConfigError(
            f"--adapter works with --backend hf only; for --backend {config.backend}, merge the adapter into its base "
            f"(mmed-rag merge-lora) and use the merged model"
        )
    if config.concurrency < 1 or config.retries < 0 or not config.request_timeout > 0 or config.top_logprobs < 1:
        raise ConfigError("concurrency and top_logprobs must be at least 1, retries at least 0, request_timeout > 0")


@dataclass
class BackendOptions:
    """Which engine generates, and how a server is reached: shared by ``GeneratorConfig`` and ``PipelineConfig``."""

    backend: Literal["hf", "openai", "vllm"] = field(
        default="hf",
        metadata={
            "help": "hf: transformers in this process; openai: an OpenAI-compatible server at --api-base (vllm serve, "
            "SGLang, LMDeploy, TGI); vllm: a vLLM engine in this process (needs the vllm package)"
        },
    )
    api_base: str | None = field(
        default=None, metadata={"help": "with --backend openai: the server's base URL, e.g. http://127.0.0.1:8000/v1"}
    )
    api_model: str | None = field(
        default=None,
        metadata={"help": "with --backend openai: the served model's name (default: the server's only one)"},
    )
    concurrency: int = field(
        default=8, metadata={"help": "with --backend openai: requests in flight at once (at most --batch-size)"}
    )
    request_timeout: float = field(default=600.0, metadata={"help": "with --backend openai: seconds per request"})
    retries: int = field(
        default=5,
        metadata={"help": "with --backend openai: retries of a request on connection errors, timeouts and 5xx"},
    )
    top_logprobs: int = field(
        default=20,
        metadata={
            "help": "with --backend openai/vllm: first-token log-probs read for yes/no scores (vLLM caps them at its "
            "--max-logprobs, 20 by default)"
        },
    )

    def backend_options(self) -> dict:
        """These options by name, to hand from one config to the other."""
        return {name.name: getattr(self, name.name) for name in fields(BackendOptions)}


@dataclass(kw_only=True)
class GeneratorConfig(BackendOptions):
    """How to load and run the generator; the defaults are greedy decoding, as MMed-RAG evaluates."""

    model: str = field(default="", metadata={"help": "local model directory (AutoModelForImageTextToText)"})
    adapter: str | None = field(default=None, metadata={"help": "LoRA adapter directory from preference tuning"})
    max_new_tokens: int = field(default=128, metadata={"help": "generated tokens at most"})
    do_sample: bool = field(default=False, metadata={"help": "sample instead of greedy decoding"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    stop_strings: tuple[str, ...] = field(default=(), metadata={"help": "stop generating at any of these"})
    batch_size: int = field(default=8, metadata={"help": "prompts per generate call"})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "auto: bfloat16 (or float16) on GPU, float32 on CPU"}
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, ..."})
    seed: int = field(default=0, metadata={"help": "seed for sampling"})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "run code shipped with the model directory (only for models you trust)"}
    )

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("max_new_tokens and batch_size must be at least 1")
        check_backend(self)


@dataclass(kw_only=True)
class PipelineConfig(BackendOptions, ShardOptions):
    """Everything ``mmed-rag generate`` needs; a YAML file in ``configs/generate/`` sets it."""

    model: str = field(default="", metadata={"help": "generator: local image-text-to-text model directory"})
    registry: str | None = field(
        default=None, metadata={"help": "modality registry YAML (retriever + index per modality)"}
    )
    input: str | None = field(default=None, metadata={"help": "VQA test JSONL or report test JSON to answer"})
    output: str | None = field(default=None, metadata={"help": "JSONL of records + reports + prediction"})
    img_root: str = field(default=".", metadata={"help": "image root of the input's image paths"})
    modality: str | None = field(
        default=None,
        metadata={"help": "modality of every record (else the domain classifier, else the record's 'modality')"},
    )
    domain_classifier: str | None = field(
        default=None, metadata={"help": "domain classifier directory (train-domain) that routes each image"}
    )
    unknown_policy: Literal["default", "all", "none"] = field(
        default="none",
        metadata={"help": "an image the classifier cannot place: retrieve from default_modality, all, or none"},
    )
    default_modality: str | None = field(default=None, metadata={"help": "the modality of unknown_policy 'default'"})
    task: Literal["auto", "vqa", "report"] = field(
        default="auto", metadata={"help": "auto: VQA for records with a question, else report generation"}
    )
    fixed_k: int = field(default=5, metadata={"help": "reports retrieved per image (the cap of adaptive rules)"})
    clip_threshold: float | None = field(default=None, metadata={"help": "the original ratio rule's threshold"})
    select_rule: Literal["fixed", "ratio", "gap", "absolute"] | None = field(
        default=None, metadata={"help": f"selection rule ({', '.join(RULES)}); default: from fixed_k/clip_threshold"}
    )
    select_threshold: float | None = field(default=None, metadata={"help": "parameter of --select-rule"})
    no_retrieval: bool = field(default=False, metadata={"help": "answer without reference reports"})
    noised_image: bool = field(default=False, metadata={"help": "show the model a noise image instead (seeded)"})
    noise_seed: int = field(default=0, metadata={"help": "seed of the noise images (mixed with each record's id)"})
    noise: Literal["replace", "add"] = field(
        default="replace",
        metadata={
            "help": "with --noised-image: replace the image by noise (MMed-RAG's training, the authors' VQA runs) or "
            "add N(0, 1) noise to it (the authors' report runs)"
        },
    )
    yes_no_scores: bool = field(
        default=False,
        metadata={"help": "also write each VQA answer's P(yes) from its first token ('yes_probability', for AUC)"},
    )
    yes_no_answers: bool = field(
        default=False,
        metadata={"help": "answer questions with the likelier of 'Yes'/'No' (constrained decoding), not free text"},
    )
    adapter: str | None = field(default=None, metadata={"help": "LoRA adapter from preference tuning"})
    prompt_style: Literal["mmed-rag", "authors"] = field(
        default="mmed-rag",
        metadata={
            "help": "the prompts without reports: ours (the IU-Xray test set's VQA form), or the authors' inference "
            "scripts' (configs/generate/authors.yaml)"
        },
    )
    max_new_tokens: int = field(default=128, metadata={"help": "generated tokens at most"})
    do_sample: bool = field(default=False, metadata={"help": "sample instead of greedy decoding (seeded per batch)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (with --do-sample)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (with --do-sample)"})
    seed: int = field(default=0, metadata={"help": "seed of the sampling (with --do-sample)"})
    authors_answer_file: str | None = field(
        default=None,
        metadata={
            "help": "also write the answers in the authors' answer-file layout (question_id, image, prompt, answer, "
            "gt_answer or gt_report, reference_report, noised_image, model_id, metadata) to this JSONL"
        },
    )
    batch_size: int = field(default=8, metadata={"help": "prompts per generate call"})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={"help": "model dtype"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, ..."})
    trust_remote_code: bool = field(default=False, metadata={"help": "run code shipped with the model directory"})
    on_error: Literal["raise", "skip"] = field(
        default="raise", metadata={"help": "a record that cannot be answered: stop, or report and leave it out"}
    )
    fresh: bool = field(
        default=False,
        metadata={
            "help": "start over: drop an interrupted run's results instead of resuming, or replace a finished output",
            "aliases": ["--overwrite"],
        },
    )

    def __post_init__(self) -> None:
        if self.do_sample and not self.temperature > 0:
            raise ConfigError(f"temperature: sampling needs a positive temperature, got {self.temperature}")
        if self.unknown_policy == "default" and self.domain_classifier and self.default_modality is None:
            raise ConfigError("unknown_policy 'default' needs --default-modality")
        if not self.no_retrieval and self.registry is None:
            raise ConfigError("give --registry (retriever + index per modality), or --no-retrieval")
        check_backend(self)
        self.selection()

    def selection(self) -> KSelection:
        return KSelection.from_options(self.fixed_k, self.clip_threshold, self.select_rule, self.select_threshold)

    def read_paths(self) -> list[str | None]:
        """Every file or directory a run reads: no output may be one of them."""
        return [self.input, self.model, self.adapter, self.registry, self.domain_classifier]

    def output_paths(self) -> list[str]:
        """The files a run writes besides its output."""
        return [self.authors_answer_file] if self.authors_answer_file else []

    def result_options(self) -> dict:
        """The options that change answers (not batch size, device or error handling): a resume must match them."""
        names = ("no_retrieval", "noised_image", "noise_seed", "noise", "modality", "unknown_policy")
        names += ("default_modality",)
        names += ("task", "fixed_k", "clip_threshold", "select_rule", "select_threshold", "yes_no_scores")
        names += ("yes_no_answers", "max_new_tokens", "dtype", "prompt_style", "do_sample")
        if self.backend != "hf":  # engines differ in their numerics: one output is written by one engine
            names += ("backend",)  # (absent for hf, so runs interrupted before backends existed still resume)
        if self.do_sample:
            names += ("temperature", "top_p", "seed", "batch_size")  # a batch's samples depend on its seed
        return {name: getattr(self, name) for name in names} | {"img_root": os.path.abspath(self.img_root)}

    def generator_config(self) -> GeneratorConfig:
        return GeneratorConfig(
            model=self.model,
            adapter=self.adapter,
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            batch_size=self.batch_size,
            dtype=self.dtype,
            device=self.device,
            trust_remote_code=self.trust_remote_code,
            **self.backend_options(),
        )


@dataclass
class ConvertConfig:
    """Arguments of ``mmed-rag convert-llava-med SRC DST``."""

    src: str = field(
        metadata={"positional": True, "help": "original LLaVA-Med directory (config.json with model_type llava_*)"}
    )
    dst: str = field(metadata={"positional": True, "help": "directory to write the transformers LLaVA model to"})
    vision_tower: str | None = field(
        default=None,
        metadata={
            "help": "local CLIP directory (CLIPVisionModel or CLIPModel, e.g. clip-vit-large-patch14-336): the "
            "vision tower when SRC does not contain it, and its config and preprocessing in any case"
        },
    )
    dtype: Literal["float16", "bfloat16", "float32"] | None = field(
        default=None, metadata={"help": "dtype of the written weights (default: that of SRC's text weights)"}
    )
    chat_template: str = field(
        default=LLAVA_MED_MISTRAL, metadata={"help": "chat template set on the processor (mmed_rag.chat_templates)"}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace DST if it exists"})

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise ConfigError(f"dtype: expected one of {', '.join(DTYPE_NAMES)} or null, got {self.dtype!r}")


@dataclass
class TinyModelConfig:
    """``mmed-rag make-tiny-model``: a randomly initialised tiny LLaVA to try ``generate`` and ``train-*`` with."""

    out: str = field(default="tiny-llava", metadata={"help": "model directory to write (model + processor)"})
    seed: int = field(default=0, metadata={"help": "seed of the random weights"})
    chat_template: str = field(default=LLAVA_MED_MISTRAL, metadata={"help": "conversation format of the processor"})
