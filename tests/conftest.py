"""Shared test setup: offline, no tracking, CPU deepspeed; paths to the read-only shared data."""

import os
from pathlib import Path

import pytest

# Set before any test module imports transformers, wandb or deepspeed.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
RELEASE = SHARED / "mmed-rag-release"


@pytest.fixture(scope="session")
def release_dir() -> Path:
    """The original release's annotation files (text only); tests using it skip where ../shared is absent."""
    if not RELEASE.is_dir():
        pytest.skip(f"MMed-RAG release samples not found at {RELEASE} (they live in ../shared beside the repo)")
    return RELEASE


@pytest.fixture(scope="session")
def real_xrays() -> Path:
    """Real chest X-rays (PneumoniaMNIST subset, 28x28 grayscale); tests using them skip where it is absent."""
    archive = SHARED / "real-images" / "pneumoniamnist.npz"
    if not archive.is_file():
        pytest.skip(f"real chest X-rays not found at {archive} (they live in ../shared beside the repo)")
    return archive
