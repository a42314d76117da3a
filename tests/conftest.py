"""Shared test setup: offline, no tracking, CPU deepspeed; paths to the read-only shared data; the inputs and the
original command line of the DeepSpeed RAG-PT runs."""

import json
import os
import sys
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


# The original RAG-PT command's environment on a CPU, and the tiny values that replace its sizes (the rest of the
# original command is kept as it is).
DEEPSPEED_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "DS_ACCELERATOR": "cpu",
    "TOKENIZERS_PARALLELISM": "false",
}
TINY_DPO = ["--lora_r", "8", "--lora_alpha", "16", "--num_train_epochs", "1", "--per_device_train_batch_size", "2"]
TINY_DPO += ["--learning_rate", "1e-3", "--warmup_ratio", "0", "--dataloader_num_workers", "1"]
PAIR_QUESTION = (
    "<image>\nYou are provided with an X-ray image and 1 reference report(s): 1. The heart is normal. \n"
    "Question: Is there an effusion?"
)


def _write_stage_pairs(path: Path, noised_every: int) -> Path:
    records = []
    for index in range(4):
        turns = [{"from": "human", "value": PAIR_QUESTION}, {"from": "gpt", "value": "Yes"}]
        rejected = [{"from": "human", "value": PAIR_QUESTION}, {"from": "gpt", "value": "No"}]
        records.append(
            {
                "id": index,
                "image": f"{index}.png",
                "conversations": turns,
                "rejected_conversations": rejected,
                "rejected_noised": int(index % noised_every == 0),
            }
        )
    path.write_text(json.dumps(records, indent=4))
    return path


@pytest.fixture(scope="session")
def original_dpo(tmp_path_factory) -> SimpleNamespace:
    """For the DeepSpeed RAG-PT tests: a tiny LLaVA (``base``), four images 0-3.png (in ``image_folder``), stage-1
    and stage-2 pair files (four pairs each), the environment of a CPU run, and the original train_dpo_2stages.py
    command line:

    - ``flags(output_dir, deepspeed_config)``: the original flags (both stages, merge) with the tiny sizes;
    - ``launch(launcher_args, flags)``: those flags under the deepspeed launcher on a free port;
    - ``script_env(output_dir, deepspeed_config)``: the environment of scripts/train_dpo_2stages.sh for one GPU.
    """
    import numpy as np
    from PIL import Image

    from mmed_rag.testing import free_port, save_tiny_llava

    root = tmp_path_factory.mktemp("original-dpo")
    base = save_tiny_llava(root / "base")
    rng = np.random.default_rng(0)
    for index in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 48), dtype=np.uint8)).save(root / f"{index}.png")
    stage1, stage2 = _write_stage_pairs(root / "stage1.json", 2), _write_stage_pairs(root / "stage2.json", 5)

    def flags(output_dir, deepspeed_config: str | None = "configs/deepspeed/zero3.json") -> list[str]:
        deepspeed = ["--deepspeed", deepspeed_config] if deepspeed_config else []
        return [
            "--model_name_or_path", str(base), *deepspeed, "--version", "v1",
            "--lora_enable", "True", "--lora_r", "128", "--lora_alpha", "256", "--mm_projector_lr", "2e-5",
            "--data_path", str(stage1), "--image_folder", str(root),
            "--vision_tower", "openai/clip-vit-large-patch14-336", "--mm_projector_type", "mlp2x_gelu",
            "--mm_vision_select_layer", "-2", "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False",
            "--image_aspect_ratio", "pad", "--group_by_modality_length", "True", "--bf16", "False",
            "--output_dir", str(output_dir), "--num_train_epochs", "3", "--per_device_train_batch_size", "1",
            "--per_device_eval_batch_size", "1", "--gradient_accumulation_steps", "1", "--evaluation_strategy", "no",
            "--save_strategy", "steps", "--save_steps", "200", "--save_total_limit", "1", "--learning_rate", "1e-7",
            "--weight_decay", "0.", "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--logging_steps", "1",
            "--report_to", "none", "--tf32", "True", "--model_max_length", "1024", "--gradient_checkpointing", "True",
            "--dataloader_num_workers", "4", "--lazy_preprocess", "True",
            "--stage2_data_path", str(stage2), "--merge", "True", *TINY_DPO,
        ]  # fmt: skip

    deepspeed = str(Path(sys.executable).parent / "deepspeed")  # this environment's launcher, wherever the repo is

    def launch(launcher_args: list[str], train_flags: list[str]) -> list[str]:
        port = ["--master_port", str(free_port())]
        return [deepspeed, *launcher_args, *port, "train/dpo/train_dpo_2stages.py", *train_flags]

    def script_env(output_dir, deepspeed_config: str) -> dict[str, str]:
        return {
            **os.environ,
            **DEEPSPEED_ENV,
            "MODEL": str(base),
            "DATA_STAGE1": str(stage1),
            "DATA_STAGE2": str(stage2),
            "IMAGE_FOLDER": str(root),
            "OUTPUT_DIR": str(output_dir),
            "DEEPSPEED_CONFIG": deepspeed_config,
            "INCLUDE": "localhost:0",
            "MASTER_PORT": str(free_port()),
            "BF16": "False",
            "DEEPSPEED": deepspeed,
        }

    return SimpleNamespace(
        base=base,
        image_folder=root,
        env={**os.environ, **DEEPSPEED_ENV},
        tiny=TINY_DPO,
        flags=flags,
        launch=launch,
        script_env=script_env,
    )
