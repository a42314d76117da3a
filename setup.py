"""Packaging for mmed-rag.

Dependency ranges are the versions verified together on CPU machines (see README "Install"); trl is held to
its 1.16 series because its DPO internals change between minor releases and our trainer subclasses them.
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

CORE = [
    "torch>=2.4",
    "torchvision>=0.19",
    "transformers>=5.0,<5.25",  # 5.25 pulls in `kernels`, whose attention hook fails under ZeRO-3 (no _kernel_funcs)
    "trl~=1.16.0",
    "peft>=0.21,<1",
    "accelerate>=1.10,<2",
    "open_clip_torch>=3.0,<4",
    "datasets>=4.0",
    "deepspeed>=0.17",
    "pillow>=10.0",
    "pyyaml>=6.0",
    "tqdm>=4.66",
    # output locks: flock with the holder written into the lock file (on_acquired), soft lock where flock is missing
    "filelock>=4.3",
    "numpy>=1.26",
    "scikit-learn>=1.5",
    "scipy>=1.11",
    "pycocoevalcap>=1.2",
    "rouge-score>=0.1.2",
    "nltk>=3.8",  # the MMed-RAG authors' report judge: sentence BLEU, smoothing method 7
    "matplotlib>=3.8",
    "tensorboard>=2.16",
    "wandb>=0.18",
    "tokenizers>=0.21",
    # LLaVA-Med ships its tokenizer as a sentencepiece tokenizer.model only; reading it needs both
    "sentencepiece>=0.2",
    "protobuf>=4",
    "safetensors>=0.4",
    "httpx>=0.27",  # --backend openai: requests to an OpenAI-compatible generation server
]

setup(
    name="mmed-rag",
    version="0.1.0",
    description="Multimodal retrieval-augmented generation for medical vision-language models (MMed-RAG, DAMON).",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["mmed_rag", "mmed_rag.*"]),
    package_data={"mmed_rag": ["model_configs/*.json", "chat_templates/*.jinja", "testing_corpus.txt"]},
    install_requires=CORE,
    extras_require={
        # faiss-cpu and faiss-gpu both install the `faiss` module into the same folder, so they cannot sit side
        # by side: the FAISS build is chosen by extra, like jax[cpu] / jax[cuda12].
        "cpu": ["faiss-cpu>=1.8"],
        "gpu": ["faiss-gpu>=1.8"],
        "dev": ["pytest>=8", "ruff>=0.6"],
    },
    entry_points={"console_scripts": ["mmed-rag=mmed_rag.cli:main"]},
)
