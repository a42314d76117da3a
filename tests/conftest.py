"""Shared test setup: offline, no tracking, CPU deepspeed; paths to the read-only shared data."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

# Set before any test module imports transformers, wandb or deepspeed.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
RELEASE = SHARED / "mmed-rag-release"
WORLD_MODALITIES = ("radiology", "pathology")


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


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> SimpleNamespace:
    """For the command-line tests: phantoms, a tiny LLaVA, a retriever + index + registry, a domain classifier,
    preference pairs and predictions."""
    from mmed_rag.data.phantoms import PhantomConfig, make_phantoms
    from mmed_rag.domain.classifier import TrainDomainConfig, train_domain
    from mmed_rag.retrieval.clip import save_clip
    from mmed_rag.retrieval.index import ReportIndex
    from mmed_rag.testing import save_tiny_llava, tiny_clip

    root = tmp_path_factory.mktemp("world")
    make_phantoms(PhantomConfig(out=str(root / "data"), n=24, size=32, modalities=WORLD_MODALITIES))
    data = root / "data"
    save_clip(tiny_clip(0)[0], root / "clip", "tiny-clip")
    corpus = data / "training/retriever/radiology/radiology_train.json"
    ReportIndex.build(root / "clip", corpus, "radiology", progress=False).save(root / "index")
    (root / "registry.yaml").write_text(
        yaml.safe_dump({"modalities": {"radiology": {"retriever": "clip", "index": "index"}}})
    )
    save_tiny_llava(root / "llava")
    train_domain(
        TrainDomainConfig(
            train_files=tuple(f"{m}={data}/training/retriever/{m}/{m}_train.json" for m in WORLD_MODALITIES),
            img_root=str(data / "images"),
            model="tiny-clip",
            epochs=2,
            out=str(root / "domain"),
            device="cpu",
        )
    )
    vqa = data / "test/vqa/radiology_test.jsonl"
    predictions = [
        {**json.loads(line), "prediction": "Yes." if index % 2 else "No."}
        for index, line in enumerate(vqa.read_text().splitlines())
    ]
    (root / "pred.jsonl").write_text("".join(json.dumps(line) + "\n" for line in predictions))
    first_image = json.loads(vqa.read_text().splitlines()[0])["image"]
    pair = {
        "id": "pair-0",
        "image": first_image,
        "conversations": [
            {"from": "human", "value": "<image>\nIs there an effusion?"},
            {"from": "gpt", "value": "No."},
        ],
        "rejected_conversations": [
            {"from": "human", "value": "<image>\nIs there an effusion?"},
            {"from": "gpt", "value": "Yes."},
        ],
        "rejected_noised": 1,
    }
    (root / "pairs.json").write_text(json.dumps([pair, {**pair, "id": "pair-1"}], indent=2))
    return SimpleNamespace(
        root=root,
        data=data,
        images=data / "images",
        vqa=vqa,
        report=data / "test/report/radiology_test.json",
        corpus=corpus,
        clip=root / "clip",
        index=root / "index",
        registry=root / "registry.yaml",
        llava=root / "llava",
        domain=root / "domain",
        pred=root / "pred.jsonl",
        pairs=root / "pairs.json",
        first_image=first_image,
    )
